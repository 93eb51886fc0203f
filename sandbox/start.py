"""The start of one sandboxed Python call, run as a script by sandbox.run_python: isolation, limits,
code.

    python -I sandbox/start.py '{"code": "6 * 7", "work": "/tmp/x", "mode": "namespaces", ...}'

Standard library only: this runs in a fresh interpreter, as the caller, before any limit is set.
1. Stage 1 (the caller's pid): join the call's cgroups (as root), set rlimits, then by mode:
   namespaces: unshare user, mount, network, IPC, PID and UTS namespaces, map one uid
   (the caller's; as root a throwaway one), fork PID 1 of the new PID namespace, wait for it and
   pass on its exit status; bwrap: run `bwrap` with the same layout, which runs this file again
   inside ("bwrap-inside": fork the runner, watch the call's memory); landlock: restrict itself to a
   few folders; none: nothing.
2. PID 1 (namespaces) builds the new root (read-only binds, tmpfs, /proc, devices), pivots into it,
   forks the runner and watches the call's memory until the runner ends; when PID 1 exits, the
   kernel kills every process left in its namespace.
3. The runner switches to the sandbox uid (exec then leaves it no capability), joins a new session
   keyring, installs the seccomp filter of seccomp.py (every mode) and execs the
   interpreter.
Where the new root holds the interpreter (a venv under /tmp runs from /run/python): paths.py.
"""
import ctypes
import json
import os
import platform
import resource
import select
import signal
import sys

if __package__:  # imported as sandbox.start: the package reads the constants below
    from sandbox import landlock, paths, seccomp
else:  # run as a script by path, in a fresh interpreter whose -I left this folder off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import landlock
    import paths
    import seccomp

# as root the code runs as uid SANDBOX_UID_BASE + pid: unused, unique while it lives
SANDBOX_UID_BASE = 2**30
MAX_PROCESSES = 16  # RLIMIT_NPROC, which counts threads
SCRATCH_MB = 64  # the tmpfs of /tmp (the working directory) and of /dev/shm
# files and folders in each: without a cap, empty files cost kernel memory no size limit sees
SCRATCH_INODES = 8192
INODE_BYTES = 2048  # what the memory watch charges per file (inode and dentry, measured ~1.5 KB)
DEVICES = ("null", "zero", "full", "random", "urandom")
# The child's whole environment (plus HOME and TMPDIR): nothing of the caller's; one thread per
# numeric library.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
MEMORY_POLL_S = 0.02  # PID 1 sums the call's memory this often (where no cgroup caps it)
PAGE = os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL(None, use_errno=True)

# The runner, as the sandbox user: the code as a script, then a bare last expression's repr.
RUNNER = """
import ast, linecache, sys, traceback
source = sys.argv[1]
linecache.cache["<python>"] = (len(source), None, source.splitlines(True), "<python>")
scope = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    tree = ast.parse(source, "<python>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<python>", "exec"), scope)
    value = None if last is None else eval(compile(ast.Expression(last.value), "<python>", "eval"), scope)
    if value is not None:
        print(repr(value))
except Exception as error:  # its traceback without this runner's frame; none for a syntax error
    frames = None if isinstance(error, SyntaxError) else error.__traceback__.tb_next
    traceback.print_exception(type(error), error, frames)
    sys.exit(1)
"""


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------
# Stage 1

def main(config: dict) -> None:
    mode, root = config["mode"], os.getuid() == 0
    if mode == "bwrap-inside":  # stage 2 of the bwrap mode, inside its namespaces: watch the runner
        # counted in bwrap's new user namespace: its PID 1, this one, the code's
        limit = MAX_PROCESSES + 2
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        supervise(fork_runner(config, None, None), config["memory_mb"])
    config["python"] = paths.inside_python()  # the interpreter as the new root holds it
    for group in config["cgroups"]:  # first: every process of the call is charged to them
        _write(os.path.join(group, "cgroup.procs"), str(os.getpid()))
    uid = SANDBOX_UID_BASE + os.getpid() if root else os.getuid()
    gid = uid if root else os.getgid()
    set_limits(config)
    if mode == "namespaces":
        namespaces(config, uid, gid)
    work, env = config["work"], {**SANDBOX_ENV, "HOME": config["work"], "TMPDIR": config["work"]}
    if root and mode in ("bwrap", "landlock") and not paths.throwaway_uid_can_run():
        raise OSError(f"the throwaway uid cannot reach the interpreter {sys.executable} (a folder "
                      "above it is closed to other users, e.g. /root): only the namespaces mode "
                      "can run it; or install Python where other users may read it")
    # else none runs as root, as it says
    if root and (mode != "none" or paths.throwaway_uid_can_run()):
        os.chown(work, uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if mode == "bwrap":
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        child = os.fork()
        if child == 0:
            os.execve(config["bwrap"], bwrap_argv(config),
                      {**SANDBOX_ENV, "HOME": "/tmp", "TMPDIR": "/tmp"})
        relay(child)
    # NPROC counts all the user's threads
    processes = MAX_PROCESSES + (0 if root else count_threads(uid))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    if mode == "landlock":
        landlock.restrict([*paths.RO_PATHS, *paths.python_paths()],
                          [f"/dev/{d}" for d in DEVICES], work)
    run_code(config["code"], work, env)


def set_limits(config: dict) -> None:
    for limit, value in [(resource.RLIMIT_CPU, config["cpu_s"]),
                         (resource.RLIMIT_AS, config["memory_mb"] << 20),
                         (resource.RLIMIT_FSIZE, 10 << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)]:
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def run_code(code: str, work: str, env: dict, python: tuple = (sys.executable,) * 2) -> None:
    """Exec python = (binary, argv[0]) on the code (a venv's Python finds its pyvenv.cfg from
    argv[0])."""
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid programs gain no privileges
    seccomp.join_new_session_keyring()
    seccomp.restrict()
    os.chdir(work)
    os.execve(python[0], [python[1], "-I", "-u", "-c", RUNNER, code], env)


def count_threads(uid: int) -> int:
    """Threads of all processes of `uid`: what RLIMIT_NPROC counts outside a new user namespace."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(f"{entry.path}/task"))
        except OSError:  # the process just ended
            pass
    return count


def bwrap_argv(config: dict) -> list[str]:
    argv = [config["bwrap"], "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for path in paths.RO_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for path in paths.python_paths():
        argv += ["--ro-bind", path, paths.inside(path)]
    if moved := paths.venv_config():
        _write(os.path.join(config["work"], "pyvenv.cfg"), moved[1])
        argv += ["--ro-bind", os.path.join(config["work"], "pyvenv.cfg"), paths.inside(moved[0])]
    here = os.path.dirname(os.path.abspath(__file__))  # these files, to watch the call from inside
    for name in ("start.py", "seccomp.py", "landlock.py", "paths.py"):
        argv += ["--ro-bind", os.path.join(here, name), f"/run/aepo/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(SCRATCH_MB << 20), "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp"]
    return argv + ["--", config["python"][0], "-I", "/run/aepo/start.py",
                   json.dumps({**config, "mode": "bwrap-inside", "cgroups": []})]


# --------------------------------------------------------------------------------------------------
# Namespaces (stage 1, then PID 1, then the runner)

def namespaces(config: dict, uid: int, gid: int) -> None:
    """Never returns: stage 1 exits as PID 1 exits (a signal death passes on as the same signal)."""
    if os.getuid() == 0:
        os.setgroups([])
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWUTS
    ready, go = os.pipe()
    # only a process outside may map a uid not its own
    helper = os.fork() if os.getuid() == 0 else 0
    if os.getuid() == 0 and helper == 0:
        os.read(ready, 1)
        write_maps(os.getppid(), uid, gid)
        os._exit(0)
    _check(libc.unshare(flags), "unshare")
    if helper:
        os.write(go, b"x")
        if os.waitstatus_to_exitcode(os.waitpid(helper, 0)[1]) != 0:
            raise OSError("could not map the sandbox's uid into its user namespace")
    else:
        write_maps(os.getpid(), uid, gid)  # the caller's own uid: allowed without privilege
    limit = MAX_PROCESSES + 2  # counted in the new user namespace: stage 1, PID 1, then the code's
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    init = os.fork()
    if init == 0:
        try:
            pid1(config, uid, gid)
        except BaseException as error:
            print(f"Python sandbox could not start: {error}", flush=True)
        os._exit(1)
    relay(init)


def relay(child: int) -> None:
    """Wait for the child and exit as it did: a code 128 + n (PID 1 cannot die of a signal it sends
    itself) becomes death by signal n, which run_python reports."""
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    code = 128 - code if code < 0 else code
    if code > 128:
        if code - 128 not in (signal.SIGKILL, signal.SIGSTOP):  # their handlers cannot change
            signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    os._exit(code)


def write_maps(pid: int, uid: int, gid: int) -> None:
    """Map one uid and gid (the caller's, or as root the throwaway one) into pid's new user
    namespace."""
    if os.getuid() != 0:
        _write(f"/proc/{pid}/setgroups", "deny")  # required before an unprivileged gid_map
    _write(f"/proc/{pid}/uid_map", f"{uid} {uid} 1")
    _write(f"/proc/{pid}/gid_map", f"{gid} {gid} 1")


def pid1(config: dict, uid: int, gid: int) -> None:
    # stage 1 killed (timeout): PID 1 and all dies
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    new_root = config["work"]
    build_root(new_root, uid, gid)
    os.chdir(new_root)
    pivot_root = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), 155)
    _check(libc.syscall(pivot_root, b".", b"."), "pivot_root")
    # MNT_DETACH: the host's tree is gone from here
    _check(libc.umount2(b".", 2), "umount old root")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/tmp")
    for path, value in [("user/max_user_namespaces", 0),
                        ("kernel/shmall", config["memory_mb"] << 8),
                        ("kernel/shmmax", config["memory_mb"] << 20), ("kernel/msgmni", 16)]:
        # no nested namespaces; SysV memory within the call's budget (it dies with the IPC
        # namespace), and 16 message queues of 16 KB (32000 by default: 500 MB of kernel memory)
        try:
            _write(f"/proc/sys/{path}", str(value))
        except OSError:
            pass
    supervise(fork_runner(config, uid, gid), config["memory_mb"])


def fork_runner(config: dict, uid: int | None, gid: int | None) -> int:
    runner = os.fork()
    if runner == 0:
        if uid is not None:
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        run_code(config["code"], "/tmp", {**SANDBOX_ENV, "HOME": "/tmp", "TMPDIR": "/tmp"},
                 config["python"])
    return runner


def supervise(runner: int, memory_mb: int) -> None:
    """Reap orphans until the runner ends, then exit as it did; meanwhile watch the call's
    memory."""
    while True:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == runner:
            signalled = os.WIFSIGNALED(status)
            os._exit(128 + os.WTERMSIG(status) if signalled else os.waitstatus_to_exitcode(status))
        if pid == 0 and memory_used() > memory_mb << 20:
            print("Memory limit exceeded: this call's processes, files and shared memory held "
                  f"more than {memory_mb} MB", flush=True)
            os.kill(-1, signal.SIGKILL)  # every process of the namespace but PID 1
            os._exit(128 + signal.SIGKILL)
        if pid == 0:
            select.select([], [], [], MEMORY_POLL_S)


def memory_used() -> int:
    """Bytes held by the namespace: resident memory of its processes, its tmpfs files, SysV
    segments."""
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and name not in ("1", str(os.getpid())):
            try:
                with open(f"/proc/{name}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE
            except (OSError, IndexError):  # the process just ended
                pass
    for path in ("/tmp", "/dev/shm"):  # the files' pages, and their inodes (bwrap sets no cap)
        stats = os.statvfs(path) if os.path.isdir(path) else None
        total += ((stats.f_blocks - stats.f_bfree) * stats.f_frsize
                  + (stats.f_files - stats.f_ffree) * INODE_BYTES) if stats else 0
    with open("/proc/sysvipc/shm") as f:  # columns: ... size ... rss swap; rss is in bytes
        header = f.readline().split()
        total += sum(int(line.split()[header.index("rss")]) for line in f if line.strip())
    return total


def build_root(new_root: str, uid: int, gid: int) -> None:
    """A tmpfs at new_root with read-only binds of RO_PATHS and the interpreter, /tmp, /dev, /proc.

    As root, PID 1 is uid 0 outside but unmapped inside: it opens what it binds first
    (the interpreter may lie under /root), then creates files as the sandbox uid (one unmapped
    inside cannot)."""
    os.umask(0o022)
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC)
               for path in [*paths.RO_PATHS, *paths.python_paths()]
               if os.path.isdir(path) and not os.path.islink(path)}
    moved = paths.venv_config()
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, f"size=1m,mode=755,uid={uid},gid={gid}")
    for path in [*paths.RO_PATHS, *paths.python_paths()]:
        target = new_root + paths.inside(path)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif path in sources:
            os.makedirs(target, exist_ok=True)
            mount(f"/proc/self/fd/{sources[path]}", target, None, MS_BIND | MS_REC)
            # each submount too; keep the flags the kernel locks
            for point in paths.mount_points(target):
                flags = mount_flags(point)
                mount(None, point, None,
                      MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | flags)
    if moved:  # the venv's pyvenv.cfg, naming its base interpreter where it moved
        _write(new_root + "/run/pyvenv.cfg", moved[1])
        mount(new_root + "/run/pyvenv.cfg", new_root + paths.inside(moved[0]), None, MS_BIND)
    for path in ("/tmp", "/dev/shm"):
        os.makedirs(new_root + path)
        mount("tmpfs", new_root + path, "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={SCRATCH_MB}m,nr_inodes={SCRATCH_INODES},mode=1777,uid={uid},gid={gid}")
    for device in DEVICES:
        open(f"{new_root}/dev/{device}", "w").close()
        mount(f"/dev/{device}", f"{new_root}/dev/{device}", None, MS_BIND)
    for name, target in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")]:
        os.symlink(target, f"{new_root}/dev/{name}")
    os.makedirs(new_root + "/proc")
    # refused where the host's /proc has parts masked (containers): then the code gets no /proc
    try:
        mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
    for fd in sources.values():
        os.close(fd)


def mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
    args = [None if arg is None else os.fsencode(arg) for arg in (source, target, fstype, data)]
    _check(libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]), f"mount {target}")


def mount_flags(point: str) -> int:
    """The flags of a mount that a user namespace may not change (MS_* from statvfs's ST_*)."""
    flag = os.statvfs(point).f_flag
    st_to_ms = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, 1024: 1024,
                2048: 2048, 4096: 1 << 21}  # ST_NOATIME, ST_NODIRATIME, ST_RELATIME -> MS_RELATIME
    return sum(ms for st, ms in st_to_ms.items() if flag & st)

if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (OSError, ValueError) as error:
        print(f"Python sandbox could not start: {error}")
        sys.exit(1)
