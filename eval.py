"""Evaluate a policy the way the paper does (arXiv 2510.14545, experimental setup): k independent
runs per question at temperature 0.6, top-p 0.95; Pass@1 (mean over runs, with its spread), Pass@k,
EM, F1, reward, format failures, tool calls and response length, per dataset.

    python eval.py --model tiny --dataset path/to/bamboogle/test.jsonl --limit 8 --runs 2
    python eval.py --preset qwen3-1.7b --model Qwen3-1.7B --adapter runs/x/checkpoint-40 --runs 5 \
        --dataset path/to/hotpotqa/test.jsonl --dataset path/to/gsm8k/test.jsonl
    (the eval-only flags are cli.EvalArgs; every Config flag applies too:
    python -m support.cli --help)

In and out: `evaluate(...)` (train.py calls it too) samples with the training rollout, branching off
(k = runs global chains per question), grades every response and returns the metrics below. With an
out_dir it appends one line per question to examples.jsonl as soon as its batch is done (question,
golds, and per run the full trajectory text, answer, grades, tool calls, finish) and writes
summary.json; run it again on the same folder and it skips the questions already there (resume).

What "correct" means (Pass@1 and Pass@k use it; EM, F1 and reward are always computed as in
support/data.py):
  1. QA (every other source): data.exact_match, i.e. equal after SQuAD normalisation to some gold.
  2. Math: the source is gsm8k, math500 or aime24, or the kind is "math" (the verl `ability`, the
     world's arithmetic questions). `math_equal`: both sides go through `normalize_math` (drop `$`,
     `\\left`/`\\right`, spacing commands, spaces, `^\\circ`, `%`; `\\text{ unit}` with a leading
     space is a unit and dropped, other `\\text{X}`/`\\mathrm{X}`/`\\mbox{X}` become X;
     `\\dfrac`/`\\tfrac` become `\\frac`; thousands separators `1,000`; a trailing `.0`; a trailing
     `.`; a leading `x=`), then equal strings, or both parse as numbers (integer, decimal, a/b,
     \\frac{a}{b}, with sign) within 1e-6 relative.
  3. `--judge_model`: additionally, an answer the rule rejects is shown to a local LLM judge
     (question, golds, predicted answer -> "Correct" / "Incorrect", greedy) and counts if it says
     Correct.
A response without an extractable `\\boxed{}` answer is wrong; the format check only affects reward
and `format_fail`.

Metrics: pass1 (mean of per-run accuracies), pass1_std (population std over runs), pass_at_k {k:
unbiased 1 - C(n-c, k)/C(n, k), n = runs, c = correct runs, averaged over questions}; per response:
em, f1, mean_reward, format_fail (share failing data.format_error), search_calls, python_calls,
response_tokens (tool results included); by_source: the same per source.
"""
from __future__ import annotations

if __name__ == "__main__":   # the command line is checked before the imports below (seconds of
    from support import cli  # torch): a bad one stops in a line, then this module runs main()
    cli.run_script("eval", cli.eval_config)

import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from aepo import Config
from rollout import rollout
from support import cli, data
# the flags, parsed and checked in support/cli.py (re-exported: eval.parse_args)
from support.cli import EvalArgs, parse_eval_args as parse_args  # noqa: F401
from support.policy import load_policy, make_tools, prompt_ids, system_prompt_for
from tools import describe_isolation

Judge = Callable[[str, tuple, str], bool]   # (question, golds, predicted answer) -> correct?


# --------------------------------------------------------------------------------------------------
# Grading: what counts as correct, and Pass@k

MATH_SOURCES = {"gsm8k", "math500", "aime24"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def is_math(example: data.Example) -> bool:
    return example.source in MATH_SOURCES or example.kind == "math"


def normalize_math(s: str) -> str:
    """LaTeX / number surface forms -> one canonical string (rules in the module docstring)."""
    s = re.sub(r"\\text\{\s[^{}]*\}", "", s)                              # "5\text{ cm}" -> "5"
    # "\text{Evelyn}" -> "Evelyn"
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)                     # not \rightarrow
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for junk in ("^{\\circ}", "^\\circ", "\\%", "%", "$", "\\!", "\\,", "\\;", "\\:", "\\ "):
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)                          # 1,000,000 -> 1000000
    s = re.sub(r"^[a-zA-Z]=", "", s.rstrip("."))                           # "x=5" -> "5"
    return re.sub(r"(?<=\d)\.0+$", "", s)                                  # "2.0" -> "2"


def to_number(s: str) -> float | None:
    """A normalised answer as a number: 12, -0.5, .5, 3/4, \\frac{3}{4}, -\\frac{3}{4}; else
    None."""
    if _NUMBER.fullmatch(s):
        return float(s)
    m = (re.fullmatch(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}", s)
         or re.fullmatch(r"()([^/]+)/([^/]+)", s))
    if m and _NUMBER.fullmatch(m[2]) and _NUMBER.fullmatch(m[3]) and float(m[3]) != 0:
        return (-1 if m[1] == "-" else 1) * float(m[2]) / float(m[3])
    return None


def math_equal(pred: str, golds) -> bool:
    """True if the prediction equals some gold after normalize_math, as a string or as a number."""
    p = normalize_math(pred)
    for gold in ((golds,) if isinstance(golds, str) else golds):
        g = normalize_math(gold)
        a, b = to_number(p), to_number(g)
        if p == g or (a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))):
            return True
    return False


def is_correct(pred: str | None, example: data.Example, judge: Judge | None = None) -> bool:
    if not pred:
        return False
    rule = (math_equal(pred, example.golds) if is_math(example)
            else data.exact_match(pred, example.golds) == 1.0)
    return rule or (judge is not None and judge(example.question, example.golds, pred))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one question with c correct out of n samples: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


JUDGE_PROMPT = ("Judge whether a predicted answer to a question is correct, given the gold "
                "answer(s).\n"
                "Question: {question}\nGold answer: {golds}\nPredicted answer: {pred}\n"
                "Reply with one word: Correct or Incorrect.")


def make_judge(model, tokenizer, max_new_tokens: int = 8) -> Judge:
    """A greedy LLM judge: True iff its reply's first verdict word is "Correct"."""
    def judge(question: str, golds, pred: str) -> bool:
        text = JUDGE_PROMPT.format(question=question, golds=" | ".join(golds), pred=pred)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        verdict = re.search(r"\b(in)?correct\b",
                            re.sub(r"<think>.*?</think>", "", reply, flags=re.S).lower())
        return bool(verdict) and not verdict[1]
    return judge


# --------------------------------------------------------------------------------------------------
# Evaluation: sample, grade, append to examples.jsonl, summarise


def grade(traj, example: data.Example, judge: Judge | None = None) -> dict:
    """One run of one question: everything a reader needs to check its grade."""
    text, golds = traj.text, example.golds
    pred = data.extract_answer(text)
    searches, pythons = data.tool_counts(text)
    return dict(text=text, answer=pred, correct=is_correct(pred, example, judge),
                em=data.exact_match(pred or "", golds), f1=data.f1_score(pred or "", golds),
                reward=data.reward(text, golds), format_error=data.format_error(text),
                search_calls=searches, python_calls=pythons,
                tool_calls=[[tool, arg] for tool, arg, _ in traj.tool_calls],
                response_tokens=len(traj.response_ids), finish=traj.finish)


def evaluate(model, tokenizer, examples: list[data.Example], tools, cfg: Config, *, runs: int,
             temperature: float, top_p: float, seed: int, system_prompt: str, out_dir=None,
             batch_questions: int = 16, desc: str = "eval", judge: Judge | None = None) -> dict:
    """Sample `runs` independent responses per example, grade them, return summarize(...) of all.

    cfg supplies the tools' call limit and the token budgets; branching is switched off here. The
    rollout seed of a batch is derived from (seed, index of its first example).
    """
    cfg = dataclasses.replace(cfg, branching=False, pre_monitor=False, branch_penalty=False, k=runs)
    path = Path(out_dir) / "examples.jsonl" if out_dir is not None else None
    done = _load_done(path, examples, runs) if path else {}
    todo = [i for i in range(len(examples)) if i not in done]
    long = sum(len(prompt_ids(tokenizer, examples[i].question, system_prompt))
               > cfg.max_prompt_tokens for i in todo)
    if long:
        print(f"warning: {long} prompts exceed --max_prompt_tokens {cfg.max_prompt_tokens} and "
              "lose their start (system prompt included); raise it", file=sys.stderr)
    was_training = model.training
    model.eval()
    sink = path.open("a", encoding="utf-8") if path else None
    try:
        with tqdm(total=len(examples), initial=len(done), desc=desc, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_questions):
                batch = todo[start:start + batch_questions]
                result = rollout(model, tokenizer, [examples[i].question for i in batch], tools,
                                 cfg, seed * 1_000_003 + batch[0], system_prompt,
                                 temperature=temperature, top_p=top_p)
                for q, i in enumerate(batch):
                    ex = examples[i]
                    trajs = result.trajectories[q * runs:(q + 1) * runs]
                    done[i] = dict(idx=i, question=ex.question, golds=list(ex.golds),
                                   source=ex.source, kind=ex.kind,
                                   runs=[grade(t, ex, judge) for t in trajs])
                    if sink:
                        sink.write(json.dumps(done[i], ensure_ascii=False) + "\n")
                if sink:
                    sink.flush()
                bar.update(len(batch))
    finally:
        model.train(was_training)
        if sink:
            sink.close()
    summary = summarize([done[i] for i in range(len(examples))], runs)
    if out_dir is not None:
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_done(path: Path, examples: list[data.Example], runs: int) -> dict[int, dict]:
    """Records already in examples.jsonl, checked against the questions being evaluated now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text.endswith("\n"):                     # a line cut short by a crash: drop it, redo it
        path.write_text(text := text[:text.rfind("\n") + 1], encoding="utf-8")
    done = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        i = rec["idx"]
        if (i >= len(examples) or rec["question"] != examples[i].question
                or len(rec["runs"]) != runs):
            raise SystemExit(f"{path} line {n}: question {i} with {len(rec['runs'])} runs does not "
                             f"match this evaluation ({runs} runs); resume only with the same "
                             "data, --limit and --runs, or choose a new --output_dir")
        done[i] = rec
    return done


def summarize(records: list[dict], runs: int) -> dict:
    """Metrics of graded records (module docstring), overall and per source."""
    out = _metrics(records, runs)
    sources = dict.fromkeys(r["source"] for r in records)
    out["by_source"] = {s: _metrics([r for r in records if r["source"] == s], runs)
                        for s in sources}
    return out


def _metrics(records: list[dict], runs: int) -> dict:
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    flat = [run for r in records for run in r["runs"]]
    per_run = [mean([float(r["runs"][j]["correct"]) for r in records]) for j in range(runs)]
    correct = [sum(run["correct"] for run in r["runs"]) for r in records]
    return dict(
        n=len(records), runs=runs, pass1=mean(per_run), pass1_std=statistics.pstdev(per_run),
        pass_at_k={k: mean([pass_at_k(runs, c, k) for c in correct]) for k in range(1, runs + 1)},
        em=mean([x["em"] for x in flat]), f1=mean([x["f1"] for x in flat]),
        mean_reward=mean([x["reward"] for x in flat]),
        format_fail=mean([float(x["format_error"] is not None) for x in flat]),
        search_calls=mean([x["search_calls"] for x in flat]),
        python_calls=mean([x["python_calls"] for x in flat]),
        response_tokens=mean([x["response_tokens"] for x in flat]))


def format_table(summary: dict) -> str:
    """Markdown: one row per source, plus "all" when there are several."""
    rows = dict(summary["by_source"])
    if len(rows) > 1:
        rows["all"] = summary
    k = summary["runs"]
    lines = [f"| dataset | n | Pass@1 | Pass@{k} | EM | F1 | reward | format fail | search | "
             "python | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['n']} | "
                     f"{100 * m['pass1']:.1f} ± {100 * m['pass1_std']:.1f} | "
                     f"{100 * m['pass_at_k'].get(k, 0.0):.1f} | {100 * m['em']:.1f} | "
                     f"{100 * m['f1']:.1f} | {m['mean_reward']:.3f} | "
                     f"{100 * m['format_fail']:.1f}% | {m['search_calls']:.2f} | "
                     f"{m['python_calls']:.2f} | {m['response_tokens']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None, checked: tuple | None = None) -> dict:
    """Evaluate as the command line `argv` says (or `checked`, what cli.eval_config returned for
    it)."""
    args, cfg, examples = checked or cli.eval_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(args.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    resolved = {"eval": dataclasses.asdict(args), "config": dataclasses.asdict(cfg)}
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    print(json.dumps(resolved))
    print(describe_isolation(cfg.unsafe_python))
    model, tokenizer = load_policy(cfg.model, lora_r=0, adapter=args.adapter,
                                   load_in_4bit=cfg.load_in_4bit, trainable=False)
    judge = (make_judge(*load_policy(args.judge_model, lora_r=0, trainable=False))
             if args.judge_model else None)
    system_prompt = system_prompt_for(cfg)
    summary = evaluate(model, tokenizer, examples, make_tools(cfg), cfg, runs=args.runs,
                       temperature=args.temperature, top_p=args.top_p, seed=cfg.seed,
                       system_prompt=system_prompt, out_dir=out,
                       batch_questions=args.batch_questions, judge=judge)
    print(format_table(summary))
    print(f"results: {out}/summary.json, every answer: {out}/examples.jsonl")
    return summary
