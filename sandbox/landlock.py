"""Landlock (Linux >= 5.13, no privilege needed): the sandbox's fallback where namespaces are
refused.

`restrict(read_dirs, devices, work)` limits the calling process and everything it starts, for good:
read and execute below read_dirs, read and write the devices, anything below work, nothing else on
any file system (so no /proc of other processes, no home, no checkout). From kernel ABI 4 on, TCP
bind and connect are refused; from ABI 6 on, signals and abstract Unix sockets to processes outside
the sandbox are refused too. UDP and Unix sockets on disk are NOT covered.
"""
import ctypes
import os

# the same syscall numbers on every architecture
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
RULE_PATH_BENEATH, CREATE_RULESET_VERSION = 1, 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
libc = ctypes.CDLL(None, use_errno=True)


class PathBeneath(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is packed
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI (0: none)."""
    return max(0, libc.syscall(CREATE_RULESET, None, ctypes.c_size_t(0), CREATE_RULESET_VERSION))


def handled_fs(abi: int) -> int:
    """Every file-system right this ABI knows: 13 in ABI 1, then REFER (2), TRUNCATE (3),
    IOCTL_DEV (5)."""
    bits = (1 << 13) - 1
    return (bits | (1 << 13 if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
            | (IOCTL_DEV if abi >= 5 else 0))


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"landlock {what}: {os.strerror(errno)}")
    return result


def restrict(read_dirs: list[str], devices: list[str], work: str) -> None:
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available in this kernel")
    fs = handled_fs(abi)
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # fs, TCP, scopes
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(libc.syscall(CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
                     "create_ruleset")
    file_rights = (READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV) & fs
    try:
        for paths, rights in [(read_dirs, EXECUTE | READ_FILE | READ_DIR), (devices, file_rights),
                              ([work], fs)]:
            for path in paths:
                if not os.path.exists(path):
                    continue
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = PathBeneath(rights if os.path.isdir(path)
                                       else rights & file_rights | EXECUTE & rights, fd)
                    _check(libc.syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH,
                                        ctypes.byref(rule), 0), f"rule {path}")
                finally:
                    os.close(fd)
        _check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # required before restrict_self
        _check(libc.syscall(RESTRICT_SELF, ruleset, 0), "restrict_self")
    finally:
        os.close(ruleset)
