"""Reading questions and demonstrations from files and the hub: `load_examples(spec)` reads a verl
parquet, a jsonl file or a hub dataset id into `data.Example`s; `load_demos(path)` reads SFT
demonstrations (`data.Demo`s) from jsonl; `save_jsonl` writes them back. Named built-in datasets are
their owner's business (world.load_examples answers "world:*" and passes every other name here).

    python -m support.loaders path/to/valid.parquet   # counts and first examples

Decisions worth knowing:
1. A GSM8K-style gold ("... #### 18") is cut to its final answer ("18"); the parquet `ability` is
   the kind.
2. Loaders stop at the first problem with the file, the line or row, and the fix: an empty file,
   bytes that are not UTF-8, a missing path, a folder, a question that is not a string, a boolean
   answer.
3. The released files wrote "\\boxed" in a non-raw Python string; the lost backslash is repaired.
"""
import json
import math
import numbers
import os
import re
from collections import Counter
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from support.data import Demo, Example

QUESTION_FIELDS = ("question", "Question", "problem")
ANSWER_FIELDS = ("answer", "Answer", "golds", "solution")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
_SPLIT_NAMES = {"test", "train", "dev", "val", "valid", "validation"}
# a name that is surely a path
_FILE_TYPES = (".parquet", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".arrow")


def _repair(text: str) -> str:
    """The released files wrote "\\boxed" in a non-raw Python string: "\\b" became a backspace
    byte."""
    return text.replace("\x08", "\\b")


def _is_empty(value) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) == 0
    # NaN != NaN
    return value is None or value != value or (isinstance(value, str) and not value.strip())


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
            raise ValueError(f"{where}: the {field} is {_kind_of(x)} ({x!r:.60}); write it as a "
                             "string, a number or a list of them")
        if isinstance(x, numbers.Real) and not math.isfinite(x):  # JSON's Infinity, NaN
            raise ValueError(f"{where}: the {field} is {x!r}, not a finite number; write it as a "
                             f"string (\"{x!r}\") if that is the answer")
    # A GSM8K solution ends with "#### <final answer>": grade against the final answer only.
    return tuple(_repair(str(x).rsplit("####", 1)[-1].strip() if "####" in str(x) else str(x))
                 for x in items)


def _example(row: dict, where: str, source: str, need_answer: bool = True) -> Example:
    """One question/answer row of a jsonl or plain parquet file."""
    (q_field, question), (a_field, answer) = (_first(row, QUESTION_FIELDS),
                                              _first(row, ANSWER_FIELDS))
    if question is None:
        raise ValueError(f"{where}: no question field (expected a string under one of "
                         f"{', '.join(QUESTION_FIELDS)})")
    if not isinstance(question, str):
        raise ValueError(f"{where}: the question ({q_field!r}) is {_kind_of(question)} "
                         f"({question!r:.60}), not a string")
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
        raise ValueError(f"{where}: the prompt has no user message; expected a list of chat "
                         "messages with the question as the content of the one whose role is "
                         "'user'")
    truth = (row["reward_model"].get("ground_truth") if isinstance(row["reward_model"], dict)
             else None)
    if _is_empty(truth):
        raise ValueError(f"{where}: no reward_model.ground_truth; expected reward_model = "
                         f"{{'ground_truth': answer}}")
    kind = row.get("ability") if isinstance(row.get("ability"), str) else ""
    return Example(_repair(users[-1]["content"]), _golds(truth, where, "ground_truth"), source,
                   kind)


def _source(path: Path) -> str:
    """The file stem, or its folder's name when the stem is only a split name
    (eval/hotpotqa/test.jsonl)."""
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
                raise ValueError(f"{path} line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows += 1
            yield n, row
    if rows == 0:
        raise ValueError(f"{path}: no rows (the file is empty or blank); expected one JSON object "
                         "a line")


def _read_jsonl(path: Path) -> list[Example]:
    return [_example(row, f"{path} line {n}", _source(path)) for n, row in _jsonl_rows(path)]


def _read_parquet(path: Path) -> list[Example]:
    import pandas as pd  # imported here: a second of start-up that only parquet files need

    _check_file(path, ".parquet")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable parquet file "
                         f"({' '.join(str(e).split())})") from None
    columns, rows = set(table.columns), table.to_dict("records")
    if not rows:
        raise ValueError(f"{path}: no rows (the table is empty)")
    if {"prompt", "reward_model"} <= columns:
        return [_verl_example(row, f"{path} row {i} (0-based)", _source(path))
                for i, row in enumerate(rows)]
    if "question" in columns and columns & {"answer", "golds"}:
        return [_example(row, f"{path} row {i} (0-based)", _source(path))
                for i, row in enumerate(rows)]
    raise ValueError(f"{path}: unrecognised columns {sorted(columns)}; expected the verl columns "
                     "prompt + reward_model, or question + answer")


def _read_hub(spec: str) -> list[Example]:
    """The .parquet/.jsonl files of a hub dataset `owner/name[:split]`: downloaded, or with
    HF_HUB_OFFLINE set, read from the local hub cache (where an earlier download put them)."""
    repo_id, _, split = spec.partition(":")
    unreachable = (f"cannot load {spec!r}: there is no local file or folder of that name, and the "
                   "Hugging Face hub is unreachable ({}); download the data elsewhere and pass a "
                   "local .parquet or .jsonl file")
    import huggingface_hub  # imported here: only hub ids need it
    import huggingface_hub.constants

    # data/test-0000.parquet is split "test"
    in_split = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    wanted = lambda f: f.endswith((".parquet", ".jsonl")) and (not split or in_split.search(f))
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        try:
            folder = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset",
                                                            local_files_only=True))
        except (OSError, huggingface_hub.errors.LocalEntryNotFoundError):
            raise ConnectionError(unreachable.format(
                "HF_HUB_OFFLINE is set and the dataset is not in the local hub cache "
                f"{huggingface_hub.constants.HF_HUB_CACHE}")) from None
        paths = sorted(p for p in folder.rglob("*")
                       if p.is_file() and wanted(p.relative_to(folder).as_posix()))
    else:
        try:
            files = [f for f in huggingface_hub.list_repo_files(repo_id, repo_type="dataset")
                     if wanted(f)]
            paths = [Path(huggingface_hub.hf_hub_download(repo_id, f, repo_type="dataset"))
                     for f in files]
        except huggingface_hub.errors.RepositoryNotFoundError:
            raise ValueError(f"{spec!r}: no such dataset on the Hugging Face hub (nor a local "
                             "file)") from None
        except (OSError, huggingface_hub.errors.HTTPError) as e:
            raise ConnectionError(unreachable.format(" ".join(str(e).split()))) from None
    if not paths:
        raise ValueError(f"{spec!r}: the hub dataset has no .parquet or .jsonl files "
                         f"{split}".rstrip())
    examples = [ex for p in paths
                for ex in (_read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p))]
    return [replace(ex, source=repo_id) for ex in examples]


def _is_local(spec: str) -> bool:
    """Whether a name can only mean a local path (./x, /x, ~/x, a/b/c, x.json, or a/b with a local
    a/)."""
    parts = Path(spec).parts
    return (spec.startswith((".", "/", "~")) or spec.lower().endswith(_FILE_TYPES) or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def head(examples: list, limit: int | None) -> list:
    """The first `limit` examples (None: all); a limit below 1 is an error, not an empty dataset."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError("limit must be a positive number of examples or None (all), got "
                         f"{limit!r}")
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
        raise ValueError(f"unknown data {spec!r}: expected a .parquet or .jsonl file, or a hub "
                         "dataset id owner/name[:split]")
    return head(examples, limit)


def load_demos(path: str | Path) -> list[Demo]:
    """SFT demonstrations from a jsonl of {"question", "response", "answer" (optional)} objects."""
    path, demos = Path(path).expanduser(), []
    for n, row in _jsonl_rows(path):
        example = _example(row, f"{path} line {n}", "", need_answer=False)
        response = row.get("response")
        if not isinstance(response, str) or not response.strip():
            found = ("no response field" if response is None else "an empty response"
                     if isinstance(response, str) else
                     f"the response is {_kind_of(response)} ({response!r:.60})")
            raise ValueError(f"{path} line {n}: {found} (expected the assistant text, a string, "
                             "under 'response')")
        quality = str(row.get("quality") or "")
        demos.append(Demo(example.question, _repair(row["response"]), example.golds, example.kind,
                          quality))
    return demos


def save_jsonl(rows: Iterable, path: str | Path) -> None:
    """Write dicts or dataclasses (Example, Demo) one JSON object a line; load_demos reads Demo
    files back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if is_dataclass(row) else row,
                               ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    # python -m support.loaders FILE.parquet | FILE.jsonl | owner/name[:split]
    examples = load_examples(sys.argv[1])
    print(f"{len(examples)} examples from {sys.argv[1]}; kinds "
          f"{dict(Counter(ex.kind for ex in examples))}")
    for ex in examples[:3]:
        print(" ", ex)
