"""The system calls no sandbox mode needs, refused in every mode by a seccomp filter (standard
library only; start.py installs it just before it runs the code).

`restrict()` limits the calling process and everything it starts, for good (no_new_privs must be
set). Refused, with EPERM unless said otherwise:
- the kernel keyrings (add_key, request_key, keyctl): the code inherits the trainer's session
  keyring, and a key added in one call would outlive it; `join_new_session_keyring()` also drops
  the inherited one first, as container runtimes do;
- memfd_create and memfd_secret: their pages are no file of the call's tmpfs and need not be
  mapped, so the whole-call memory watch could not see them; userfaultfd and io_uring (which
  creates sockets without socket());
- AF_VSOCK sockets (EAFNOSUPPORT: a VM's host services) and MPTCP (EPROTONOSUPPORT: TCP that
  Landlock's TCP rules do not see);
- changes to another process's limits, priority or scheduling (prlimit64, setpriority,
  sched_setaffinity/param/scheduler/attr, ioprio_set with a pid other than 0, or a whole user's or
  process group's processes): Landlock leaves them open, and there the trainer is the code's
  parent.
On an architecture other than x86-64 and AArch64 nothing is installed (`supported()` says so);
calls of a foreign ABI on these (x32, i386) are refused whole.
"""
import ctypes
import platform

# seccomp_data: int nr, u32 arch, u64 ip, u64 args[6] (the low 32 bits first: little endian)
NR, ARCH = 0, 4
ARG = [16 + 8 * i for i in range(6)]
LD_W_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT, EPROTONOSUPPORT = 1, 38, 97, 93
AF_VSOCK, IPPROTO_MPTCP = 40, 262
PRIO_PGRP, IOPRIO_WHO_USER = 1, 3
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
KEYCTL_JOIN_SESSION_KEYRING = 1

# audit arch, then the numbers of the calls the filter looks at
SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, socket=41, setpriority=141, sched_setparam=142,
                   sched_setscheduler=144, sched_setaffinity=203, add_key=248, request_key=249,
                   keyctl=250, ioprio_set=251, prlimit64=302, sched_setattr=314, memfd_create=319,
                   userfaultfd=323, memfd_secret=447),
    "aarch64": dict(arch=0xC00000B7, socket=198, setpriority=140, sched_setparam=118,
                    sched_setscheduler=119, sched_setaffinity=122, add_key=217, request_key=218,
                    keyctl=219, ioprio_set=30, prlimit64=261, sched_setattr=274, memfd_create=279,
                    userfaultfd=282, memfd_secret=447),
}
IO_URING = (425, 426, 427)  # setup, enter, register: the same numbers on both
REFUSED = ("add_key", "request_key", "keyctl", "memfd_create", "memfd_secret", "userfaultfd")
OWN_PID_ONLY = ("prlimit64", "sched_setparam", "sched_setscheduler", "sched_setaffinity",
                "sched_setattr")
libc = ctypes.CDLL(None, use_errno=True)


class Instruction(ctypes.Structure):  # struct sock_filter
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class Program(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]


def supported() -> bool:
    return platform.machine() in SYSCALLS


def _load(offset: int) -> tuple:
    return (LD_W_ABS, 0, 0, offset)


def _jump(op: int, k: int, if_true: int, if_false: int) -> tuple:
    return (op, if_true, if_false, k)


def _ret(action: int, errno: int = 0) -> tuple:
    return (RET, 0, 0, action | errno)


def _own_only(arg: int) -> list:
    """Allow only when argument `arg` (a pid or who) is 0: the caller itself."""
    return [_load(ARG[arg]), _jump(JEQ, 0, 0, 1), _ret(ALLOW), _ret(ERRNO, EPERM)]


def program(machine: str) -> list[tuple]:
    """The filter as (code, jt, jf, k) instructions, in order."""
    nr = SYSCALLS[machine]
    prog = [_load(ARCH), _jump(JEQ, nr["arch"], 1, 0), _ret(ERRNO, ENOSYS), _load(NR)]
    if machine == "x86_64":  # the x32 ABI: the same calls with bit 30 set
        prog += [_jump(JGE, 0x40000000, 0, 1), _ret(ERRNO, ENOSYS)]
    for number in [nr[name] for name in REFUSED] + list(IO_URING):
        prog += [_jump(JEQ, number, 0, 1), _ret(ERRNO, EPERM)]
    blocks = {name: _own_only(0) for name in OWN_PID_ONLY}
    blocks["socket"] = [_load(ARG[0]), _jump(JEQ, AF_VSOCK, 0, 1), _ret(ERRNO, EAFNOSUPPORT),
                        _load(ARG[2]), _jump(JEQ, IPPROTO_MPTCP, 0, 1),
                        _ret(ERRNO, EPROTONOSUPPORT), _ret(ALLOW)]
    # setpriority(which, who): a user's processes (PRIO_USER) never, else only who = 0 (itself)
    blocks["setpriority"] = [_load(ARG[0]), _jump(JGE, PRIO_PGRP + 1, 0, 1), _ret(ERRNO, EPERM),
                             *_own_only(1)]
    blocks["ioprio_set"] = [_load(ARG[0]), _jump(JEQ, IOPRIO_WHO_USER, 0, 1), _ret(ERRNO, EPERM),
                            *_own_only(1)]
    for name, block in blocks.items():  # each block ends in a return
        prog += [_jump(JEQ, nr[name], 0, len(block)), *block]
    return prog + [_ret(ALLOW)]


def restrict() -> None:
    """Install the filter on the calling thread (and all it starts); OSError if the kernel
    refuses."""
    if not supported():
        return
    prog = program(platform.machine())
    instructions = (Instruction * len(prog))(*[Instruction(*ins) for ins in prog])
    fprog = Program(len(prog), instructions)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"seccomp filter refused ({errno})")


def join_new_session_keyring() -> None:
    """Leave the inherited session keyring for a new, empty, anonymous one (best effort)."""
    if supported():
        libc.syscall(SYSCALLS[platform.machine()]["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, None)
