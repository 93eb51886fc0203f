"""Questions, answers and the one grader: `Example`, the system prompts, reward, loaders.

In and out:
- `reward(response, golds)` grades a decoded trajectory (AEPO.md section 3): -1 on a format failure, else
  token F1 of the last `\\boxed{}` in the answer, +0.1 when F1 > 0 and both tools were used. Training and
  evaluation call this same function, so reward and metric cannot drift.
- `load_examples(spec)` reads "world", "world:train", "world:heldout", a verl parquet, a jsonl file or a hub
  dataset id into `Example`s; `load_demos(path)` reads SFT demonstrations (`world.Demo`) from jsonl.
- The built-in world, its questions and the generated demonstrations live in world.py.

Example:
    python data.py path/to/valid.parquet   # counts and first examples

Decisions worth knowing:
1. Tool-result blocks (`" <result>\\n...\\n</result>"` right after `</search>` / `</python>`) are cut out before
   the format check, so tags inside search pages or program output cannot break or fake the format.
2. A GSM8K-style gold ("... #### 18") is cut to its final answer ("18"); the parquet `ability` is the kind.
3. This module imports nothing from the project at module level; only `load_examples("world...")` and
   `load_demos` import world.py, inside the function (world.py imports `Example` from here).
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
import pandas as pd


@dataclass(frozen=True)
class Example:
    question: str
    golds: tuple[str, ...]  # gold answers; a prediction scores its best match
    source: str  # "world:train", "hotpotqa", a file stem, ...
    kind: str = ""  # question type for per-type stats: "1hop", "2hop", "math", the parquet ability, or ""


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
_RESULT_BLOCK = re.compile(r"(?<=</search>|</python>) <result>\n.*?\n</result>", re.DOTALL)
_TOOL_TAG = re.compile(r"</?(?:search|python|result)>")
_BOXED = "\\boxed{"


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _as_golds(golds) -> tuple[str, ...]:
    return (golds,) if isinstance(golds, str) else () if golds is None else tuple(str(g) for g in golds)


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


def split_response(response: str) -> list[tuple[str, bool]]:
    """Cut a response into model text (False) and the tool-result blocks the harness appended (True)."""
    pieces, start = [], 0
    for block in _RESULT_BLOCK.finditer(response):
        if block.start() > start:
            pieces.append((response[start : block.start()], False))
        pieces.append((block.group(), True))
        start = block.end()
    if start < len(response):
        pieces.append((response[start:], False))
    return pieces


def _model_text(response: str) -> str:
    """The response with each tool result emptied, so only the policy's own words are checked."""
    return "".join(" <result></result>" if is_result else piece for piece, is_result in split_response(response))


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
        for j in range(opening, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[j], 0)
            if depth == 0:
                break
        if depth != 0:  # unclosed: keep the last complete box
            break
        found = answer[opening + 1 : j]
        i = answer.find(_BOXED, j)  # boxes nested inside this one belong to it
    return None if found is None else found.strip()


def format_error(response: str) -> str | None:
    """None if the AEPO.md section 3 format check passes, else a short reason."""
    text = _model_text(response)
    opened, closed = text.count("<think>"), text.count("</think>")
    if opened == 0 or opened != closed:
        return f"{opened} <think> and {closed} </think> (need equal numbers, at least one)"
    if text.count("<answer>") != 1 or text.count("</answer>") != 1 or text.find("<answer>") > text.find("</answer>"):
        return "need exactly one <answer> ... </answer>"
    tags = _TOOL_TAG.findall(text)
    i = 0
    while i < len(tags):
        if tags[i] not in ("<search>", "<python>"):
            return f"{tags[i]} outside a tool call"
        close = "</" + tags[i][1:]
        if tags[i + 1 : i + 2] != [close]:
            return f"unclosed {tags[i]}"
        if tags[i + 2 : i + 4] != ["<result>", "</result>"]:
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
    """AEPO.md section 3: -1 on format failure; else F1, plus 0.1 when F1 > 0 and both tools were used."""
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


def _repair(text: str) -> str:
    """The released files wrote "\\boxed" in a non-raw Python string: "\\b" became a backspace byte."""
    return text.replace("\x08", "\\b")


def _is_empty(value) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) == 0
    return value is None or value != value or (isinstance(value, str) and not value.strip())  # NaN != NaN


def _first(row: dict, fields: Iterable[str]):
    return next((row[f] for f in fields if f in row and not _is_empty(row[f])), None)


def _golds(value, where: str) -> tuple[str, ...]:
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not items or not all(isinstance(x, (str, numbers.Number)) for x in items):
        raise ValueError(f"{where}: the answer must be a string, a number or a list of them, got {value!r:.80}")
    # A GSM8K solution ends with "#### <final answer>": grade against the final answer only.
    return tuple(_repair(str(x).rsplit("####", 1)[-1].strip() if "####" in str(x) else str(x)) for x in items)


def _example(row: dict, where: str, source: str, need_answer: bool = True) -> Example:
    """One question/answer row of a jsonl or plain parquet file."""
    question, answer = _first(row, QUESTION_FIELDS), _first(row, ANSWER_FIELDS)
    if not isinstance(question, str):
        raise ValueError(f"{where}: no question field (expected a string under one of {', '.join(QUESTION_FIELDS)})")
    if answer is None and need_answer:
        raise ValueError(f"{where}: no answer field (expected one of {', '.join(ANSWER_FIELDS)})")
    golds = () if answer is None else _golds(answer, where)
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
    return Example(_repair(users[-1]["content"]), _golds(truth, where), source, kind)


def _source(path: Path) -> str:
    """The file stem, or its folder's name when the stem is only a split name (eval/hotpotqa/test.jsonl)."""
    return path.parent.name if path.stem in _SPLIT_NAMES and path.parent.name else path.stem


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _read_jsonl(path: Path) -> list[Example]:
    return [_example(row, f"{path} line {n}", _source(path)) for n, row in _jsonl_rows(path)]


def _read_parquet(path: Path) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    columns, rows = set(table.columns), table.to_dict("records")
    if {"prompt", "reward_model"} <= columns:
        return [_verl_example(row, f"{path} row {i} (0-based)", _source(path)) for i, row in enumerate(rows)]
    if "question" in columns and columns & {"answer", "golds"}:
        return [_example(row, f"{path} row {i} (0-based)", _source(path)) for i, row in enumerate(rows)]
    raise ValueError(f"{path}: unrecognised columns {sorted(columns)}; expected the verl columns prompt + "
                     "reward_model, or question + answer")


def _read_hub(spec: str) -> list[Example]:
    """Download the .parquet/.jsonl files of a hub dataset `owner/name[:split]` and read them."""
    repo_id, _, split = spec.partition(":")
    unreachable = (f"cannot load {spec!r}: the Hugging Face hub is unreachable ({{}}); download the data "
                   "elsewhere and pass a local .parquet or .jsonl file instead")
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
        raise ConnectionError(unreachable.format(e)) from None
    if not paths:
        raise ValueError(f"{spec!r}: the hub dataset has no .parquet or .jsonl files {split}".rstrip())
    examples = [ex for p in paths for ex in (_read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p))]
    return [replace(ex, source=repo_id) for ex in examples]


def load_examples(spec: str, limit: int | None = None) -> list[Example]:
    """Questions from "world" (= "world:train"), "world:heldout", a .parquet or .jsonl file, or a hub id."""
    spec = str(spec)
    if spec == "world" or spec.startswith("world:"):
        if spec not in ("world", "world:train", "world:heldout"):
            raise ValueError(f"unknown world split {spec!r}: use world (= world:train), world:train or world:heldout")
        import world  # the one allowed project import (here and in load_demos): lazy, as world.py imports data

        train, heldout = world.world_splits(0)
        examples = heldout if spec == "world:heldout" else train
    elif spec.endswith(".parquet"):
        examples = _read_parquet(Path(spec))
    elif spec.endswith(".jsonl"):
        examples = _read_jsonl(Path(spec))
    elif Path(spec).exists():
        raise ValueError(f"{spec}: unsupported file type; pass a .parquet or .jsonl file")
    elif _HUB_ID.fullmatch(spec):
        examples = _read_hub(spec)
    else:
        raise ValueError(f"unknown data {spec!r}: expected world, world:train, world:heldout, a .parquet or "
                         ".jsonl file, or a hub dataset id owner/name[:split]")
    return examples[:limit] if limit is not None else examples


def load_demos(path: str | Path) -> "list[world.Demo]":
    """SFT demonstrations from a jsonl of {"question", "response", "answer" (optional)} objects."""
    import world  # the allowed exception, as in load_examples: lazy, as world.py imports data

    path, demos = Path(path), []
    for n, row in _jsonl_rows(path):
        example = _example(row, f"{path} line {n}", "", need_answer=False)
        if not isinstance(row.get("response"), str) or not row["response"].strip():
            raise ValueError(f"{path} line {n}: no response field (expected the assistant text under 'response')")
        quality = str(row.get("quality") or "")
        demos.append(world.Demo(example.question, _repair(row["response"]), example.golds, example.kind, quality))
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

    spec = sys.argv[1] if len(sys.argv) > 1 else "world:heldout"
    examples = load_examples(spec)
    print(f"{len(examples)} examples from {spec}; kinds {dict(Counter(ex.kind for ex in examples))}")
    for ex in examples[:3]:
        print(" ", ex)
