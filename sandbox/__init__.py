"""The Python tool: run model-written code in a fresh, contained interpreter and return its output
as text.

    >>> run_python("1987 - 1962")
    '25'

    python -m sandbox     # which isolation holds here, in one line

Each call runs a new interpreter (`-I`) with an environment holding nothing of the caller's, rlimits
on CPU time, address space, file size, open files and core files, no_new_privs, and a wall-clock
timeout after which every process of the call dies. Around that, the strongest isolation the machine
offers (`best_isolation()` picks it once by trying each; `describe_isolation()` says it in one
line):

- "namespaces": new user, mount, network, IPC, PID and UTS namespaces, as bubblewrap builds them,
  with no privilege needed. The code sees a new root holding only /usr, /bin, /lib*, /etc and the
  Python installation, read-only, a fresh /proc of its own processes, /dev/null-like devices, and a
  64 MB tmpfs each for /tmp (its working directory) and /dev/shm. So: no home, no checkout, no host
  /tmp or /run (no world-writable folder and no Unix socket of the host), no network, no host
  process to read, trace or signal, SysV memory and every process gone when the call ends. As root
  the code runs as a throwaway uid (SANDBOX_UID_BASE + pid) and cgroups cap the whole call's memory
  and CPU (one core); without root PID 1 of the call sums its memory every 20 ms and kills the call
  past the cap.
- "bwrap": the same through the `bwrap` program (where namespaces are refused to Python but
  bubblewrap has its AppArmor profile, as on Ubuntu 24.04).
- "landlock": files only. The code may read the system and Python folders and write its working
  directory; TCP and (kernel ABI >= 6) signals and abstract sockets to outside processes are
  refused. UDP, Unix sockets on disk and SysV memory stay open; a process that calls setsid() may
  outlive the call; the working directory lies on the host's disk (10 MB per file, files without
  limit).
- "none": rlimits and the process group only. Refused unless the caller passes `unsafe=True`
  (`--unsafe_python`).
Kernel exploits are out of scope: against hostile users rather than a confused model, use a VM.

This package: __init__.py (here: pick, describe, run), start.py (run as a script in the fresh
interpreter: the isolation, limits, code), paths.py (what the new root holds), seccomp.py (the
system calls refused in every mode), landlock.py (the Landlock mode). docs/sandbox.md has the
attack suite and its results.
"""
import atexit
import contextlib
import functools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox import paths
from sandbox import start

MODES = ("namespaces", "bwrap", "landlock", "none")  # strongest first
SANDBOX_UID_BASE = start.SANDBOX_UID_BASE
_START_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "start.py")


def run_python(code: str, timeout_s: float = 5.0, max_output_chars: int = 2000,
               memory_mb: int = 512, *, isolation: str | None = None, unsafe: bool = False) -> str:
    """Run `code`; return its output, error or a timeout note. Never raises.

    The output is stdout and stderr interleaved, then the repr of a bare last expression
    (as a REPL prints it); an exception adds its traceback without the sandbox's own frame. Beyond
    max_output_chars (counted in UTF-8 bytes) only the head and tail are kept. `memory_mb` caps each
    process's address space and, as root, the whole call's memory. `isolation` forces a mode of
    MODES (default: the strongest here).
    """
    mode = isolation or best_isolation()
    if mode == "none" and not unsafe:
        return ("Python sandbox refused: no isolation is available on this machine; rerun with "
                "--unsafe_python to run model-written code unprotected")
    if mode == "bwrap" and not shutil.which("bwrap"):
        return "Python sandbox could not start: bwrap is not installed"
    with tempfile.TemporaryDirectory(prefix="aepo-python-", ignore_cleanup_errors=True) as work:
        os.chmod(work, 0o755)
        groups = make_cgroups(memory_mb) if os.getuid() == 0 and mode != "none" else []
        config = {"code": code, "work": work, "cpu_s": math.ceil(timeout_s) + 1,
                  "memory_mb": memory_mb, "mode": mode, "cgroups": groups,
                  "bwrap": shutil.which("bwrap") or ""}
        try:  # start.py, run as a script, builds the isolation, then runs the code
            proc = subprocess.Popen([sys.executable, "-I", _START_FILE, json.dumps(config)],
                                    cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=start.SANDBOX_ENV,
                                    start_new_session=True)
        except (OSError, ValueError) as error:
            # e.g. code over the kernel's limit of 128 KiB for one argument
            remove_cgroups(groups)
            return f"Python sandbox could not start: {error}"
        output, timed_out = _read_output(proc, time.monotonic() + timeout_s, max_output_chars)
        _kill_sandbox(proc, groups)
    output = output.rstrip("\n")
    note = f"Timed out after {timeout_s:g} s" if timed_out else ""
    # e.g. SIGXCPU, SIGSEGV
    if not timed_out and proc.returncode is not None and proc.returncode < 0:
        note = f"Killed by {signal.Signals(-proc.returncode).name}"
    return output + ("\n" if output and note else "") + note


@functools.cache
def probe() -> tuple[str, tuple[tuple[str, str], ...]]:
    """(the strongest mode of MODES that runs a probe correctly here, (mode, what went wrong) for
    each stronger one), tried once per process (~0.2 s)."""
    failed = []
    for mode in MODES[:-1]:
        output = run_python("6 * 7", timeout_s=10, isolation=mode)
        if output == "42":
            break
        why = " ".join(output.removeprefix("Python sandbox could not start: ").split())
        failed.append((mode, why[:300] or "no output"))
    else:
        mode = "none"
    return mode, tuple(failed)


def best_isolation() -> str:
    """The strongest mode of MODES that works here."""
    return probe()[0]


def describe_isolation(unsafe: bool = False) -> str:
    """One line for the start of a run: which isolation holds model-written Python code here, and
    why no stronger mode does."""
    mode, root = best_isolation(), os.getuid() == 0
    memory = ("memory and CPU capped per call (cgroups)" if root and cgroup_roots() else
              "memory capped per call (checked every 20 ms)")
    who = "a throwaway uid" if root else "the caller's uid"
    line = {"namespaces": "Python sandbox: user namespaces (private root, no network, own IPC and "
                          f"PID), runs as {who}, {memory}",
            "bwrap": "Python sandbox: bubblewrap (private root, no network, own IPC and PID), "
                     f"{memory}",
            "landlock": "Python sandbox: Landlock (files: system read-only, own folder writable; "
                        "no TCP); LEFT OPEN: UDP, Unix sockets on disk, SysV IPC, daemons that "
                        "call setsid(), the disk in its folder, the call's total memory",
            "none": "Python sandbox: NO isolation (rlimits only): model-written code runs as "
                    + ("a throwaway uid" if root and paths.throwaway_uid_can_run() else
                       "root" if root else "you")
                    + (" (--unsafe_python)" if unsafe else "; refused unless --unsafe_python")}
    reasons = "; ".join(f"{m}: {why}" for m, why in probe()[1])
    return line[mode] + (f" [not stronger because {reasons}]" if reasons else "")


def check_python_tool(unsafe: bool = False) -> str:
    """describe_isolation's line, or SystemExit naming why the Python tool would refuse every call
    and the fix. Call it before training starts, not when RL first calls the tool."""
    line = describe_isolation(unsafe)
    if best_isolation() == "none" and not unsafe:
        raise SystemExit(f"error: {line}. Fix what stops the namespaces mode (python -m sandbox "
                         "says it again), or pass --unsafe_python to run model-written code "
                         "unprotected")
    return line


# --------------------------------------------------------------------------------------------------
# Output and cleanup

def _read_output(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str, bool]:
    """Read the output as it comes, keeping its first and last cap/2 bytes; True if the deadline
    passed."""
    head, tail, total = bytearray(), bytearray(), 0
    fd, poller = proc.stdout.fileno(), select.poll()
    poller.register(fd, select.POLLIN)
    exited = False
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(0 if exited else min(left, 0.05) * 1000):
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # every process of the sandbox closed its output
                return _clip(head, tail, total, cap), False
            total += len(chunk)
            head += chunk[: max(0, cap - len(head))]
            tail = (tail + chunk)[-cap:]
        elif exited:
            # the child exited and the pipe holds nothing more (a grandchild may keep it open)
            return _clip(head, tail, total, cap), False
        else:  # exited (not reaped yet)? Then drain what it wrote just before exiting, and stop
            exited = bool(os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))
    return _clip(head, tail, total, cap), True


def _clip(head: bytearray, tail: bytearray, total: int, cap: int) -> str:
    if total <= cap:
        return head.decode(errors="replace")
    half = cap // 2
    return (head[:half].decode(errors="replace")
            + f"\n... [{total - 2 * half} bytes of output cut] ...\n"
            + tail[len(tail) - half :].decode(errors="replace"))


def _kill_sandbox(proc: subprocess.Popen, groups: list[str]) -> None:
    """SIGKILL the process group (in the namespace modes its PID 1 dies with it, and the kernel
    kills the rest) and, as root, every process of the throwaway uid and of the cgroups; then reap
    the child (last, so that its pid, which is also the group id and fixes the uid, cannot pass to
    another call)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if os.getuid() == 0:
        helper = os.fork()
        if helper == 0:  # as the throwaway user, kill(-1) reaches exactly that user's processes
            try:
                # if this raises, kill(-1) must not run (as root)
                os.setuid(SANDBOX_UID_BASE + proc.pid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
    # if stuck in the kernel, Popen reaps it later
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    proc.stdout.close()
    remove_cgroups(groups)


# --------------------------------------------------------------------------------------------------
# The call's cgroups (as root)

CPU_QUOTA = "100000 100000"  # one CPU per call, however many processes it starts


def cgroup_roots() -> list[str]:
    """Writable cgroup folders for the memory and cpu controllers, within the trainer's own limits
    (a container's, a job scheduler's): v1, the trainer's own cgroups; v2, the deepest cgroup at or
    above the trainer's that hands the memory controller down (v2 allows no child beside
    processes)."""
    own = {}
    with open("/proc/self/cgroup") as f:  # lines "id:controllers:path"; v2's controllers: ""
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own.update(dict.fromkeys(controllers.split(","), path.rstrip("/")))
    if os.path.exists("/sys/fs/cgroup/cgroup.subtree_control"):
        folder = "/sys/fs/cgroup" + own.get("", "")
        while not os.path.isdir(folder):  # e.g. a path from outside a container's view
            folder = os.path.dirname(folder)
        while folder.startswith("/sys/fs/cgroup"):
            with open(f"{folder}/cgroup.subtree_control") as f:
                if "memory" in f.read().split():
                    return [folder] if os.access(folder, os.W_OK) else []
            folder = os.path.dirname(folder)
        return []
    v1 = [f"/sys/fs/cgroup/{c}{own.get(c, '')}" for c in ("memory", "cpu")]
    v1 = [p if os.path.isdir(p) else f"/sys/fs/cgroup/{c}" for c, p in zip(("memory", "cpu"), v1)]
    v1 = [p for p in v1 if os.access(f"{p}/cgroup.procs", os.W_OK)]
    return v1 if v1 and v1[0].startswith("/sys/fs/cgroup/memory") else []


_LEFT: set[str] = set()  # cgroups a call left (a process dying with kernel memory held)


def make_cgroups(memory_mb: int) -> list[str]:
    """New cgroups for one call: memory (with swap) capped at memory_mb, one CPU; [] if cgroups are
    not writable. Removes what earlier calls left first."""
    made, limit = [], str(memory_mb << 20)
    try:
        for root in cgroup_roots():
            sweep_cgroups(root)
            path = os.path.join(root, f"aepo-sandbox-{os.getpid()}-{os.urandom(4).hex()}")
            os.mkdir(path)
            made.append(path)
            for name, value in [("memory.limit_in_bytes", limit),
                                ("memory.memsw.limit_in_bytes", limit),
                                ("memory.max", limit), ("memory.swap.max", "0"),
                                ("cpu.max", CPU_QUOTA), ("cpu.cfs_period_us", CPU_QUOTA.split()[1]),
                                ("cpu.cfs_quota_us", CPU_QUOTA.split()[0])]:
                # the files of this version and controller
                if os.path.exists(os.path.join(path, name)):
                    Path(path, name).write_text(value)
        return made
    except OSError:
        remove_cgroups(made)
        return []


def remove_cgroups(paths: list[str]) -> None:
    """Kill whatever is left in each cgroup, then remove it (a dying process can hold it a few
    ms; one still held after 1 s is left to sweep_cgroups and to the exit)."""
    for path in paths:
        for _ in range(200):
            try:
                os.rmdir(path)
                _LEFT.discard(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                with contextlib.suppress(OSError), open(f"{path}/cgroup.procs") as f:
                    for pid in f.read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.005)
        else:
            _LEFT.add(path)


def sweep_cgroups(root: str) -> None:
    """Remove the call cgroups under root that this process left, or that a trainer no longer
    running left (aepo-sandbox-<pid>-...); those still in use stay."""
    for entry in os.scandir(root):
        pid = entry.name.split("-")[2] if entry.name.startswith("aepo-sandbox-") else ""
        if entry.path in _LEFT or (pid.isdigit() and not os.path.exists(f"/proc/{pid}")):
            with contextlib.suppress(OSError):
                os.rmdir(entry.path)
                _LEFT.discard(entry.path)


@atexit.register
def _remove_left_cgroups() -> None:
    remove_cgroups(sorted(_LEFT))
