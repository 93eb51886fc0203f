"""The agent's tools: web search (live, local BM25, cached) and a sandboxed Python interpreter.

A segment the policy generates ends with `<search> query </search>` or `<python> code </python>`
(AEPO.md section 2): `parse_tool_call` extracts the call, a search backend or `run_python` turns it into
text, `result_block` wraps that text for the trajectory. Failures of the outside world (network, rate
limits, timeouts, crashing code) come back as text for the model; nothing here raises into a rollout.
A search backend has `search(query, k) -> str` (the top k snippets: "Page 1: ...\\nPage 2: ...") and int
counters `calls`, `errors` (`CachedSearch` also `hits`, `misses`); error texts start with SEARCH_FAILED.

    >>> parse_tool_call("<think> Age at release? </think> <python> 1987 - 1962 </python>")
    ('python', '1987 - 1962')
    >>> run_python("1987 - 1962")
    '25'
    >>> print(format_results(["Ada Lovelace wrote the first program.", "Born 1815."], snippet_chars=12))
    Page 1: Ada Lovelace
    Page 2: Born 1815.

The sandbox (Linux). Each call runs a fresh interpreter (`-I`) in a new session and a temporary
working directory, with an environment holding nothing of the caller's (no API keys), no_new_privs
(setuid programs gain nothing) and rlimits on CPU time, address space (`memory_mb`), file size (10 MB),
open files, processes and core files. The timeout SIGKILLs the process group; output is read as it
comes, keeping its head and tail. As root, the child runs as a throwaway uid (SANDBOX_UID_BASE + its
pid: owns nothing; fork bombs stop at MAX_PROCESSES) in private mount and network namespaces: no
network; the working directory, /tmp, /var/tmp, /dev/shm and /run/lock are fresh 64 MB tmpfs; folders
closed to others (/root) look empty but for the interpreter; at the end every process of the uid dies.

What the sandbox does NOT protect against:
- Reading world-readable files (code, datasets, maybe evaluation answers) and other processes' command
  lines in /proc; CPU contention with the trainer (MAX_PROCESSES busy processes for up to timeout_s).
- Without root, code runs as the caller's user: it can write and delete that user's files, fill the
  disk, read the caller's environment in /proc/<ppid>/environ, kill the caller, use the network, and
  leave behind a process that calls setsid() and sleeps (busy ones die at their CPU limit).
- As root without CAP_SYS_ADMIN (Docker's default) there are no namespaces: network on, files written
  to /tmp stay, and an interpreter under a closed directory cannot start ("Python sandbox could not
  start"). Kernel exploits are out of scope: for hostile users rather than a confused model, use a VM.
"""
import contextlib
import ctypes
import json
import math
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

# --------------------------------------------------------------------------------------------------
# Tool calls in the trajectory text

TOOL_TAGS = {"search": ("<search>", "</search>"), "python": ("<python>", "</python>")}


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """The call a segment ends with, as (tool, content), or None if it ends without a closing tag.

    The content lies between the LAST opening tag of that tool and the closing tag (as released)."""
    text = text.rstrip()
    for tool, (open_tag, close_tag) in TOOL_TAGS.items():
        if text.endswith(close_tag):
            end = len(text) - len(close_tag)
            start = text.rfind(open_tag, 0, end)
            return None if start < 0 else (tool, text[start + len(open_tag) : end].strip())
    return None


def result_block(output: str) -> str:
    """The text appended after a tool call (the policy never samples it: loss mask 0)."""
    return " <result>\n" + output + "\n</result>"


# --------------------------------------------------------------------------------------------------
# Search

SEARCH_FAILED = "Search failed: "  # every search error text starts so; CachedSearch never caches one
NO_RESULTS = "No results found."


def format_results(snippets: list[str], snippet_chars: int = 1000) -> str:
    """'Page 1: ...\\nPage 2: ...' as released; each snippet on one line, cut to snippet_chars."""
    lines = [line for line in (" ".join(snippet.split())[:snippet_chars] for snippet in snippets) if line]
    return "\n".join(f"Page {i}: {line}" for i, line in enumerate(lines, start=1)) if lines else NO_RESULTS


class BM25Search:
    """Offline BM25 search (bm25s) over {"id", "title", "text"} documents; snippet = "title: text".

    The index is built once, here (10k documents: ~1 s); documents sharing no query word are not returned."""

    def __init__(self, docs: list[dict], snippet_chars: int = 1000):
        import bm25s  # here, not at the top: it pulls in numpy and scipy (~0.2 s), and only BM25 needs them

        if not docs:
            raise ValueError("BM25Search needs at least one document")
        self.docs, self.snippet_chars = docs, snippet_chars
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        texts = [f"{doc['title']} {doc['text']}" for doc in docs]
        self.index = bm25s.BM25()
        self.index.index(self.tokenizer.tokenize(texts, update_vocab=True, show_progress=False), show_progress=False)
        self.lock = threading.Lock()
        self.calls = self.errors = 0

    @classmethod
    def from_jsonl(cls, path: str | Path, snippet_chars: int = 1000) -> "BM25Search":
        """One JSON object with keys id, title, text per line; blank lines are skipped."""
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    docs.append({"id": doc["id"], "title": doc["title"], "text": doc["text"]})
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}, line {line_no}: expected a JSON object with keys id, title, "
                                     f"text ({type(error).__name__}: {error}); fix or delete the line") from None
        return cls(docs, snippet_chars)

    def search(self, query: str, k: int = 10) -> str:
        with self.lock:
            self.calls += 1
            if not query.strip():
                self.errors += 1
                return SEARCH_FAILED + "empty query"
            query_ids = self.tokenizer.tokenize([query], update_vocab=False, show_progress=False)
            rows, scores = self.index.retrieve(query_ids, k=min(k, len(self.docs)), show_progress=False)  # (1, k)
        hits = [self.docs[i] for i, score in zip(rows[0], scores[0]) if score > 0]
        return format_results([f"{doc['title']}: {doc['text']}" for doc in hits], self.snippet_chars)


class WebSearch:
    """Live web search through ddgs (DuckDuckGo and other engines, no API key) with bounded retries.

    A query gets 1 + `retries` attempts, each limited to `timeout_s` by ddgs. Before retry i (from 0) it
    sleeps backoff_s * 2**i, and RATE_LIMIT_FACTOR times longer after a rate limit. `sleep` is
    replaceable so tests need not wait.
    """

    RATE_LIMIT_FACTOR = 4

    def __init__(self, timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 1.0, snippet_chars: int = 1000,
                 sleep: Callable[[float], None] = time.sleep):
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.snippet_chars, self.sleep = snippet_chars, sleep
        self.lock = threading.Lock()
        self.calls = self.errors = 0

    def search(self, query: str, k: int = 10) -> str:
        from ddgs import DDGS  # imported here: `import tools` (and the sandbox's bootstrap) needs only the stdlib
        from ddgs.exceptions import DDGSException, RatelimitException

        with self.lock:
            self.calls += 1
        reason = "empty query"
        for attempt in range(self.retries + 1 if query.strip() else 0):
            try:
                hits = DDGS(timeout=self.timeout_s).text(query, max_results=k)
                return format_results([hit.get("body") or hit.get("title", "") for hit in hits], self.snippet_chars)
            except (DDGSException, OSError) as error:
                if "No results found" in str(error):  # ddgs reports an empty result page as an error
                    return NO_RESULTS
                reason = f"{type(error).__name__}: {error}"
                wait = self.backoff_s * 2**attempt
                wait *= self.RATE_LIMIT_FACTOR if isinstance(error, RatelimitException) else 1
            if attempt < self.retries:
                self.sleep(wait)
        with self.lock:
            self.errors += 1
        return SEARCH_FAILED + reason


class CachedSearch:
    """A JSON file cache {query: result text} in front of any backend: the format of search_cache.json.

    Keys are the exact query string, as released: `k` is not part of the key, so a hit returns what was
    stored whatever k asks for (the released data always used k = 10). A hit never calls the backend;
    error texts are not stored. Each new entry rewrites the whole file atomically (temporary file +
    os.replace) under a lock for the threads of one process; two threads missing one query both search."""

    def __init__(self, backend, path: str | Path):
        self.backend, self.path = backend, Path(path)
        try:
            self.cache: dict[str, str] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        except ValueError as error:
            raise ValueError(f"{self.path}: not a valid search cache ({error}); fix or delete it") from None
        if not isinstance(self.cache, dict):
            raise ValueError(f"{self.path}: expected a JSON object {{query: result text}}; fix or delete it")
        self.lock = threading.Lock()
        self.calls = self.errors = self.hits = self.misses = 0

    def search(self, query: str, k: int = 10) -> str:
        with self.lock:
            self.calls += 1
            if query in self.cache:
                self.hits += 1
                return self.cache[query]
            self.misses += 1
        result = self.backend.search(query, k)  # outside the lock: slow searches run in parallel
        with self.lock:
            if result.startswith(SEARCH_FAILED):
                self.errors += 1
            else:
                self.cache[query] = result
                self._write()
        return result

    def _write(self) -> None:
        """Readers (and a crash) see the old file or the new one, never half of one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.cache, f, ensure_ascii=False, indent=2)
            os.replace(tmp, self.path)
        except OSError as error:  # a full disk must not stop training: the entry stays in memory
            warnings.warn(f"could not write the search cache {self.path}: {error}")


# --------------------------------------------------------------------------------------------------
# Python sandbox

SANDBOX_UID_BASE = 2**30  # as root the child runs as uid SANDBOX_UID_BASE + its pid: unused, unique while it lives
MAX_PROCESSES = 16  # RLIMIT_NPROC, which counts threads
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable; private inside (as root)
_THIS_FILE = os.path.abspath(__file__)
# The child's whole environment (plus HOME and TMPDIR): nothing of the caller's; one thread per numeric library.
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_python(code: str, timeout_s: float = 5.0, max_output_chars: int = 2000, memory_mb: int = 512) -> str:
    """Run `code` in a fresh contained interpreter; return its output, error or a timeout note. Never raises.

    The output is stdout and stderr interleaved, then the repr of a bare last expression (as a REPL prints
    it); an exception adds its traceback without the sandbox's own frame. Beyond max_output_chars (counted
    in UTF-8 bytes) only the head and tail are kept. `memory_mb` caps address space, not resident memory.
    """
    with tempfile.TemporaryDirectory(prefix="aepo-python-", ignore_cleanup_errors=True) as work:
        config = {"code": code, "work": work, "cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb}
        try:  # this file, rerun as a script, is the bootstrap: namespaces, uid, limits, then the code
            proc = subprocess.Popen([sys.executable, "-I", _THIS_FILE, json.dumps(config)], cwd=work,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=SANDBOX_ENV, start_new_session=True)
        except OSError as error:  # e.g. code over the kernel's limit of 128 KiB for one argument
            return f"Python sandbox could not start: {error}"
        output, timed_out = _read_output(proc, time.monotonic() + timeout_s, max_output_chars)
        _kill_sandbox(proc)
    output = output.rstrip("\n")
    note = f"Timed out after {timeout_s:g} s" if timed_out else ""
    if not timed_out and proc.returncode is not None and proc.returncode < 0:  # e.g. SIGXCPU, SIGSEGV
        note = f"Killed by {signal.Signals(-proc.returncode).name}"
    return output + ("\n" if output and note else "") + note


def _read_output(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str, bool]:
    """Read the output as it comes, keeping its first and last cap/2 bytes; True if the deadline passed."""
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
        elif exited:  # the child exited and the pipe holds nothing more (a grandchild may keep it open)
            return _clip(head, tail, total, cap), False
        else:  # exited (not reaped yet)? Then drain what it wrote just before exiting, and stop
            exited = bool(os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))
    return _clip(head, tail, total, cap), True


def _clip(head: bytearray, tail: bytearray, total: int, cap: int) -> str:
    if total <= cap:
        return head.decode(errors="replace")
    half = cap // 2
    return (head[:half].decode(errors="replace") + f"\n... [{total - 2 * half} bytes of output cut] ...\n"
            + tail[len(tail) - half :].decode(errors="replace"))


def _kill_sandbox(proc: subprocess.Popen) -> None:
    """SIGKILL the process group and, as root, every process of the throwaway uid; then reap the child
    (last, so that its pid, which is also the group id and fixes the uid, cannot pass to another call)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if os.getuid() == 0:
        helper = os.fork()
        if helper == 0:  # as the throwaway user, kill(-1) reaches exactly that user's processes
            try:
                os.setuid(SANDBOX_UID_BASE + proc.pid)  # if this raises, kill(-1) must not run (as root)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
    with contextlib.suppress(subprocess.TimeoutExpired):  # if stuck in the kernel, Popen reaps it later
        proc.wait(timeout=2)
    proc.stdout.close()


# The child's last stage, as the sandbox user: the code as a script, then a bare last expression's repr.
_RUNNER = """
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


def _sandbox_main(config: dict) -> None:
    """The bootstrap, run in the child as the caller: namespaces and uid (as root), limits, exec."""
    work, root = config["work"], os.getuid() == 0
    uid = SANDBOX_UID_BASE + os.getpid() if root else os.getuid()
    if root:
        os.chown(work, uid, uid)
        _private_mounts(work, uid)
    processes = MAX_PROCESSES + (0 if root else _count_threads(uid))  # NPROC counts all the user's threads
    for limit, value in [(resource.RLIMIT_CPU, config["cpu_s"]), (resource.RLIMIT_AS, config["memory_mb"] << 20),
                         (resource.RLIMIT_FSIZE, 10 << 20), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]:
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs gain no privileges
    if root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(work)
    os.execve(sys.executable, [sys.executable, "-I", "-u", "-c", _RUNNER, config["code"]],
              {**SANDBOX_ENV, "HOME": work, "TMPDIR": work})


def _private_mounts(work: str, uid: int) -> None:
    """As root: own mount and network namespaces; fresh tmpfs where the code may write or must not look.

    The topmost closed (not world-searchable) ancestor of each interpreter prefix gets an empty tmpfs and
    the prefix is bind-mounted back at its own path: the interpreter runs unchanged, the rest of /root
    is out of sight. Skipped where unshare is not permitted."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
        args = [None if arg is None else os.fsencode(arg) for arg in (source, target, fstype, data)]
        if libc.mount(*args[:3], flags, args[3]) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")

    if libc.unshare(0x20000 | 0x40000000) != 0:  # CLONE_NEWNS | CLONE_NEWNET
        return
    MS_NOSUID_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2 | 4, 4096, 16384, 1 << 18
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    prefixes = {path: os.open(path, os.O_PATH) for path in {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}}
    closed = {next((str(p) for p in reversed(Path(path).parents) if not p.stat().st_mode & stat.S_IXOTH), None)
              for path in prefixes} - {None}  # the topmost closed ancestor of each prefix
    for target in sorted(closed | set(SCRATCH_DIRS)):  # parents before children
        if os.path.isdir(target):
            mode = "755" if target in closed else "1777"
            mount("tmpfs", target, "tmpfs", MS_NOSUID_NODEV, f"size=64m,mode={mode}")
    os.umask(0o022)
    for path, fd in prefixes.items():
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    os.makedirs(work, exist_ok=True)
    mount("tmpfs", work, "tmpfs", MS_NOSUID_NODEV, f"size=64m,mode=700,uid={uid},gid={uid}")


def _count_threads(uid: int) -> int:
    """Threads of all processes of `uid`: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(f"{entry.path}/task"))
        except OSError:  # the process just ended
            pass
    return count


if __name__ == "__main__":  # run_python's bootstrap
    try:
        _sandbox_main(json.loads(sys.argv[1]))
    except (OSError, ValueError) as error:
        print(f"Python sandbox could not start: {error}")
        sys.exit(1)
