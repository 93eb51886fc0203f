"""Tests of the sandbox package: ordinary code, the isolation modes, and the attack suite of
tests/sandbox_attacks.py.

The attack suite runs every hostile snippet as root (when the tests run as root) and as an ordinary
user (created with useradd when the tests run as root; then the user runs the system python3, since
root's interpreter may live under /root), with the strongest isolation found, and again with bwrap
and Landlock forced where they exist. Each case asserts the snippet's output shows containment and
that the host is unchanged afterwards: files, processes, listeners, SysV objects, the trainer alive
and quiet.
"""
import ast
import ctypes
import doctest
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sandbox
from sandbox import landlock, paths, run_python

sys.path.insert(0, str(Path(__file__).parent))
from sandbox_attacks import ATTACKS, LATER  # noqa: E402

ROOT = Path(sandbox.__file__).resolve().parents[1]
IS_ROOT = os.getuid() == 0
TEST_USER = "aepo-sandbox-test"
SYSTEM_PYTHON = "/usr/bin/python3"
libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------------------------------
# Ordinary code

def test_docstring_examples():
    assert doctest.testmod(sandbox).failed == 0
    assert doctest.testmod(paths).failed == 0


@pytest.mark.parametrize("code, expected", [
    ("print('hello')", "hello"),
    ("1987 - 1962", "25"),
    ("x = [3, 1, 2]\nsorted(x)", "[1, 2, 3]"),
    ("print('a')\n'b'", "a\n'b'"),
    ("print(None)", "None"),  # a bare call returning None prints nothing more
    ("def f(n):\n    return n * 2\n\nf(21)", "42"),
    ("import math\nmath.factorial(10)", "3628800"),
    ("x = 1", ""),
])
def test_run_python_output(code, expected):
    assert run_python(code) == expected


def test_run_python_errors():
    text = run_python("print('before')\nx = {}\nx['missing']")
    assert text.startswith("before\nTraceback") and text.endswith("KeyError: 'missing'")
    assert 'File "<python>", line 3' in text and "<string>" not in text  # the user's frames only
    text = run_python("x = (1,\nprint(x)")
    assert "SyntaxError" in text and "Traceback" not in text
    assert run_python("import sys\nsys.exit(3)") == ""
    assert run_python("input()").endswith("EOFError: EOF when reading a line")


def test_run_python_working_directory_is_writable_and_empty_at_each_call():
    text = run_python("import os\nopen('notes.txt', 'w').write('hi')\nprint(os.listdir('.'))\n"
                      "open('notes.txt').read()")
    assert text == "['notes.txt']\n'hi'"
    assert run_python("import os\nos.listdir('.')") == "[]"


def test_run_python_caps_output_keeping_head_and_tail():
    text = run_python("for i in range(1000):\n    print(f'line {i:04d}')", max_output_chars=100)
    assert text.startswith("line 0000\n") and text.endswith("line 0999")
    assert "bytes of output cut" in text and len(text) < 100 + 50


def test_run_python_in_parallel_threads():  # rollouts run tool calls in parallel
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"{i} * 10"), range(4)))
    assert [ast.literal_eval(text) for text in results] == [0, 10, 20, 30]


def test_run_python_odd_characters_become_text():
    assert run_python("'\\N{GREEK SMALL LETTER ALPHA}' + '\\ud800'") == "'α\\ud800'"
    assert run_python("print(1)\0") == "Python sandbox could not start: embedded null byte"
    assert run_python("x = '\ud800'").startswith(
        "Python sandbox could not start: 'utf-8' codec can't encode")


def test_run_python_timeout_keeps_earlier_output():
    assert (run_python("print('started', flush=True)\nwhile True: pass", timeout_s=1)
            == "started\nTimed out after 1 s")


# --------------------------------------------------------------------------------------------------
# Modes

def test_best_isolation_is_described_in_one_line():
    assert sandbox.best_isolation() in sandbox.MODES
    line = sandbox.describe_isolation()
    assert line.startswith("Python sandbox: ") and "\n" not in line


def test_no_isolation_is_refused_unless_unsafe():
    assert run_python("6 * 7", isolation="none").startswith("Python sandbox refused: no isolation")
    interpreter = Path(sys.executable).resolve()
    # the throwaway uid can reach it
    if not IS_ROOT or all(p.stat().st_mode & 0o001 for p in interpreter.parents):
        assert run_python("6 * 7", isolation="none", unsafe=True) == "42"


def test_landlock_rights_follow_the_abi():
    assert landlock.handled_fs(1) == (1 << 13) - 1
    assert (landlock.handled_fs(3) == (1 << 15) - 1
            and landlock.handled_fs(5) == (1 << 16) - 1)
    assert ctypes.sizeof(landlock.PathBeneath) == 12  # packed, as the kernel's struct


def test_make_tools_refuses_without_isolation(monkeypatch):
    import aepo
    from support import policy

    monkeypatch.setattr(sandbox, "best_isolation", lambda: "none")
    with pytest.raises(SystemExit, match="NO isolation.*unsafe_python"):
        policy.make_tools(aepo.Config())
    tools = policy.make_tools(aepo.Config(unsafe_python=True))
    assert tools["python"]("6 * 7").startswith(("42", "Python sandbox could not start"))


def test_a_mode_that_fails_is_named_with_its_cause(monkeypatch):
    """The start-of-run line says why no stronger mode holds, and a run that would refuse every
    Python call stops before training, with the cause."""
    from support import cli

    failures = {"namespaces": "Python sandbox could not start: [Errno 17] File exists: '/x/tmp'",
                "bwrap": "Python sandbox could not start: bwrap is not installed",
                "landlock": "Python sandbox could not start: [Errno 13] Permission denied: '/x/py'"}
    monkeypatch.setattr(sandbox, "run_python",
                        lambda code, timeout_s, isolation: failures[isolation])
    sandbox.probe.cache_clear()
    try:
        line = sandbox.describe_isolation()
        assert line.startswith("Python sandbox: NO isolation") and "\n" not in line
        assert ("namespaces: [Errno 17] File exists: '/x/tmp'; bwrap: bwrap is not installed; "
                "landlock: [Errno 13] Permission denied: '/x/py'") in line
        with pytest.raises(SystemExit, match="File exists.*--unsafe_python"):
            sandbox.check_python_tool()
        assert sandbox.check_python_tool(unsafe=True).startswith("Python sandbox: NO isolation")
        with pytest.raises(SystemExit, match="File exists"):  # before any model or data loads
            cli.train_config(["--stage", "rl", "--output_dir", "/nonexistent/aepo-run"])
        assert cli.train_config(["--stage", "sft", "--output_dir", "/nonexistent/aepo-run"])
    finally:
        sandbox.probe.cache_clear()


@pytest.mark.skipif(not IS_ROOT, reason="as root only")
def test_unsafe_python_as_root_runs_as_it_says(monkeypatch):
    """Without isolation, root runs the code as the throwaway uid only where that uid can reach the
    interpreter (else as root, and says so); Landlock names the folder it cannot pass."""
    reachable = paths.throwaway_uid_can_run()
    uid = run_python("import os\nos.getuid()", isolation="none", unsafe=True)
    assert uid.isdigit() and (int(uid) >= sandbox.SANDBOX_UID_BASE if reachable else uid == "0")
    monkeypatch.setattr(sandbox, "probe", lambda: ("none", ()))
    assert ("runs as root" in sandbox.describe_isolation(unsafe=True)) == (not reachable)
    if not reachable:
        assert "cannot reach the interpreter" in run_python("6 * 7", isolation="landlock")


def cgroup_paths(text: str) -> dict:
    """/proc/<pid>/cgroup's text as {controller: path} (v2's controller: "")."""
    lines = [line.split(":", 2) for line in text.splitlines() if line]
    return {c: path.rstrip("/") for _, controllers, path in lines for c in controllers.split(",")}


@pytest.mark.skipif(not (IS_ROOT and sandbox.cgroup_roots()), reason="cgroups: as root only")
def test_a_calls_cgroups_lie_within_the_trainers():
    own = cgroup_paths(Path("/proc/self/cgroup").read_text())
    call = cgroup_paths(run_python("print(open('/proc/self/cgroup').read())"))
    if os.path.exists("/sys/fs/cgroup/cgroup.subtree_control"):  # v2: the deepest that delegates
        folder = own[""]
        while "memory" not in Path(f"/sys/fs/cgroup{folder}/cgroup.subtree_control").read_text():
            folder = os.path.dirname(folder)
        assert os.path.dirname(call[""]) == folder.rstrip("/")
    else:
        assert os.path.dirname(call["memory"]) == own["memory"]


@pytest.mark.skipif(not (IS_ROOT and sandbox.cgroup_roots()), reason="cgroups: as root only")
def test_cgroups_left_behind_are_removed():
    """A call's cgroup that outlived its 1 s of cleanup goes at the next call or at exit; so does
    one of a trainer that died."""
    pid = subprocess.Popen(["true"])  # its pid is free once it is reaped
    pid.wait()
    roots = sandbox.cgroup_roots()
    orphans = [os.path.join(root, f"aepo-sandbox-{pid.pid}-0rphan00") for root in roots]
    mine = os.path.join(roots[0], f"aepo-sandbox-{os.getpid()}-1eft0000")
    for folder in [*orphans, mine]:
        os.mkdir(folder)
    sandbox._LEFT.add(mine)
    assert run_python("6 * 7") == "42"
    assert not [folder for folder in [*orphans, mine] if os.path.exists(folder)]
    at_exit = os.path.join(roots[0], "aepo-sandbox-1-atexit00")  # pid 1 lives: only _LEFT counts
    subprocess.run([sys.executable, "-c", f"import os, sandbox\nos.mkdir({at_exit!r})\n"
                    f"sandbox._LEFT.add({at_exit!r})"], cwd=ROOT, check=True)
    assert not os.path.exists(at_exit)


# --------------------------------------------------------------------------------------------------
# Where Python lives

VENV_PROBE = """import json, sys
sys.path.insert(0, sys.argv[1])
import sandbox
print(json.dumps([sandbox.best_isolation(), sandbox.describe_isolation(),
                  sandbox.run_python("import os, sys\\nprint(sys.prefix)\\nos.listdir('.')")]))
"""


@pytest.mark.parametrize("who", ["root", "user"] if IS_ROOT else ["user"])
def test_a_venv_under_tmp_gets_the_same_isolation(who):
    """The sandbox mounts its own /tmp: a venv there (python3 -m venv /tmp/x) runs from /run/python
    in the new root, with the same isolation as its base interpreter."""
    user = ordinary_user() if who == "user" and IS_ROOT else None
    base = sys.executable if user is None else SYSTEM_PYTHON
    if user and not runs_as(user, base):
        pytest.skip(f"no Python >= 3.10 that {TEST_USER} may run ({base})")
    ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    code = Path(tempfile.mkdtemp(prefix="aepo-code-"))
    venv = Path("/tmp") / f"aepo-venv-{uuid.uuid4().hex[:8]}"
    try:
        copy_sandbox(code)
        code.chmod(0o755)
        subprocess.run([base, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                       check=True, cwd="/", **ids)
        found = {}
        for python in (base, str(venv / "bin" / "python")):
            done = subprocess.run([python, "-I", "-c", VENV_PROBE, str(code)], cwd="/", **ids,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            found[python] = json.loads(done.stdout)
        mode, line, output = found[str(venv / "bin" / "python")]
        assert mode == found[base][0], line
        if mode in ("namespaces", "bwrap"):
            assert output == f"/run/python{venv}\n[]"
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(code, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The attack suite: the host the snippets aim at

class Listeners:
    """TCP, UDP, Unix-socket-on-disk (world-writable) and abstract-socket listeners; records what
    arrives."""

    def __init__(self, mark: str, folder: Path):
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(folder / "agent.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + mark)
        for s in (self.tcp, self.unix, self.abstract):
            s.listen()
        self.got = {"tcp": [], "udp": [], "unix": [], "abstract": []}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        names = {self.tcp: "tcp", self.udp: "udp", self.unix: "unix", self.abstract: "abstract"}
        while not self.stop.is_set():
            for s in select.select(list(names), [], [], 0.05)[0]:
                if s is self.udp:
                    self.got["udp"].append(s.recv(4096))
                else:
                    conn = s.accept()[0]
                    conn.settimeout(1)
                    self.got[names[s]].append(b"connected:" + conn.recv(4096))
                    conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in folder.rglob("*")}


def sysv_ids() -> set:
    ids = set()
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            ids |= {(kind, line.split()[1]) for line in list(f)[1:]}
    return ids


def find_world_writable() -> list[str]:
    found = subprocess.run(["find", "/", "-xdev", "-type", "d", "-perm", "-0002"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    return sorted(set(found) | {d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
                                if os.path.isdir(d)})


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Everything the attacks aim at, set up once: a victim home per user, listeners, a SysV
    segment."""
    mark = f"aepo{uuid.uuid4().hex[:12]}"
    base = Path("/var/lib" if IS_ROOT else Path.home()) / f"aepo-attack-{mark}"
    base.mkdir()
    (base / "world-writable").mkdir()
    (base / "world-writable").chmod(0o1777)  # like /var/crash on Ubuntu: not on any fixed list
    sockets = base / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)
    listeners = Listeners(mark, sockets)
    key = int.from_bytes(os.urandom(3), "big") + 1
    segment = libc.shmget(key, 4096, 0o1666)
    libc.shmat.restype = ctypes.c_void_p
    address = libc.shmat(segment, None, 0)
    ctypes.memmove(address, b"intact", 6)
    state = {"mark": mark, "base": base, "listeners": listeners, "key": key, "segment": segment,
             "address": address, "ww": find_world_writable(), "sysv": sysv_ids(),
             "secret": f"sk-{uuid.uuid4().hex}"}
    yield state
    listeners.close()
    libc.shmdt(ctypes.c_void_p(address))
    libc.shmctl(segment, 0, None)  # IPC_RMID
    shutil.rmtree(base)


def victim_home(folder: Path, owner: int | None) -> Path:
    (folder / ".ssh").mkdir(parents=True)
    (folder / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (folder / ".bashrc").write_text("export PS1='$ '\n")
    (folder / ".ssh").chmod(0o700)
    for path in [folder, *folder.rglob("*")]:
        if owner is not None:
            os.chown(path, owner, owner)
    return folder


def copy_sandbox(code: Path) -> None:
    """The sandbox package into `code`, for a user who may not read the checkout."""
    shutil.copytree(ROOT / "sandbox", code / "sandbox", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))


def ordinary_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True)
        return pwd.getpwnam(TEST_USER)


CONTEXTS = ([("root", None)] if IS_ROOT else []) + [("user", None)]
CONTEXTS += [("user", "bwrap")] if shutil.which("bwrap") else []
CONTEXTS += [("user", "landlock")] if landlock.abi_version() >= 1 else []
OUTCOMES: dict = {}


def outcome(host: dict, who: str, mode: str | None, everything: bool = False) -> dict:
    """Run every attack once per (who, mode) in a driver process; then measure the host."""
    if (who, mode) in OUTCOMES:
        return OUTCOMES[who, mode]
    python, user, code = sys.executable, None, ROOT
    # a copy of the code the user can read, wherever the checkout lies
    if who == "user" and IS_ROOT:
        user, code = ordinary_user(), host["base"] / "code"
        code.mkdir(exist_ok=True)
        copy_sandbox(code)
        shutil.copy(ROOT / "tests" / "sandbox_attacks.py", code)
        python = next((p for p in (sys.executable, SYSTEM_PYTHON) if runs_as(user, p)), None)
        if python is None:
            pytest.skip(f"no Python >= 3.10 that {TEST_USER} may run ({sys.executable}, "
                        f"{SYSTEM_PYTHON})")
    home = victim_home(host["base"] / f"home-{who}-{mode}", user.pw_uid if user else None)
    params = {"HOME_DIR": str(home), "CHECKOUT": str(ROOT), "MARK": host["mark"],
              "SECRET": host["secret"], "SLEEP_MARK": f"3600.{int(host['mark'][4:], 16) % 10**9}",
              "WW_DIRS": json.dumps(host["ww"]), "TCP_PORT": host["listeners"].tcp.getsockname()[1],
              "UDP_PORT": host["listeners"].udp.getsockname()[1],
              "UNIX_SOCKET": host["listeners"].unix_path, "SHM_KEY": host["key"]}
    before = {"home": snapshot(home), "setup": (ROOT / "sandbox" / "start.py").read_bytes()}
    start = time.monotonic()
    driver = code / "sandbox_attacks.py" if user else ROOT / "tests" / "sandbox_attacks.py"
    done = subprocess.run([python, "-I", str(driver),
                           json.dumps({"mode": mode, "checkout": str(code), "params": params,
                                       "everything": everything})],
                          user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                          extra_groups=[] if user else None, cwd="/", capture_output=True,
                          text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "AEPO_TEST_SECRET": host["secret"],
                               "HOME": str(home)})
    results = (json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 and done.stdout
               else {})
    assert results, f"the driver died (rc {done.returncode}): {done.stderr[-2000:]}"
    results["_seconds"] = time.monotonic() - start
    mark, got = host["mark"], host["listeners"].got
    marked_dirs = [*host["ww"], str(ROOT), "/etc", "/etc/cron.d",
                   *{p for p in sys.path if p.endswith("-packages")}]
    results["_facts"] = {
        "trainer_alive": done.returncode == 0,
        "home_unchanged": snapshot(home) == before["home"],
        "checkout_unchanged": (ROOT / "sandbox" / "start.py").read_bytes() == before["setup"]
                              and "def parse_tool_call" in (ROOT / "tools.py").read_text(),
        "no_marked_files": not any(mark in name for d in marked_dirs if os.path.isdir(d)
                                   for name in os.listdir(d)),
        "no_marked_processes": not marked_processes(params["SLEEP_MARK"]),
        "trainer_output_clean": mark[::-1] not in done.stdout + done.stderr,
        **{f"{kind}_untouched": not got[kind] for kind in got},
        "host_segment_intact": (ctypes.string_at(host["address"], 6) == b"intact"
                                and libc.shmget(host["key"], 0, 0) >= 0),
        "no_new_sysv": sysv_ids() <= host["sysv"],
        "trainer_settings_unchanged": (results["_trainer_settings"][0]
                                       == results["_trainer_settings"][1]),
    }
    # what a failed containment left: the host as before
    for pid in marked_processes(params["SLEEP_MARK"]):
        os.kill(int(pid), 9)
    for kind, number in sysv_ids() - host["sysv"]:
        # IPC_RMID
        {"shm": libc.shmctl, "msg": libc.msgctl, "sem": libc.semctl}[kind](int(number), 0, None)
    OUTCOMES[who, mode] = results
    return results


def runs_as(user: pwd.struct_passwd, python: str) -> bool:
    check = "import sys; assert sys.version_info >= (3, 10)"
    try:
        return subprocess.run([python, "-I", "-c", check], user=user.pw_uid, group=user.pw_gid,
                              extra_groups=[], cwd="/", capture_output=True).returncode == 0
    except OSError:  # e.g. an interpreter under /root
        return False


def marked_processes(marker: str) -> list[str]:
    for _ in range(100):  # SIGKILLed processes take a few milliseconds to go
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass
        if not found:
            return []
        time.sleep(0.01)
    return found


CASES = [pytest.param(who, mode, attack,
                      id=f"{who}-{mode or 'best'}-{attack.category}-{attack.name}")
         for who, mode in CONTEXTS for attack in ATTACKS + LATER
         if mode is None or mode in attack.modes]


@pytest.mark.parametrize("who, mode, attack", CASES)
def test_attack_is_contained(host, who, mode, attack):
    results = outcome(host, who, mode)
    if results["_mode"] not in attack.modes:  # only where the machine offers nothing stronger
        pytest.skip(f"the {results['_mode']} mode does not contain this, as sandbox/ says; "
                    "no stronger mode here")
    output, seconds = results[attack.name]
    assert attack.contained(output), output
    # every call ends within its timeout (the rest: start-up)
    assert seconds < attack.timeout_s + 3, seconds
    facts = results["_facts"]
    failed = [fact for fact in ("trainer_alive", *attack.host) if not facts[fact]]
    assert not failed, f"host changed: {failed}; output: {output}"


def test_attack_suite_is_large_and_covers_every_category():
    categories = {a.category for a in ATTACKS}
    assert len(ATTACKS) + len(LATER) >= 40 and categories == {
        "resources", "filesystem", "process", "environment and memory", "network", "IPC",
        "persistence"}
