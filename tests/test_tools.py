"""Tests of tools.py: tool-call parsing, the search backends and cache (bounds, counters, locking).
Offline.

The Python sandbox has its own tests: tests/test_sandbox.py.
"""
import doctest
import json
import multiprocessing
import shutil
import threading
import time

import ddgs
import pytest
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

import tools
from tools import (NO_RESULTS, SEARCH_FAILED, BM25Search, CachedSearch, SearchTool, WebSearch,
                   format_results, parse_tool_call, result_block, take_search_stats)



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
    {"id": "1", "title": "Zorblax Quint",
     "text": "Zorblax Quint is a river that flows through the Vell valley."},
    {"id": "2", "title": "Florin", "text": "Florin is a kingdom whose capital is Guilder Harbour."},
    {"id": "3", "title": "Mirella Vantworth",
     "text": "Mirella Vantworth composed the Ninth Lantern Suite in 1873."},
    {"id": "4", "title": "Lantern festival",
     "text": "A festival of lanterns held every spring in Guilder Harbour."},
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
    assert (len(text.splitlines()) == 2
            and all(len(line) <= len("Page 1: ") + 60 for line in text.splitlines()))
    assert bm25.search("qwxyz unknownword") == NO_RESULTS
    assert bm25.search("the of a ???") == NO_RESULTS
    errors = bm25.errors
    assert bm25.search("   ").startswith(SEARCH_FAILED) and bm25.errors == errors + 1


def test_bm25_from_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n\n")
    assert BM25Search.from_jsonl(path).search("Zorblax").startswith("Page 1: Zorblax Quint")
    lines = [json.dumps(DOCS[0]), json.dumps(DOCS[1]), '{"id": "3", "title": "no text"}',
             json.dumps(DOCS[3])]
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
    assert (cache.search("Amy Smart") == cache.search("Amy Smart", k=3)
            == "Page 1: result for Amy Smart")
    assert (backend.calls, cache.calls, cache.hits, cache.misses) == (1, 2, 1, 1)
    assert (cache.search("fail once").startswith(SEARCH_FAILED)
            and cache.search("fail once").startswith(SEARCH_FAILED))
    assert (backend.calls, cache.errors) == (3, 2)
    assert json.loads(path.read_text()) == {"Amy Smart": "Page 1: result for Amy Smart"}
    reloaded = CachedSearch(FakeBackend(), path)
    assert (reloaded.search("Amy Smart") == "Page 1: result for Amy Smart"
            and reloaded.backend.calls == 0)
    # no temporary files
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json", "cache.json.lock"]


def test_cache_concurrent_writes_keep_valid_json(tmp_path):
    path = tmp_path / "cache.json"
    cache = CachedSearch(FakeBackend(delay_s=0.001), path)
    threads = [threading.Thread(target=lambda t=t: [cache.search(f"q{t}-{i}") for i in range(25)])
               for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.flush()  # what the last misses left to write (writes are at most a tenth of the time)
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
    calls = fake_ddgs(monkeypatch,
                      hits=[{"title": "T", "href": "u", "body": "b" * 20}, {"title": "only title"}])
    search = WebSearch(snippet_chars=5, sleep=pytest.fail)
    assert search.search("q") == "Page 1: bbbbb\nPage 2: only "
    fake_ddgs(monkeypatch, error=DDGSException("No results found."))
    # not an error, and not retried (sleep would fail the test)
    assert search.search("q") == NO_RESULTS
    assert search.search("  \n").startswith(SEARCH_FAILED) and len(calls) == 1
    assert (search.calls, search.errors) == (3, 1)


def test_web_search_worker_failures_become_text(monkeypatch):
    """An abandoned worker may run on at exit, when ddgs can start no threads: its error is text,
    not a traceback on the terminal."""
    error = "cannot schedule new futures after interpreter shutdown"
    fake_ddgs(monkeypatch, error=RuntimeError(error))
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    assert WebSearch(sleep=pytest.fail).search("q") == f"{SEARCH_FAILED}RuntimeError: {error}"
    assert not uncaught


def test_web_search_bounds_the_whole_query(monkeypatch):
    """A query whose engines hang (a black-holed network) returns an error text at
    query_timeout_s."""
    class HangingDDGS:
        def __init__(self, timeout):
            pass

        def text(self, query, max_results):
            time.sleep(3)
            return []

    monkeypatch.setattr(ddgs, "DDGS", HangingDDGS)
    search = WebSearch(timeout_s=5, query_timeout_s=0.3)
    start = time.monotonic()
    assert search.search("q") == SEARCH_FAILED + "no answer within 0.3 s"
    assert time.monotonic() - start < 0.6 and (search.calls, search.errors) == (1, 1)


def test_web_search_retries_only_while_time_is_left(monkeypatch):
    calls, sleeps = fake_ddgs(monkeypatch, error=DDGSException("DNSError")), []
    search = WebSearch(timeout_s=3.0, retries=5, backoff_s=1.0, query_timeout_s=5.0,
                       sleep=sleeps.append)
    assert search.search("q").startswith(SEARCH_FAILED)
    # a third attempt would start after 1 + 2 s and could end at 6 s
    assert len(calls) == 2 and sleeps == [1.0]


def test_cache_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError,
                       match=f"{tmp_path} is a directory; the search cache must be a JSON file"):
        CachedSearch(FakeBackend(), tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"q": 3}', r"cache.json: the entry for 'q' is int '3', expected result text"),
    ('{"a": "Page 1: x", "q": null}', r"cache.json: the entry for 'q' is NoneType"),
    ('{"q": ["Page 1: x"]}', r"cache.json: the entry for 'q' is list"),
    ('["q"]', r"cache.json: expected a JSON object .* found list"),
    (b'{"q": "\xff"}', r"cache.json: not a valid search cache"),
])
def test_cache_rejects_values_of_the_wrong_type_at_load(tmp_path, content, message):
    path = tmp_path / "cache.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        CachedSearch(FakeBackend(), path)


def _fill_cache(path: str, prefix: str, n: int) -> None:
    cache = CachedSearch(FakeBackend(), path)
    for i in range(n):
        cache.search(f"{prefix}-{i}")
    cache.flush()  # a forked process ends without running atexit


def test_cache_two_processes_lose_no_entries(tmp_path):
    path = tmp_path / "cache.json"
    CachedSearch(FakeBackend(), path).search("before")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_fill_cache, args=(str(path), name, 60))
               for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    stored = json.loads(path.read_text())
    assert len(stored) == 121 and stored["a-59"] == "Page 1: result for a-59" and "before" in stored
    reloaded = CachedSearch(FakeBackend(), path)
    assert reloaded.search("b-0") == "Page 1: result for b-0" and reloaded.hits == 1


def test_cache_lock_held_elsewhere_stalls_no_search(tmp_path):
    """Searches never wait for another process's file lock (they once waited 5 s each, holding
    the lock every search thread needs); flush() waits LOCK_WAIT_S and says so."""
    import fcntl

    path = tmp_path / "cache.json"
    cache = CachedSearch(FakeBackend(), path)
    cache.LOCK_WAIT_S = 0.2
    with open(tmp_path / "cache.json.lock", "a") as held:  # a stopped process holding the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        threads = [threading.Thread(target=lambda t=t: [cache.search(f"q{t}-{i}")
                                                        for i in range(5)]) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - start < 0.15 and not path.exists()
        with pytest.warns(UserWarning, match="stayed locked 0.2 s"):
            cache.flush()
    cache.search("q-last")
    cache.flush()
    assert len(json.loads(path.read_text())) == 21


def test_cache_writes_a_large_file_at_most_a_tenth_of_the_time(tmp_path, monkeypatch):
    """Each miss once rewrote the whole file (0.66 s at 48 MB); now misses in a row are written
    together."""
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({f"old {i}": "x" * 2000 for i in range(2000)}))  # 4 MB
    cache, writes = CachedSearch(FakeBackend(), path), []
    replace = tools.os.replace
    monkeypatch.setattr(tools.os, "replace", lambda *a: (writes.append(a), replace(*a)))
    for i in range(20):
        cache.search(f"new {i}")
    assert 1 <= len(writes) <= 2
    cache.flush()
    assert len(json.loads(path.read_text())) == 2020


def test_search_stats_are_taken_per_step(tmp_path):
    backend = CachedSearch(FakeBackend(), tmp_path / "cache.json")
    tools_ = {"search": SearchTool(backend, k=3), "python": lambda code: ""}
    for query in ("a", "a", "fail 1", "b"):
        tools_["search"](query)
    assert take_search_stats(tools_) == {"calls": 4, "errors": 1, "hits": 1, "misses": 3}
    tools_["search"]("a")
    assert take_search_stats(tools_) == {"calls": 1, "errors": 0, "hits": 1, "misses": 0}
    assert (take_search_stats({"search": lambda q: ""})
            == {"calls": 0, "errors": 0, "hits": 0, "misses": 0})


def test_log_line_says_when_searches_failed():
    from support import report

    row = {"step": 0, "reward": 0.5, "acc": 0.5, "entropy": 1.0, "clip_frac_low": 0.0,
           "clip_frac_high": 0.0, "search_calls": 1.0, "python_calls": 0.0, "branches_per_q": 0.0,
           "step_s": 3.0}
    assert "search failed" not in report.log_line(row | {"search_errors": 0}, 10)
    assert report.log_line(row | {"search_errors": 7}, 10).endswith(" | search failed 7")


# --------------------------------------------------------------------------------------------------
# The tools' flags, checked with the others before torch loads (cli.train_config)

def test_a_broken_search_cache_stops_the_flags_check(tmp_path):
    from support import cli

    path = tmp_path / "corrupt.json"
    path.write_text('{"q": "Page 1')
    with pytest.raises(SystemExit, match="--search_cache: .*corrupt.json: not a valid search"):
        cli.train_config(["--stage", "rl", "--search_cache", str(path),
                          "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_an_uncached_hub_model_offline_stops_the_flags_check(tmp_path, monkeypatch):
    from support import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="bogus-org/bogus-model: not in the Hugging Face cache"):
        cli.train_config(["--model", "bogus-org/bogus-model", "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
