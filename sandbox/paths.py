"""Which folders the sandbox's new root holds, and where (standard library only; used by start.py,
before any isolation, and by the package).

The new root binds RO_PATHS and the interpreter's folders (`python_paths`: a venv and its base)
read-only at their own paths, except below the folders the sandbox mounts its own (/tmp, /dev,
/proc): those move below MOVED (`inside`), so `python3 -m venv /tmp/x` runs as
/run/python/tmp/x/bin/python and still finds its pyvenv.cfg.

    >>> inside("/tmp/venv"), inside("/opt/venv")
    ('/run/python/tmp/venv', '/opt/venv')
"""
import os
import sys

RO_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
OWN_MOUNTS = ("/tmp", "/dev", "/proc")  # the sandbox's own; Python found below one moves to MOVED
MOVED = "/run/python"


def throwaway_uid_can_run() -> bool:
    """Whether a uid of no group may run this interpreter where it lies (the namespaces mode opens
    its folders as root first; the other modes cannot)."""
    for path in [os.path.realpath(sys.executable), *python_paths()]:
        while True:
            if not os.stat(path).st_mode & 0o001:
                return False
            if path == "/":
                break
            path = os.path.dirname(path)
    return True


def _below(path: str, folders) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def python_paths() -> list[str]:
    """The interpreter's folders (a venv and its base), real paths, unless under RO_PATHS
    already or inside another of them."""
    paths = {os.path.realpath(p)
             for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    return sorted(p for p in paths if not _below(p, RO_PATHS)
                  and not _below(p, paths - {p}))


def inside(path: str) -> str:
    """Where the new root holds a folder of the interpreter: its own path, or below MOVED if the
    sandbox mounts its own folder there."""
    return MOVED + path if _below(path, OWN_MOUNTS) else path


def inside_python() -> tuple[str, str]:
    """(binary, argv[0]) of the interpreter in the new root: the real binary (a venv's bin/python
    may link to a base that moved) under the venv's own name."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(sys.executable)))
    binary = os.path.realpath(sys.executable)
    return (inside(os.path.dirname(binary)) + "/" + os.path.basename(binary),
            os.path.join(inside(folder), os.path.basename(sys.executable)))


def venv_config() -> tuple[str, str] | None:
    """(path, text) of a pyvenv.cfg to lay over the venv's own, if its `home` (the base
    interpreter) moved below MOVED; else None."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(sys.executable)))
    for path in (os.path.join(folder, "pyvenv.cfg"),
                 os.path.join(os.path.dirname(folder), "pyvenv.cfg")):
        if os.path.isfile(path):
            with open(path) as f:
                lines = f.read().splitlines()
            moved = [f"home = {inside(line.partition('=')[2].strip())}"
                     if line.partition("=")[0].strip() == "home" else line for line in lines]
            return (path, "\n".join(moved) + "\n") if moved != lines else None
    return None


# --------------------------------------------------------------------------------------------------
# Mounts already there

def mount_points(target: str) -> list[str]:
    """target and every mount point below it, parents first (from /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return sorted({p for p in points if p == target or p.startswith(target + "/")}, key=len)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040); no codec import
    here."""
    parts = field.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])
