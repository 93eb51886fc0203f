"""A real pretrained LM learns to search with AEPO on a CPU: SmolLM2-135M-Instruct
(`python train.py --model smollm2-135m`, the recipe `smollm2-135m` in aepo.py) on the built-in
world, for several seeds: a short LoRA SFT on the world's demonstrations, AEPO, and held-out Pass@1
before and after RL (64 questions x 4 runs, temperature 1).

    python benchmarks/smollm2.py                       # seeds 0 and 1, two at a time (one core each)
    python benchmarks/smollm2.py --seeds 0 --parallel 1
    python benchmarks/smollm2.py -- --lr 1e-4          # extra train.py flags after --
    python benchmarks/smollm2.py --reuse               # only re-read finished run folders

Each seed's run folder (runs/smollm2/seed-N) holds curves.png (reward, entropy, tool calls per RL
step) and report.md. This script reads the folders and writes benchmarks/results/smollm2.md with the
machine:
  - held-out Pass@1, format failures and tool calls per answer before and after RL, per seed;
  - per question kind (1-hop, 2-hop, arithmetic): Pass@1, the share of answers that searched, the
    share whose first query copies a name from the question verbatim, the share of arithmetic
    answers that computed through Python;
  - tool calls attempted vs executed: attempted = calls the policy wrote in its own text (an opening
    tag, then its closing tag), executed = result blocks the harness appended after them;
  - the RL steps (seconds, reward, accuracy, entropy, tool calls).
It prints the tables, then one `name=value` per line, `pass1_before=... pass1_after=...` (mean over
seeds) last.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import fresh_run, machine, run_minutes  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import data  # noqa: E402

KINDS = ("1hop", "2hop", "math")
_CALL = re.compile(r"<(search|python)>.*?</\1>", re.DOTALL)


def calls(text: str) -> tuple[int, int]:
    """(attempted, executed) tool calls of one response (module docstring)."""
    pieces = data.split_response(text)
    own = "".join(piece for piece, is_result in pieces if not is_result)
    return len(_CALL.findall(own)), sum(is_result for _, is_result in pieces)


def tally(texts: list[str]) -> tuple[int, int, int]:
    """(responses, attempted, executed) over many responses."""
    pairs = [calls(t) for t in texts]
    return len(texts), sum(a for a, _ in pairs), sum(e for _, e in pairs)


def answers(folder: Path) -> list[dict]:
    """Every graded held-out answer of an eval folder, with its question and kind."""
    return [{**run, "question": rec["question"], "kind": rec.get("kind", "")}
            for line in open(folder / "examples.jsonl") for rec in [json.loads(line)]
            for run in rec["runs"]]


def copies_name(answer: dict) -> bool:
    """Its first search query appears verbatim in the question (a name copied right)."""
    queries = [arg for tool, arg in answer["tool_calls"] if tool == "search"]
    return bool(queries) and queries[0].strip() in answer["question"]


def by_kind(graded: list[dict]) -> dict[str, dict]:
    """Per question kind of graded answers (answers()): Pass@1, searched, copied name, Python
    (arithmetic only), answers."""
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    out = {}
    for kind in KINDS:
        rows = [a for a in graded if a["kind"] == kind]
        out[kind] = dict(n=len(rows), pass1=mean([a["correct"] for a in rows]),
                         searched=mean([a["search_calls"] > 0 for a in rows]),
                         copied=mean([copies_name(a) for a in rows]),
                         python=mean([a["python_calls"] > 0 for a in rows]),
                         format_fail=mean([a["format_error"] is not None for a in rows]))
    return out


def run_seeds(args) -> None:
    """train.py for every seed, `args.parallel` at a time, one torch thread each when parallel."""
    threads = ["--threads", str(max(1, (os.cpu_count() or 2) // args.parallel))]
    active = []
    for seed in args.seeds:
        while len(active) >= args.parallel:
            active.pop(0).wait()
        run = fresh_run(ROOT / args.out / f"seed-{seed}")
        cmd = [sys.executable, "train.py", "--model", "smollm2-135m", "--seed", str(seed),
               "--output_dir", str(run), *threads, *args.rest]
        print(f"seed {seed}: {' '.join(cmd[1:])} (log: {run / 'train.log'})", flush=True)
        log = open(run / "train.log", "w")
        active.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    for proc in active:
        proc.wait()
    for seed in args.seeds:
        run = ROOT / args.out / f"seed-{seed}"
        if not (run / "eval-rl" / "summary.json").exists():
            sys.exit(f"error: seed {seed} did not finish; its log: {run / 'train.log'}")


def seed_lines(seed: int, run: Path) -> tuple[list[str], dict]:
    """The markdown of one seed's run and its key figures."""
    steps = [json.loads(line) for line in open(run / "metrics.jsonl")]
    sft = [json.loads(line) for line in open(run / "sft_metrics.jsonl")]
    before = json.loads((run / "eval-sft" / "summary.json").read_text())
    after = json.loads((run / "eval-rl" / "summary.json").read_text())
    rl_texts = [json.loads(line)["text"] for line in open(run / "samples.jsonl")]
    graded = {name: answers(run / f"eval-{name}") for name in ("sft", "rl")}
    kinds = {"SFT start": by_kind(graded["sft"]), "after RL": by_kind(graded["rl"])}
    lines = [f"## Seed {seed}: {run_minutes(run):.1f} min from the first line to the held-out "
             f"table, SFT loss {sft[0]['loss']:.2f} -> {sft[-1]['loss']:.2f} over {len(sft)} steps",
             "", f"| held-out (n = {before['n']} x {before['runs']} runs) | Pass@1 | format failures"
             " | search calls | python calls | response tokens |", "|---|---|---|---|---|---|"]
    for name, m in (("SFT start", before), ("after RL", after)):
        lines.append(f"| {name} | {m['pass1']:.3f} | {m['format_fail']:.3f} | "
                     f"{m['search_calls']:.2f} | {m['python_calls']:.2f} | "
                     f"{m['response_tokens']:.0f} |")
    lines += ["", "| kind | answers | Pass@1 | searched | first query copies a name | "
              "arithmetic through Python | format failures |", "|---|---|---|---|---|---|---|"]
    for name, table in kinds.items():
        for kind, k in table.items():
            py = f"{k['python']:.2f}" if kind == "math" else "-"
            lines.append(f"| {kind} ({name}) | {k['n']} | {k['pass1']:.3f} | {k['searched']:.2f} "
                         f"| {k['copied']:.2f} | {py} | {k['format_fail']:.2f} |")
    lines += ["", "| responses | n | tool calls attempted | executed |", "|---|---|---|---|"]
    for name, texts in (("held-out, SFT start", [a["text"] for a in graded["sft"]]),
                        ("RL rollouts (samples.jsonl)", rl_texts),
                        ("held-out, after RL", [a["text"] for a in graded["rl"]])):
        count, attempted, executed = tally(texts)
        lines.append(f"| {name} | {count} | {attempted} | {executed} |")
    lines += ["", "| RL step | seconds | reward | acc | entropy | search calls | python calls |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['step'] + 1} | {s['step_s']:.0f} | {s['reward']:.3f} | {s['acc']:.3f} | "
              f"{s['entropy']:.3f} | {s['search_calls']:.2f} | {s['python_calls']:.2f} |"
              for s in steps]
    key = dict(pass1_before=before["pass1"], pass1_after=after["pass1"],
               format_fail_before=before["format_fail"], format_fail_after=after["format_fail"],
               tool_calls_before=before["search_calls"] + before["python_calls"],
               tool_calls_after=after["search_calls"] + after["python_calls"],
               minutes=run_minutes(run))
    return lines + [""], key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="comma-separated seeds (default 0,1)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default="runs/smollm2", help="folder of the seed folders")
    parser.add_argument("--reuse", action="store_true", help="read finished runs, do not train")
    parser.add_argument("rest", nargs="*", help="extra train.py flags (after --)")
    args = parser.parse_args()
    if not args.reuse:
        run_seeds(args)
    config = json.loads((ROOT / args.out / f"seed-{args.seeds[0]}" / "config.json").read_text())
    recipe = " ".join(["--model smollm2-135m", *args.rest])
    lines = [f"# SmolLM2-135M-Instruct learns to search on a CPU: `python benchmarks/smollm2.py"
             f"{' -- ' + ' '.join(args.rest) if args.rest else ''}`", "",
             f"Machine: {machine()}; {args.parallel} run(s) at a time", "",
             f"Recipe: `python train.py {recipe}` (preset {config['preset']}, {config['algo']}; "
             f"{config['steps']} RL steps of {config['questions_per_step']} questions x k = "
             f"{config['k']}, lr {config['lr']}; SFT {config['sft_steps']} steps of "
             f"{config['sft_batch']} demonstrations)", ""]
    keys = {}
    for seed in args.seeds:
        more, keys[seed] = seed_lines(seed, ROOT / args.out / f"seed-{seed}")
        lines += more
    figures = []
    for seed, key in keys.items():
        figures += [f"{name}_seed{seed}={value:.3f}" for name, value in key.items()]
    gains = [k["pass1_after"] - k["pass1_before"] for k in keys.values()]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    figures += [f"gain_mean={statistics.mean(gains):.3f}", f"gain_min={min(gains):.3f}",
                f"gain_std={spread:.3f}",
                f"pass1_before={statistics.mean(k['pass1_before'] for k in keys.values()):.3f} "
                f"pass1_after={statistics.mean(k['pass1_after'] for k in keys.values()):.3f}"]
    out = ROOT / "benchmarks" / "results" / "smollm2.md"
    out.write_text("\n".join(lines + ["```", *figures, "```"]) + "\n")
    print("\n".join(lines + figures))


if __name__ == "__main__":
    main()
