"""The Python tool: run model-written code in a fresh, contained interpreter and return its output
as text.

    >>> run_python("1987 - 1962")
    '25'

    python sandbox.py     # which isolation holds here, in one line

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
"""
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

import sandbox_setup as setup

MODES = ("namespaces", "bwrap", "landlock", "none")  # strongest first
SANDBOX_UID_BASE = setup.SANDBOX_UID_BASE
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))
_SETUP_FILE = os.path.join(_THIS_DIR, "sandbox_setup.py")


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
    with tempfile.TemporaryDirectory(prefix="aepo-python-", ignore_cleanup_errors=True) as work:
        os.chmod(work, 0o755)
        groups = make_cgroups(memory_mb) if os.getuid() == 0 and mode != "none" else []
        config = {"code": code, "work": work, "cpu_s": math.ceil(timeout_s) + 1,
                  "memory_mb": memory_mb, "mode": mode, "cgroups": groups,
                  "bwrap": shutil.which("bwrap") or ""}
        try:  # sandbox_setup.py, run as a script, builds the isolation, then runs the code
            proc = subprocess.Popen([sys.executable, "-I", _SETUP_FILE, json.dumps(config)],
                                    cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=setup.SANDBOX_ENV,
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
def best_isolation() -> str:
    """The strongest mode of MODES that runs a probe correctly here (tried once per process,
    ~0.2 s)."""
    for mode in MODES[:-1]:
        if run_python("6 * 7", timeout_s=10, isolation=mode) == "42":
            return mode
    return "none"


def describe_isolation(unsafe: bool = False) -> str:
    """One line for the start of a run: which isolation holds model-written Python code here."""
    mode, root = best_isolation(), os.getuid() == 0
    memory = ("memory and CPU capped per call (cgroups)" if root and cgroup_roots() else
              "memory capped per call (checked every 20 ms)")
    who = "a throwaway uid" if root else "the caller's uid"
    return {"namespaces": "Python sandbox: user namespaces (private root, no network, own IPC and "
                          f"PID), runs as {who}, {memory}",
            "bwrap": "Python sandbox: bubblewrap (private root, no network, own IPC and PID), "
                     f"{memory}",
            "landlock": "Python sandbox: Landlock (files: system read-only, own folder writable; "
                        "no TCP); UDP and Unix sockets on disk stay open",
            "none": "Python sandbox: NO isolation (rlimits only): model-written code runs as "
                    + ("root" if root else "you") + (" (--unsafe_python)" if unsafe else
                                                   "; refused unless --unsafe_python")}[mode]


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
    """Writable cgroup folders for the memory and cpu controllers: v2 at /sys/fs/cgroup, else
    v1's."""
    if os.access("/sys/fs/cgroup/cgroup.subtree_control", os.W_OK):
        with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
            return ["/sys/fs/cgroup"] if "memory" in f.read().split() else []
    v1 = [f"/sys/fs/cgroup/{c}" for c in ("memory", "cpu")
          if os.access(f"/sys/fs/cgroup/{c}/cgroup.procs", os.W_OK)]
    return v1 if v1[:1] == ["/sys/fs/cgroup/memory"] else []


def make_cgroups(memory_mb: int) -> list[str]:
    """New cgroups for one call: memory (with swap) capped at memory_mb, one CPU; [] if cgroups are
    not writable."""
    made, limit = [], str(memory_mb << 20)
    try:
        for root in cgroup_roots():
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
    ms)."""
    for path in paths:
        for _ in range(200):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                time.sleep(0.005)


def _probe_main() -> None:  # python sandbox.py: print the isolation in force
    print(describe_isolation())


if __name__ == "__main__":
    _probe_main()
