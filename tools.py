"""The agent's tools: web search (live, local BM25, cached) and a sandboxed Python interpreter.

A segment the policy generates ends with `<search> query </search>` or `<python> code </python>`
(as released with arXiv 2510.14545): `parse_tool_call` extracts the call, a search backend or
`run_python` turns it into text, `result_block` wraps that text for the trajectory. Failures of the
outside world (network, rate limits, timeouts, crashing code) come back as text for the model;
nothing here raises into a rollout. A search backend has `search(query, k) -> str` (the top k
snippets: "Page 1: ...\\nPage 2: ...") and int counters `calls`, `errors` (`CachedSearch` also
`hits`, `misses`); error texts start with SEARCH_FAILED.

    >>> parse_tool_call("<think> Age at release? </think> <python> 1987 - 1962 </python>")
    ('python', '1987 - 1962')
    >>> run_python("1987 - 1962")
    '25'
    >>> print(format_results(["Ada Lovelace wrote the first program.", "Born 1815."],
    ...                      snippet_chars=12))
    Page 1: Ada Lovelace
    Page 2: Born 1815.

`run_python` lives in the sandbox package (sandbox/: isolation, limits; `describe_isolation()`
says which isolation holds). Search failures are bounded and counted: a web query never takes
longer than `query_timeout_s` in all (every engine and retry included), and
`take_search_stats(tools)` gives the calls, errors, cache hits and misses since it was last called,
which train.py logs per step.
"""
import atexit
import fcntl
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from sandbox import check_python_tool, describe_isolation, run_python  # noqa: F401 (re-exported)

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


# Never verbatim inside a result: output printing "\n</result>" would close its block early and
# could then write an answer the grader takes for the policy's own (support/data.py, decision 1);
# "<|" starts chat control tokens (<|im_end|> would end the turn inside a result).
_ESCAPED = ("<think>", "</think>", "<search>", "</search>", "<python>", "</python>", "<result>",
            "</result>", "<answer>", "</answer>", "<|")


def result_block(output: str) -> str:
    """The text appended after a tool call (the policy never samples it: loss mask 0). Agent tags
    and chat control tokens in the output are escaped, "</result>" -> "&lt;/result>": no program or
    page can close its block, open an answer, or end the turn."""
    for tag in _ESCAPED:
        output = output.replace(tag, "&lt;" + tag[1:])
    return " <result>\n" + output + "\n</result>"


# --------------------------------------------------------------------------------------------------
# Search

# every search error text starts so; CachedSearch never caches one
SEARCH_FAILED = "Search failed: "
NO_RESULTS = "No results found."


def format_results(snippets: list[str], snippet_chars: int = 1000) -> str:
    """'Page 1: ...\\nPage 2: ...' as released; each snippet on one line, cut to snippet_chars."""
    lines = [line for line in (" ".join(snippet.split())[:snippet_chars] for snippet in snippets)
             if line]
    return ("\n".join(f"Page {i}: {line}" for i, line in enumerate(lines, start=1)) if lines
            else NO_RESULTS)


class BM25Search:
    """Offline BM25 search (bm25s) over {"id", "title", "text"} documents; snippet = "title: text".

    The index is built once, here (10k documents: ~1 s); documents sharing no query word are not
    returned."""

    def __init__(self, docs: list[dict], snippet_chars: int = 1000):
        # here, not at the top: it pulls in numpy and scipy (~0.2 s), and only BM25 needs them
        import bm25s

        if not docs:
            raise ValueError("BM25Search needs at least one document")
        self.docs, self.snippet_chars = docs, snippet_chars
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        texts = [f"{doc['title']} {doc['text']}" for doc in docs]
        self.index = bm25s.BM25()
        self.index.index(self.tokenizer.tokenize(texts, update_vocab=True, show_progress=False),
                         show_progress=False)
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
                    raise ValueError(f"{path}, line {line_no}: expected a JSON object with keys "
                                     f"id, title, text ({type(error).__name__}: {error}); fix or "
                                     "delete the line") from None
        return cls(docs, snippet_chars)

    def search(self, query: str, k: int = 10) -> str:
        with self.lock:
            self.calls += 1
            if not query.strip():
                self.errors += 1
                return SEARCH_FAILED + "empty query"
            query_ids = self.tokenizer.tokenize([query], update_vocab=False, show_progress=False)
            rows, scores = self.index.retrieve(query_ids, k=min(k, len(self.docs)),
                                               show_progress=False)  # (1, k)
        hits = [self.docs[i] for i, score in zip(rows[0], scores[0]) if score > 0]
        return format_results([f"{doc['title']}: {doc['text']}" for doc in hits],
                              self.snippet_chars)


class WebSearch:
    """Live web search through ddgs (DuckDuckGo and other engines, no API key) with bounded retries.

    A query gets 1 + `retries` attempts, each limited to `timeout_s` by ddgs (which may try several
    engines in one attempt). Before retry i (from 0) it sleeps backoff_s * 2**i, and
    RATE_LIMIT_FACTOR times longer after a rate limit. The whole query, retries and sleeps included,
    returns within `query_timeout_s`: past it the answer is an error text (the abandoned attempt
    ends on its own in the background, within its ddgs timeout). `sleep` is replaceable so tests
    need not wait.
    """

    RATE_LIMIT_FACTOR = 4

    def __init__(self, timeout_s: float = 5.0, retries: int = 2, backoff_s: float = 1.0,
                 snippet_chars: int = 1000, sleep: Callable[[float], None] = time.sleep,
                 query_timeout_s: float = 20.0):
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.snippet_chars, self.sleep, self.query_timeout_s = snippet_chars, sleep, query_timeout_s
        self.lock = threading.Lock()
        self.calls = self.errors = 0

    def search(self, query: str, k: int = 10) -> str:
        with self.lock:
            self.calls += 1
        answer: list[str] = []
        worker = threading.Thread(target=self._answer, args=(query, k, answer), daemon=True)
        worker.start()
        worker.join(self.query_timeout_s)
        result = (answer[0] if answer
                  else f"{SEARCH_FAILED}no answer within {self.query_timeout_s:g} s")
        if result.startswith(SEARCH_FAILED):
            with self.lock:
                self.errors += 1
        return result

    def _answer(self, query: str, k: int, answer: list) -> None:
        """The worker: any failure becomes text (an abandoned worker may still run at exit, when
        ddgs can no longer start threads)."""
        try:
            answer.append(self._attempts(query, k))
        except Exception as error:
            answer.append(f"{SEARCH_FAILED}{type(error).__name__}: {error}")

    def _attempts(self, query: str, k: int) -> str:
        from ddgs import DDGS  # imported here: `import tools` needs only the standard library
        from ddgs.exceptions import DDGSException, RatelimitException

        deadline = time.monotonic() + self.query_timeout_s
        reason = "empty query"
        for attempt in range(self.retries + 1 if query.strip() else 0):
            try:
                hits = DDGS(timeout=self.timeout_s).text(query, max_results=k)
                return format_results([hit.get("body") or hit.get("title", "") for hit in hits],
                                      self.snippet_chars)
            except (DDGSException, OSError) as error:
                # ddgs reports an empty result page as an error
                if "No results found" in str(error):
                    return NO_RESULTS
                reason = f"{type(error).__name__}: {error}"
                wait = self.backoff_s * 2**attempt
                wait *= self.RATE_LIMIT_FACTOR if isinstance(error, RatelimitException) else 1
            if attempt == self.retries or time.monotonic() + wait + self.timeout_s > deadline:
                break  # no time left for another attempt
            self.sleep(wait)
        return SEARCH_FAILED + reason


class CachedSearch:
    """A JSON file cache {query: result text} in front of any backend: the format of
    search_cache.json.

    Keys are the exact query string, as released: `k` is not part of the key, so a hit returns what
    was stored whatever k asks for (the released data always used k = 10). A hit never calls the
    backend; error texts are not stored. New entries are merged into the file under an exclusive
    lock on `<path>.lock` (entries other processes wrote meanwhile are kept, and read in) and the
    file is replaced atomically: two runs sharing one cache lose nothing, and a crash leaves the old
    file whole. A search never waits for the file: one thread writes at a time, outside the lock
    the searches share, no more than WRITE_SHARE of the time (a 48 MB file takes ~0.7 s to write:
    then every 7 s), and not while another process holds the file lock; `flush()`, also run at
    exit, writes the rest. A kill loses the entries since the last write."""

    LOCK_WAIT_S = 5.0  # how long flush() waits for another process's lock
    WRITE_SHARE = 0.1

    def __init__(self, backend, path: str | Path):
        self.backend, self.path = backend, Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory; the search cache must be a JSON file "
                             f"path (e.g. {self.path / 'search_cache.json'})")
        self.cache = self._read() if self.path.exists() else {}
        self.lock, self.writing = threading.Lock(), threading.Lock()
        self.dirty, self.next_write = False, 0.0  # entries not in the file; when to write next
        self.calls = self.errors = self.hits = self.misses = 0
        atexit.register(self.flush)

    def _read(self) -> dict[str, str]:
        try:
            cache = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path}: not a valid search cache ({error}); "
                             "fix or delete it") from None
        if not isinstance(cache, dict):
            raise ValueError(f"{self.path}: expected a JSON object {{query: result text}}, found "
                             f"{type(cache).__name__}; fix or delete it")
        for query, text in cache.items():
            if not isinstance(text, str):
                raise ValueError(f"{self.path}: the entry for {query[:80]!r} is "
                                 f"{type(text).__name__} {str(text)[:40]!r}, expected result text "
                                 "(a string); fix or delete that entry")
        return cache

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
                return result
            self.cache[query] = result
            self.dirty = True
        if time.monotonic() >= self.next_write:
            self._write(wait_s=0.0)
        return result

    def flush(self) -> None:
        """Write the entries not in the file yet, waiting up to LOCK_WAIT_S for another process."""
        self._write(wait_s=self.LOCK_WAIT_S)

    def _write(self, wait_s: float) -> None:
        """Merge with the file under a lock between processes; readers see the old file or the new
        one. Skipped if another thread is writing, or (wait_s 0) if another process is."""
        if not self.writing.acquire(blocking=wait_s > 0):
            return
        try:
            with self.lock:
                if not self.dirty:
                    return
                snapshot, self.dirty = dict(self.cache), False
            start = time.monotonic()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                    self._lock(lock, wait_s)  # released when the file closes
                    merged = {**self._read(), **snapshot} if self.path.exists() else snapshot
                    fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".",
                                               suffix=".tmp")
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(merged, f, ensure_ascii=False, indent=2)
                    os.replace(tmp, self.path)
                with self.lock:
                    self.cache = {**merged, **self.cache}
            except (OSError, ValueError) as error:
                with self.lock:  # the entries stay in memory, for the next write
                    self.dirty = True
                # a full disk must not stop training; a busy lock is simply tried again later
                if wait_s or not isinstance(error, BlockingIOError):
                    warnings.warn(f"could not write the search cache {self.path}: {error}")
            self.next_write = time.monotonic() + (time.monotonic() - start) / self.WRITE_SHARE
        finally:
            self.writing.release()

    @staticmethod
    def _lock(lock, wait_s: float) -> None:
        """Take the file lock, waiting at most wait_s: a stopped process holding it must not stop a
        step."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BlockingIOError(f"{lock.name} stayed locked {wait_s:g} s; the entries "
                                          "are kept in memory") from None
                time.sleep(0.01)


class SearchTool:
    """The search tool as the rollout calls it (query -> text) with its backend at hand for the
    counters."""

    def __init__(self, backend, k: int):
        self.backend, self.k, self.taken = backend, k, {}

    def __call__(self, query: str) -> str:
        return self.backend.search(query, self.k)


STAT_NAMES = ("calls", "errors", "hits", "misses")


def take_search_stats(tools: dict) -> dict[str, int]:
    """Search calls, errors, cache hits and misses since the last take (zeros for a plain
    function)."""
    tool = tools.get("search")
    if not isinstance(tool, SearchTool):
        return dict.fromkeys(STAT_NAMES, 0)
    now = {name: getattr(tool.backend, name, 0) for name in STAT_NAMES}
    taken, tool.taken = {name: now[name] - tool.taken.get(name, 0) for name in STAT_NAMES}, now
    return taken
