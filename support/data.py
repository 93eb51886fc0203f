"""Questions, answers and the one grader: `Example`, `Demo`, the system prompts, reward. Reading
them from files and the hub is loaders.py.

In and out:
- `reward(response, golds)` grades a decoded trajectory (arXiv 2510.14545, section 3): -1 on a
  format failure, else token F1 of the last `\\boxed{}` in the answer, +0.1 when F1 > 0 and both
  tools were used. Training and evaluation call this same function, so reward and metric cannot
  drift.

Decisions worth knowing:
1. Tool-result blocks (`" <result>\\n...\\n</result>"` right after `</search>` / `</python>`) are
   cut out before the format check, so only the policy's own words are graded. A block ends at the
   first `"\\n</result>"`: sound, as tools.result_block escapes agent tags in tool output, so no
   program or page can close its block and write an answer. One left-to-right scan: linear time.
2. `golds` must be a string or a list/tuple of strings: anything else (None, 98) is a caller's bug.
3. This module imports nothing of the project.
"""
import re
import string
from collections import Counter
from dataclasses import dataclass

@dataclass(frozen=True)
class Example:
    question: str
    golds: tuple[str, ...]  # gold answers; a prediction scores its best match
    source: str  # "world:train", "hotpotqa", a file stem, ...
    # question type for per-type stats: "1hop", "2hop", "math", the parquet ability, or ""
    kind: str = ""


@dataclass
class Demo:  # one SFT demonstration: a question and a full trajectory in the AEPO format
    question: str
    response: str  # the assistant text, tool-result blocks included
    golds: tuple[str, ...]
    kind: str
    quality: str  # "good", or the mistake it shows: "no_search", "wasted_search", "guessed_math"


# The paper's system prompt, verbatim from the released parquet files (with `\boxed` repaired).
SYSTEM_PROMPT = (
    r"You are a helpful assistant that can solve the given question step by step with the help of "
    r"the wikipedia search tool and python interpreter tool. Given a question, you need to first "
    r"think about the reasoning process in the mind and then provide the answer. During thinking, "
    r"you can invoke the wikipedia search tool to search and python interpreter tool to calculate "
    r"the math problem for fact information about specific topics if needed. The reasoning process "
    r"and answer are enclosed within <think> </think> and <answer> </answer> tags respectively, "
    r"and the search query and result are enclosed within <search> </search> and <result> "
    r"</result> tags respectively. For example, <think> This is the reasoning process. </think> "
    r"<search> search query here </search> <result> search result here </result> <think> This is "
    r"the reasoning process. </think> <python> python code here </python> <result> python "
    r"interpreter result here </result> <think> This is the reasoning process. </think> <answer> "
    r"The final answer is \[ \boxed{answer here} \] </answer>. In the last part of the answer, the "
    r"final exact answer is enclosed within \boxed{} with latex format."
)
# A one-sentence version for the tiny model, whose context is short.
# the tiny model: every token costs
SHORT_SYSTEM_PROMPT = "Use <search> and <python> tools, then <answer>."
# The tags of the trajectory format (single tokens in the tiny tokenizer).
AGENT_TAGS = ["<think>", "</think>", "<search>", "</search>", "<python>", "</python>", "<result>",
              "</result>", "<answer>", "</answer>"]

# ------------------------------------------------------------------------------------------ grading
_PUNCTUATION = set(string.punctuation)
_TOOL_CLOSES = ("</search>", "</python>")
_RESULT_OPEN, _RESULT_CLOSE = " <result>\n", "\n</result>"
_EMPTIED_RESULT = " <result></result>"  # a tool result as the format check sees it
_TOOL_TAG = re.compile(r"</?(?:search|python|result)>")
_BOXED, _BRACE = "\\boxed{", re.compile(r"[{}]")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles a/an/the, collapse
    whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _as_golds(golds) -> tuple[str, ...]:
    """A gold answer or a list/tuple of them, all strings (None would be graded against "None")."""
    if isinstance(golds, str):
        return (golds,)
    if isinstance(golds, (list, tuple)) and all(isinstance(g, str) for g in golds):
        return tuple(golds)
    bad = (next((g for g in golds if not isinstance(g, str)), None)
           if isinstance(golds, (list, tuple)) else golds)
    raise TypeError("golds must be a string or a list/tuple of strings, got "
                    f"{type(golds).__name__} holding {type(bad).__name__} {bad!r:.40}; convert "
                    "gold answers to strings when loading them")


def exact_match(pred: str, golds) -> float:
    """1.0 if the normalised prediction equals any normalised gold."""
    return max((float(normalize_answer(pred) == normalize_answer(g)) for g in _as_golds(golds)),
               default=0.0)


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
    """(start, end) of each tool-result block: `" <result>\\n...\\n</result>"` right after
    `</search>` or `</python>`, ending at the first `"\\n</result>"`. One left-to-right scan: linear
    time."""
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
    """Cut a response into model text (False) and the tool-result blocks the harness appended
    (True)."""
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
    """The policy's structure: each tool result emptied, and the content of each call that got a
    result blanked too (code may print or mention tags: it is an argument, not structure)."""
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
    """The content (stripped) of the last brace-balanced `\\boxed{...}` inside the last
    `<answer>...</answer>`."""
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
    if (text.count("<answer>") != 1 or text.count("</answer>") != 1
            or text.find("<answer>") > text.find("</answer>")):
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
        # a result the policy wrote is no result
        if not text.startswith(_EMPTIED_RESULT, tags[i + 1].end()):
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
    """arXiv 2510.14545, section 3: -1 on format failure; else F1, plus 0.1 when F1 > 0 and both
    tools were used. golds: a string or a list/tuple of strings (anything else raises TypeError)."""
    golds = _as_golds(golds)
    if format_error(response) is not None:
        return -1.0
    f1 = f1_score(extract_answer(response) or "", golds)
    if f1 == 0.0:
        return 0.0
    searches, pythons = tool_counts(response)
    return f1 + 0.1 if searches and pythons else f1


