"""Questions, answers and the one grader: `Example`, `Demo`, the system prompts, reward, loaders.

In and out:
- `reward(response, golds)` grades a decoded trajectory (arXiv 2510.14545, section 3): -1 on a format
  failure, else token F1 of the last `\\boxed{}` in the answer, +0.1 when F1 > 0 and both tools were used.
  Training and evaluation call this same function, so reward and metric cannot drift.
- `load_examples(spec)` reads a verl parquet, a jsonl file or a hub dataset id into `Example`s;
  `load_demos(path)` reads SFT demonstrations (`Demo`s) from jsonl. Named built-in datasets are their
  owner's business (world.load_examples answers "world:*" and passes every other name here).

Example:
    python data.py path/to/valid.parquet   # counts and first examples

Decisions worth knowing:
1. Tool-result blocks (`" <result>\\n...\\n</result>"` right after `</search>` / `</python>`) are cut out
   before the format check, so only the policy's own words are graded. A block ends at the first
   `"\\n</result>"`: sound, as tools.result_block escapes agent tags in tool output, so no program or
   page can close its block and write an answer. One left-to-right scan: linear time.
2. `golds` must be a string or a list/tuple of strings: anything else (None, 98) is a caller's bug.
3. A GSM8K-style gold ("... #### 18") is cut to its final answer ("18"); the parquet `ability` is the kind.
4. Loaders stop at the first problem with the file, the line or row, and the fix: an empty file, bytes
   that are not UTF-8, a missing path, a folder, a question that is not a string, a boolean answer.
5. This module imports nothing of the project.
"""
import json
import numbers
import os
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


@dataclass(frozen=True)
class Example:
    question: str
    golds: tuple[str, ...]  # gold answers; a prediction scores its best match
    source: str  # "world:train", "hotpotqa", a file stem, ...
    kind: str = ""  # question type for per-type stats: "1hop", "2hop", "math", the parquet ability, or ""


@dataclass
class Demo:  # one SFT demonstration: a question and a full trajectory in the AEPO format
    question: str
    response: str  # the assistant text, tool-result blocks included
    golds: tuple[str, ...]
    kind: str
    quality: str  # "good", or the mistake it shows: "no_search", "wasted_search", "guessed_math"


# The paper's system prompt, verbatim from the released parquet files (with `\boxed` repaired).
SYSTEM_PROMPT = (
    r"You are a helpful assistant that can solve the given question step by step with the help of the "
    r"wikipedia search tool and python interpreter tool. Given a question, you need to first think about "
    r"the reasoning process in the mind and then provide the answer. During thinking, you can invoke the "
    r"wikipedia search tool to search and python interpreter tool to calculate the math problem for fact "
    r"information about specific topics if needed. The reasoning process and answer are enclosed within "
    r"<think> </think> and <answer> </answer> tags respectively, and the search query and result are "
    r"enclosed within <search> </search> and <result> </result> tags respectively. For example, <think> "
    r"This is the reasoning process. </think> <search> search query here </search> <result> search result "
    r"here </result> <think> This is the reasoning process. </think> <python> python code here </python> "
    r"<result> python interpreter result here </result> <think> This is the reasoning process. </think> "
    r"<answer> The final answer is \[ \boxed{answer here} \] </answer>. In the last part of the answer, "
    r"the final exact answer is enclosed within \boxed{} with latex format."
)
# A one-sentence version for the tiny model, whose context is short.
SHORT_SYSTEM_PROMPT = "Use <search> and <python> tools, then <answer>."  # the tiny model: every token costs
# The tags of the trajectory format (single tokens in the tiny tokenizer).
AGENT_TAGS = ["<think>", "</think>", "<search>", "</search>", "<python>", "</python>", "<result>",
              "</result>", "<answer>", "</answer>"]

# ------------------------------------------------------------------------------------------------ grading
_PUNCTUATION = set(string.punctuation)
_TOOL_CLOSES = ("</search>", "</python>")
_RESULT_OPEN, _RESULT_CLOSE = " <result>\n", "\n</result>"
_EMPTIED_RESULT = " <result></result>"  # a tool result as the format check sees it
_TOOL_TAG = re.compile(r"</?(?:search|python|result)>")
_BOXED, _BRACE = "\\boxed{", re.compile(r"[{}]")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _as_golds(golds) -> tuple[str, ...]:
    """A gold answer or a list/tuple of them, all strings (None would be graded against "None")."""
    if isinstance(golds, str):
        return (golds,)
    if isinstance(golds, (list, tuple)) and all(isinstance(g, str) for g in golds):
        return tuple(golds)
    bad = next((g for g in golds if not isinstance(g, str)), None) if isinstance(golds, (list, tuple)) else golds
    raise TypeError(f"golds must be a string or a list/tuple of strings, got {type(golds).__name__} "
                    f"holding {type(bad).__name__} {bad!r:.40}; convert gold answers to strings when loading them")


def exact_match(pred: str, golds) -> float:
    """1.0 if the normalised prediction equals any normalised gold."""
    return max((float(normalize_answer(pred) == normalize_answer(g)) for g in _as_golds(golds)), default=0.0)


def _token_f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # SQuAD v2: two empty answers agree
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds) -> float:
    """SQuAD token F1 (bag of normalised tokens), the best over the golds."""
    return max((_token_f1(pred, g) for g in _as_golds(golds)), default=0.0)


def result_spans(response: str) -> list[tuple[int, int]]:
    """(start, end) of each tool-result block: `" <result>\\n...\\n</result>"` right after `</search>` or
    `</python>`, ending at the first `"\\n</result>"`. One left-to-right scan: linear time."""
    spans, pos = [], 0
    while (start := response.find(_RESULT_OPEN, pos)) >= 0:
        if not response.endswith(_TOOL_CLOSES, 0, start):  # a <result> the policy wrote itself
            pos = start + 1
            continue
        close = response.find(_RESULT_CLOSE, start + len(_RESULT_OPEN))
        if close < 0:  # nothing closes this block, nor any later one
            break
        pos = close + len(_RESULT_CLOSE)
        spans.append((start, pos))
    return spans


def split_response(response: str) -> list[tuple[str, bool]]:
    """Cut a response into model text (False) and the tool-result blocks the harness appended (True)."""
    pieces, start = [], 0
    for block_start, block_end in result_spans(response):
        if block_start > start:
            pieces.append((response[start:block_start], False))
        pieces.append((response[block_start:block_end], True))
        start = block_end
    if start < len(response):
        pieces.append((response[start:], False))
    return pieces


def _model_text(response: str) -> str:
    """The policy's structure: each tool result emptied, and the content of each call that got a result
    blanked too (code may print or mention tags: it is an argument, not structure)."""
    pieces = []
    for piece, is_result in split_response(response):
        if is_result:  # the piece before ends with </search> or </python> (result_spans)
            close = "</python>" if pieces[-1].endswith("</python>") else "</search>"
            opening = "<" + close[2:]
            start = pieces[-1].rfind(opening, 0, len(pieces[-1]) - len(close))
            if start >= 0:
                pieces[-1] = pieces[-1][: start + len(opening)] + " " + close
            piece = _EMPTIED_RESULT
        pieces.append(piece)
    return "".join(pieces)


def extract_answer(response: str) -> str | None:
    """The content (stripped) of the last brace-balanced `\\boxed{...}` inside the last `<answer>...</answer>`."""
    text = _model_text(response)
    start = text.rfind("<answer>")
    end = text.find("</answer>", start)
    if start < 0 or end < 0:
        return None
    answer, found = text[start + len("<answer>") : end], None
    i = answer.find(_BOXED)
    while i >= 0:
        opening, depth = i + len(_BOXED) - 1, 0
        for brace in _BRACE.finditer(answer, opening):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                break
        if depth != 0:  # unclosed: keep the last complete box
            break
        found = answer[opening + 1 : brace.start()]
        i = answer.find(_BOXED, brace.start())  # boxes nested inside this one belong to it
    return None if found is None else found.strip()


def format_error(response: str) -> str | None:
    """None if the format check (arXiv 2510.14545, section 3) passes, else a short reason."""
    text = _model_text(response)
    opened, closed = text.count("<think>"), text.count("</think>")
    if opened == 0 or opened != closed:
        return f"{opened} <think> and {closed} </think> (need equal numbers, at least one)"
    if text.count("<answer>") != 1 or text.count("</answer>") != 1 or text.find("<answer>") > text.find("</answer>"):
        return "need exactly one <answer> ... </answer>"
    tags = list(_TOOL_TAG.finditer(text))
    i = 0
    while i < len(tags):  # (<search> or <python>, its close, the harness's emptied result)*
        opening = tags[i].group()
        if opening not in ("<search>", "<python>"):
            return f"{opening} outside a tool call"
        close = "</" + opening[1:]
        if i + 1 == len(tags) or tags[i + 1].group() != close:
            return f"unclosed {opening}"
        if not text.startswith(_EMPTIED_RESULT, tags[i + 1].end()):  # a result the policy wrote is no result
            return f"{close} without a <result>"
        i += 4
    if extract_answer(response) is None:
        return "no \\boxed{...} in the answer"
    return None


def tool_counts(response: str) -> tuple[int, int]:
    """(number of <search> calls, number of <python> calls) the policy made."""
    text = _model_text(response)
    return text.count("<search>"), text.count("<python>")


def reward(response: str, golds) -> float:
    """arXiv 2510.14545, section 3: -1 on format failure; else F1, plus 0.1 when F1 > 0 and both tools
    were used. golds: a string or a list/tuple of strings (anything else raises TypeError)."""
    golds = _as_golds(golds)
    if format_error(response) is not None:
        return -1.0
    f1 = f1_score(extract_answer(response) or "", golds)
    if f1 == 0.0:
        return 0.0
    searches, pythons = tool_counts(response)
    return f1 + 0.1 if searches and pythons else f1


# ------------------------------------------------------------------------------------------------ loaders
QUESTION_FIELDS = ("question", "Question", "problem")
ANSWER_FIELDS = ("answer", "Answer", "golds", "solution")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
_SPLIT_NAMES = {"test", "train", "dev", "val", "valid", "validation"}
_FILE_TYPES = (".parquet", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".arrow")  # a name that is surely a path


def _repair(text: str) -> str:
    """The released files wrote "\\boxed" in a non-raw Python string: "\\b" became a backspace byte."""
    return text.replace("\x08", "\\b")


def _is_empty(value) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) == 0
    return value is None or value != value or (isinstance(value, str) and not value.strip())  # NaN != NaN


def _first(row: dict, fields: Iterable[str]) -> tuple[str, object]:
    """(field, value) of the first field present with a non-empty value, else ("", None)."""
    return next(((f, row[f]) for f in fields if f in row and not _is_empty(row[f])), ("", None))


def _kind_of(value) -> str:  # "a boolean", "an int", "a list", ...
    name = "boolean" if isinstance(value, (bool, np.bool_)) else type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _golds(value, where: str, field: str = "answer") -> tuple[str, ...]:
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    for x in items:  # True would be graded as the text "True": say so instead
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (str, numbers.Number)):
            raise ValueError(f"{where}: the {field} is {_kind_of(x)} ({x!r:.60}); write it as a string, a number "
                             "or a list of them")
    # A GSM8K solution ends with "#### <final answer>": grade against the final answer only.
    return tuple(_repair(str(x).rsplit("####", 1)[-1].strip() if "####" in str(x) else str(x)) for x in items)


def _example(row: dict, where: str, source: str, need_answer: bool = True) -> Example:
    """One question/answer row of a jsonl or plain parquet file."""
    (q_field, question), (a_field, answer) = _first(row, QUESTION_FIELDS), _first(row, ANSWER_FIELDS)
    if question is None:
        raise ValueError(f"{where}: no question field (expected a string under one of {', '.join(QUESTION_FIELDS)})")
    if not isinstance(question, str):
        raise ValueError(f"{where}: the question ({q_field!r}) is {_kind_of(question)} ({question!r:.60}), "
                         "not a string")
    if answer is None and need_answer:
        raise ValueError(f"{where}: no answer field (expected one of {', '.join(ANSWER_FIELDS)})")
    golds = () if answer is None else _golds(answer, where, f"answer ({a_field!r})")
    return Example(_repair(question), golds, source, str(row.get("kind") or ""))


def _verl_example(row: dict, where: str, source: str) -> Example:
    """One verl row: the question is the user message, the gold is reward_model["ground_truth"]."""
    messages = row["prompt"] if isinstance(row["prompt"], (list, np.ndarray)) else []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"
             and isinstance(m.get("content"), str)]
    if not users:
        raise ValueError(f"{where}: the prompt has no user message; expected a list of chat messages "
                         "with the question as the content of the one whose role is 'user'")
    truth = row["reward_model"].get("ground_truth") if isinstance(row["reward_model"], dict) else None
    if _is_empty(truth):
        raise ValueError(f"{where}: no reward_model.ground_truth; expected reward_model = {{'ground_truth': answer}}")
    kind = row.get("ability") if isinstance(row.get("ability"), str) else ""
    return Example(_repair(users[-1]["content"]), _golds(truth, where, "ground_truth"), source, kind)


def _source(path: Path) -> str:
    """The file stem, or its folder's name when the stem is only a split name (eval/hotpotqa/test.jsonl)."""
    return path.parent.name if path.stem in _SPLIT_NAMES and path.parent.name else path.stem


def _check_file(path: Path, kind: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a {kind} file; pass a file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; an empty file, bad UTF-8 or bad JSON stops."""
    _check_file(path, ".jsonl")
    rows = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows += 1
            yield n, row
    if rows == 0:
        raise ValueError(f"{path}: no rows (the file is empty or blank); expected one JSON object a line")


def _read_jsonl(path: Path) -> list[Example]:
    return [_example(row, f"{path} line {n}", _source(path)) for n, row in _jsonl_rows(path)]


def _read_parquet(path: Path) -> list[Example]:
    import pandas as pd  # imported here: a second of start-up that only parquet files need

    _check_file(path, ".parquet")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    columns, rows = set(table.columns), table.to_dict("records")
    if not rows:
        raise ValueError(f"{path}: no rows (the table is empty)")
    if {"prompt", "reward_model"} <= columns:
        return [_verl_example(row, f"{path} row {i} (0-based)", _source(path)) for i, row in enumerate(rows)]
    if "question" in columns and columns & {"answer", "golds"}:
        return [_example(row, f"{path} row {i} (0-based)", _source(path)) for i, row in enumerate(rows)]
    raise ValueError(f"{path}: unrecognised columns {sorted(columns)}; expected the verl columns prompt + "
                     "reward_model, or question + answer")


def _read_hub(spec: str) -> list[Example]:
    """Download the .parquet/.jsonl files of a hub dataset `owner/name[:split]` and read them."""
    repo_id, _, split = spec.partition(":")
    unreachable = (f"cannot load {spec!r}: there is no local file or folder of that name, and the Hugging Face "
                   "hub is unreachable ({}); download the data elsewhere and pass a local .parquet or .jsonl file")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError(unreachable.format("HF_HUB_OFFLINE is set"))
    import huggingface_hub  # imported here: only hub ids need it

    try:
        in_split = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")  # data/test-0000.parquet is split "test"
        files = [f for f in huggingface_hub.list_repo_files(repo_id, repo_type="dataset")
                 if f.endswith((".parquet", ".jsonl")) and (not split or in_split.search(f))]
        paths = [Path(huggingface_hub.hf_hub_download(repo_id, f, repo_type="dataset")) for f in files]
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ValueError(f"{spec!r}: no such dataset on the Hugging Face hub (nor a local file)") from None
    except (OSError, huggingface_hub.errors.HTTPError) as e:
        raise ConnectionError(unreachable.format(" ".join(str(e).split()))) from None
    if not paths:
        raise ValueError(f"{spec!r}: the hub dataset has no .parquet or .jsonl files {split}".rstrip())
    examples = [ex for p in paths for ex in (_read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p))]
    return [replace(ex, source=repo_id) for ex in examples]


def _is_local(spec: str) -> bool:
    """Whether a name can only mean a local path (./x, /x, ~/x, a/b/c, x.json, or a/b with a local a/)."""
    parts = Path(spec).parts
    return (spec.startswith((".", "/", "~")) or spec.lower().endswith(_FILE_TYPES) or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def head(examples: list, limit: int | None) -> list:
    """The first `limit` examples (None: all); a limit below 1 is an error, not an empty dataset."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples or None (all), got {limit!r}")
    return examples[:limit] if limit is not None else examples


def load_examples(spec: str, limit: int | None = None) -> list[Example]:
    """Questions from a .parquet or .jsonl file or a hub dataset id `owner/name[:split]`."""
    spec, path = str(spec), Path(str(spec)).expanduser()
    head([], limit)  # a bad limit fails before any reading
    if spec.endswith(".parquet"):
        examples = _read_parquet(path)
    elif spec.endswith(".jsonl"):
        examples = _read_jsonl(path)
    elif path.is_dir():
        raise IsADirectoryError(f"{spec} is a directory; pass a .parquet or .jsonl file inside it")
    elif path.exists():
        raise ValueError(f"{spec}: unsupported file type; pass a .parquet or .jsonl file")
    elif _is_local(spec):
        raise FileNotFoundError(f"{spec}: no such file or folder")
    elif _HUB_ID.fullmatch(spec):
        examples = _read_hub(spec)
    else:
        raise ValueError(f"unknown data {spec!r}: expected a .parquet or .jsonl file, or a hub dataset id "
                         "owner/name[:split]")
    return head(examples, limit)


def load_demos(path: str | Path) -> list[Demo]:
    """SFT demonstrations from a jsonl of {"question", "response", "answer" (optional)} objects."""
    path, demos = Path(path).expanduser(), []
    for n, row in _jsonl_rows(path):
        example = _example(row, f"{path} line {n}", "", need_answer=False)
        if not isinstance(row.get("response"), str) or not row["response"].strip():
            raise ValueError(f"{path} line {n}: no response field (expected the assistant text under 'response')")
        quality = str(row.get("quality") or "")
        demos.append(Demo(example.question, _repair(row["response"]), example.golds, example.kind, quality))
    return demos


def save_jsonl(rows: Iterable, path: str | Path) -> None:
    """Write dicts or dataclasses (Example, Demo) one JSON object a line; load_demos reads Demo files back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if is_dataclass(row) else row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    examples = load_examples(sys.argv[1])  # python data.py FILE.parquet | FILE.jsonl | owner/name[:split]
    print(f"{len(examples)} examples from {sys.argv[1]}; kinds {dict(Counter(ex.kind for ex in examples))}")
    for ex in examples[:3]:
        print(" ", ex)
