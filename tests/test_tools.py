"""Tests of tools.py: tool-call parsing, the search backends and cache, and the Python sandbox. Offline.

The tests named test_hostile_* run hostile code in the sandbox and check the host afterwards; each
must come back within its timeout + 2 s. Some protections exist only when the tests run as root (the
sandbox then switches to a throwaway uid and private namespaces); those tests skip otherwise, and the
module docstring of tools.py says what a non-root sandbox leaves open.
"""
import ast
import doctest
import json
import os
import resource
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ddgs
import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

import tools
from tools import (NO_RESULTS, SEARCH_FAILED, BM25Search, CachedSearch, WebSearch, format_results, parse_tool_call,
                   result_block, run_python)

ROOT = Path(tools.__file__).resolve().parent
IS_ROOT = os.getuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="without root the sandbox runs as the caller's user (see tools.py)")


def test_docstring_examples():
    assert doctest.testmod(tools).failed == 0


# --------------------------------------------------------------------------------------------------
# Tool calls

@pytest.mark.parametrize("text, expected", [
    ("<think> hm </think> <search> capital of Florin </search>", ("search", "capital of Florin")),
    ("<python>\nprint(1)\n</python>\n  ", ("python", "print(1)")),
    ("<search> a </search> <result>\nPage 1: x\n</result> <search> b </search>", ("search", "b")),
    ("I could write <python> or <python>x = 1\nx</python>", ("python", "x = 1\nx")),
    ("<search> inside <python> 1 + 1 </python>", ("python", "1 + 1")),
    ("no opening tag </search>", None),
    ("<search> never closed", None),
    ("<search> q </search> and then more text", None),
    ("", None),
])
def test_parse_tool_call(text, expected):
    assert parse_tool_call(text) == expected


def test_result_block():
    assert result_block("Page 1: x") == " <result>\nPage 1: x\n</result>"


# --------------------------------------------------------------------------------------------------
# Search

def test_format_results_cuts_each_snippet_and_keeps_one_line_each():
    text = format_results(["a" * 30, "two\nlines  here", "   "], snippet_chars=10)
    assert text == "Page 1: aaaaaaaaaa\nPage 2: two lines "
    assert format_results([]) == NO_RESULTS == "No results found."


DOCS = [
    {"id": "1", "title": "Zorblax Quint", "text": "Zorblax Quint is a river that flows through the Vell valley."},
    {"id": "2", "title": "Florin", "text": "Florin is a kingdom whose capital is Guilder Harbour."},
    {"id": "3", "title": "Mirella Vantworth", "text": "Mirella Vantworth composed the Ninth Lantern Suite in 1873."},
    {"id": "4", "title": "Lantern festival", "text": "A festival of lanterns held every spring in Guilder Harbour."},
]


@pytest.fixture(scope="module")
def bm25():
    return BM25Search(DOCS, snippet_chars=60)


@pytest.mark.parametrize("query, title", [
    ("Who composed the Ninth Lantern Suite?", "Mirella Vantworth"),
    ("Zorblax Quint river", "Zorblax Quint"),
    ("capital of Florin", "Florin"),
])
def test_bm25_ranks_the_named_entity_first(bm25, query, title):
    assert bm25.search(query, k=2).startswith(f"Page 1: {title}: ")


def test_bm25_result_format_and_misses(bm25):
    text = bm25.search("Guilder Harbour", k=10)
    assert len(text.splitlines()) == 2 and all(len(line) <= len("Page 1: ") + 60 for line in text.splitlines())
    assert bm25.search("qwxyz unknownword") == NO_RESULTS
    assert bm25.search("the of a ???") == NO_RESULTS
    errors = bm25.errors
    assert bm25.search("   ").startswith(SEARCH_FAILED) and bm25.errors == errors + 1


def test_bm25_from_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n\n")
    assert BM25Search.from_jsonl(path).search("Zorblax").startswith("Page 1: Zorblax Quint")
    lines = [json.dumps(DOCS[0]), json.dumps(DOCS[1]), '{"id": "3", "title": "no text"}', json.dumps(DOCS[3])]
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"corpus\.jsonl, line 3: .*KeyError"):
        BM25Search.from_jsonl(path)
    path.write_text(json.dumps(DOCS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl, line 2"):
        BM25Search.from_jsonl(path)


class FakeBackend:
    """Answers "result for <query>"; queries starting with "fail" give an error text."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s, self.calls, self.errors = delay_s, 0, 0

    def search(self, query: str, k: int = 10) -> str:
        self.calls += 1
        time.sleep(self.delay_s)
        if query.startswith("fail"):
            self.errors += 1
            return SEARCH_FAILED + "DDGSException: offline"
        return f"Page 1: result for {query}"


def test_cache_round_trip_and_errors_not_cached(tmp_path):
    path, backend = tmp_path / "sub" / "cache.json", FakeBackend()
    cache = CachedSearch(backend, path)
    assert cache.search("Amy Smart") == cache.search("Amy Smart", k=3) == "Page 1: result for Amy Smart"
    assert (backend.calls, cache.calls, cache.hits, cache.misses) == (1, 2, 1, 1)
    assert cache.search("fail once").startswith(SEARCH_FAILED) and cache.search("fail once").startswith(SEARCH_FAILED)
    assert (backend.calls, cache.errors) == (3, 2)
    assert json.loads(path.read_text()) == {"Amy Smart": "Page 1: result for Amy Smart"}
    reloaded = CachedSearch(FakeBackend(), path)
    assert reloaded.search("Amy Smart") == "Page 1: result for Amy Smart" and reloaded.backend.calls == 0
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temporary files left


def test_cache_concurrent_writes_keep_valid_json(tmp_path):
    path = tmp_path / "cache.json"
    cache = CachedSearch(FakeBackend(delay_s=0.001), path)
    threads = [threading.Thread(target=lambda t=t: [cache.search(f"q{t}-{i}") for i in range(25)]) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(json.loads(path.read_text())) == 200
    assert (cache.calls, cache.misses, cache.hits, cache.errors) == (200, 200, 0, 0)


def test_cache_rejects_a_broken_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text('{"q": "Page 1')
    with pytest.raises(ValueError, match="cache.json: not a valid search cache"):
        CachedSearch(FakeBackend(), path)


def test_released_cache_is_served_without_backend_calls(arpo_data, tmp_path):
    path = tmp_path / "search_cache.json"
    shutil.copy(arpo_data / "search_cache.json", path)  # a copy: a miss would write to the file
    released = json.loads(path.read_text())
    backend = FakeBackend()
    cache = CachedSearch(backend, path)
    query = "Amy Smart film debut Campfire Tales"
    assert cache.search(query) == released[query] and released[query].startswith("Page 1: ")
    assert (backend.calls, cache.hits, cache.misses) == (0, 1, 0)


def fake_ddgs(monkeypatch, error: Exception | None = None, hits: list[dict] | None = None) -> list:
    """Replace ddgs.DDGS; returns the list of (timeout, query, max_results) of its calls."""
    calls = []

    class FakeDDGS:
        def __init__(self, timeout):
            self.timeout = timeout

        def text(self, query, max_results):
            calls.append((self.timeout, query, max_results))
            if error is not None:
                raise error
            return hits

    monkeypatch.setattr(ddgs, "DDGS", FakeDDGS)
    return calls


@pytest.mark.parametrize("error, waits", [
    (DDGSException("DNSError: no records"), [0.5, 1.0]),
    (TimeoutException("timed out"), [0.5, 1.0]),
    (RatelimitException("202 Ratelimit"), [2.0, 4.0]),
])
def test_web_search_failures_become_text_after_bounded_retries(monkeypatch, error, waits):
    calls, sleeps = fake_ddgs(monkeypatch, error=error), []
    search = WebSearch(timeout_s=3.0, retries=2, backoff_s=0.5, sleep=sleeps.append)
    text = search.search("Amy Smart", k=7)
    assert text == f"{SEARCH_FAILED}{type(error).__name__}: {error}"
    assert calls == [(3.0, "Amy Smart", 7)] * 3 and sleeps == waits
    assert (search.calls, search.errors) == (1, 1)


def test_web_search_results_empty_pages_and_empty_queries(monkeypatch):
    calls = fake_ddgs(monkeypatch, hits=[{"title": "T", "href": "u", "body": "b" * 20}, {"title": "only title"}])
    search = WebSearch(snippet_chars=5, sleep=pytest.fail)
    assert search.search("q") == "Page 1: bbbbb\nPage 2: only "
    fake_ddgs(monkeypatch, error=DDGSException("No results found."))
    assert search.search("q") == NO_RESULTS  # not an error, and not retried (sleep would fail the test)
    assert search.search("  \n").startswith(SEARCH_FAILED) and len(calls) == 1
    assert (search.calls, search.errors) == (3, 1)


# --------------------------------------------------------------------------------------------------
# Python sandbox: ordinary code

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
    assert run_python("if True:\nprint(1)").endswith("IndentationError: expected an indented block after 'if' "
                                                       "statement on line 1")
    assert run_python("import sys\nsys.exit(3)") == ""
    assert run_python("input()").endswith("EOFError: EOF when reading a line")


def test_run_python_working_directory_is_writable_and_removed_afterwards():
    text = run_python("import os\nopen('notes.txt', 'w').write('hi')\nprint(os.getcwd())\nopen('notes.txt').read()")
    folder, content = text.splitlines()
    assert content == "'hi'" and not Path(folder).exists()


def test_run_python_caps_output_keeping_head_and_tail():
    text = run_python("for i in range(1000):\n    print(f'line {i:04d}')", max_output_chars=100)
    assert text.startswith("line 0000\n") and text.endswith("line 0999")
    assert "bytes of output cut" in text and len(text) < 100 + 50


def test_run_python_in_parallel_threads():  # rollouts run tool calls in parallel
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"import os\n{i} * 10, os.getuid()"), range(4)))
    assert all(text.startswith("(") for text in results), results
    values = [ast.literal_eval(text) for text in results]
    assert [value[0] for value in values] == [0, 10, 20, 30]
    if IS_ROOT:
        assert len({value[1] for value in values}) == 4  # one throwaway uid per call


def test_run_python_odd_characters_become_text():
    assert run_python("'\\N{GREEK SMALL LETTER ALPHA}' + '\\ud800'") == "'α\\ud800'"
    assert run_python("print(1)\0") == "Python sandbox could not start: embedded null byte"
    assert run_python("x = '\ud800'").startswith("Python sandbox could not start: 'utf-8' codec can't encode")


def test_run_python_timeout_keeps_earlier_output():
    text = run_python("print('started', flush=True)\nwhile True: pass", timeout_s=1)
    assert text == "started\nTimed out after 1 s"


# --------------------------------------------------------------------------------------------------
# Python sandbox: hostile code. Each returns within timeout + 2 s and leaves the host as it was.

def timed_run(code: str, timeout_s: float = 2.0, **kwargs) -> str:
    start = time.monotonic()
    text = run_python(code, timeout_s=timeout_s, **kwargs)
    assert time.monotonic() - start < timeout_s + 2
    return text


def live_processes(uid: int | None = None, pgid: int | None = None) -> list[int]:
    """Pids of processes that are not zombies and have the given uid or process group.

    SIGKILLed processes can take a few milliseconds to finish exiting (they run no more user code), so
    this polls for up to a second while the list is not empty.
    """
    for _ in range(100):
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
                owner = (entry / "status").stat().st_uid
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and (owner == uid if uid is not None else int(fields[2]) == pgid):
                pids.append(int(entry.name))
        if not pids:
            break
        time.sleep(0.01)
    return pids


def test_hostile_infinite_loop():
    text = timed_run("import os\nprint(os.getpgid(0), flush=True)\nwhile True: pass", timeout_s=1)
    assert text.endswith("Timed out after 1 s") and live_processes(pgid=int(text.splitlines()[0])) == []


def test_hostile_fork_bomb():
    code = "import os\nprint(os.getuid(), os.getpgid(0), flush=True)\nwhile True: os.fork()"
    text = timed_run(code, timeout_s=2)
    uid, pgid = map(int, text.splitlines()[0].split())
    assert "BlockingIOError" in text  # the process cap stopped it
    assert live_processes(pgid=pgid) == []
    if IS_ROOT:
        assert live_processes(uid=uid) == []


@root_only
def test_hostile_child_leaving_the_process_group_is_killed():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "print(os.getuid(), flush=True)")
    uid = int(timed_run(code))
    assert live_processes(uid=uid) == []


def test_hostile_setuid_programs_gain_nothing():
    assert timed_run("'NoNewPrivs:\\t1' in open('/proc/self/status').read()") == "True"


def test_hostile_huge_allocation():
    assert timed_run("x = bytearray(50 * 2**30)").endswith("MemoryError")


def test_hostile_print_100_mb():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    text = timed_run("print('x' * (100 * 2**20))", timeout_s=5)
    assert len(text) < 2000 + 100 and "bytes of output cut" in text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50 * 1024


def test_hostile_environment_is_stripped(monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("AEPO_TEST_SECRET", secret)
    text = timed_run("import os\nsorted(os.environ)")
    assert secret not in text and "AEPO_TEST_SECRET" not in text and "'PATH'" in text


@root_only
def test_hostile_cannot_read_the_parents_environment_through_proc(monkeypatch):
    """/proc shows a process's environment as it was at exec; the point is that the file cannot be opened."""
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("AEPO_TEST_SECRET", secret)
    text = timed_run("import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()")
    assert secret not in text and text.endswith("PermissionError: [Errno 13] Permission denied: "
                                                f"'/proc/{os.getpid()}/environ'")


@pytest.fixture
def victim():
    """A world-readable file in a world-readable folder that the sandbox can see: in the repository's
    pytest cache, or in /var/lib when the checkout itself is hidden from the sandbox (under its private
    /tmp, or below a folder closed to others)."""
    def visible(folder: Path) -> bool:
        if any(Path(d) == folder or Path(d) in folder.parents for d in tools.SCRATCH_DIRS):
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in [folder, *folder.parents])

    base = ROOT / ".pytest_cache" if visible(ROOT) else Path("/var/lib")
    base.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="aepo-victim-", dir=base))
    folder.chmod(0o755)
    path = folder / "precious.txt"
    path.write_text("do not touch")
    path.chmod(0o644)
    yield path
    shutil.rmtree(folder)


@root_only
def test_hostile_cannot_change_files_outside_its_directory(victim):
    mode = victim.stat().st_mode
    code = f"""
import os, shutil
victim = {str(victim)!r}
print(os.path.exists(victim))
for attack in [lambda: open(victim, "a").write("owned"), lambda: os.remove(victim),
               lambda: os.rename(victim, victim + ".moved"), lambda: os.chmod(victim, 0o777),
               lambda: open(victim + ".new", "w").write("x"), lambda: shutil.rmtree(os.path.dirname(victim))]:
    try:
        attack()
        print("succeeded")
    except OSError as error:
        print(type(error).__name__)
"""
    lines = timed_run(code).splitlines()
    assert lines[0] == "True" and "succeeded" not in lines  # it saw the file, and every attack failed
    assert victim.read_text() == "do not touch" and victim.stat().st_mode == mode
    assert [p.name for p in victim.parent.iterdir()] == ["precious.txt"]


@root_only
def test_hostile_scratch_files_do_not_reach_the_host():
    name = f"aepo-escape-{uuid.uuid4().hex}"
    code = f"for d in ['/tmp', '/var/tmp', '/dev/shm']:\n    open(d + '/{name}', 'w').write('x')\nprint('written')"
    assert timed_run(code) == "written"
    assert not any(Path(d, name).exists() for d in ["/tmp", "/var/tmp", "/dev/shm"])


@root_only
@pytest.mark.parametrize("code", [
    "import os\nos.kill(os.getppid(), 9)",
    "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
    "import os\nos.kill(-1, 9)\nprint('alone')",
])
def test_hostile_cannot_kill_its_parent(code):
    text = timed_run(code)
    assert text.endswith("PermissionError: [Errno 1] Operation not permitted") or text == "alone"
    assert os.getpid() > 0  # still here


@root_only
def test_hostile_code_as_an_unprivileged_caller():
    """The non-root sandbox (rlimits and the process group only), run by a caller demoted to `nobody`."""
    python = "/usr/bin/python3"
    readable = all(p.stat().st_mode & stat.S_IXOTH for p in ROOT.parents) and ROOT.stat().st_mode & stat.S_IROTH
    if not (os.path.exists(python) and readable):
        pytest.skip("needs a system Python and a repository readable by other users")
    script = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import tools
results = {{"uid": os.getuid()}}
for name, code in [("expr", "6 * 7"), ("loop", "while True: pass"), ("memory", "bytearray(50 * 2**30)"),
                   ("bomb", "import os\\nprint(os.getpgid(0), flush=True)\\nwhile True: os.fork()")]:
    start = time.monotonic()
    results[name] = (tools.run_python(code, timeout_s=1), time.monotonic() - start)
print(json.dumps(results))
"""
    done = subprocess.run([python, "-I", "-c", script], user=65534, group=65534, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    if "SyntaxError" in done.stderr or "TypeError: unsupported operand" in done.stderr:
        pytest.skip(f"{python} is older than Python 3.10")
    results = json.loads(done.stdout)
    assert results["uid"] == 65534 and results["expr"][0] == "42"
    assert results["loop"][0] == "Timed out after 1 s"
    assert results["memory"][0].endswith("MemoryError")
    assert all(results[name][1] < 3 for name in ["expr", "loop", "memory", "bomb"])
    bomb_pgid = int(results["bomb"][0].splitlines()[0])
    assert live_processes(pgid=bomb_pgid) == []
