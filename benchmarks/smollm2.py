"""A real pretrained LM trained with AEPO on CPU: SmolLM2-135M-Instruct (`--model smollm2-135m`)
on the built-in world: a short LoRA SFT on the world's demonstrations, a few AEPO steps, and
held-out Pass@1 before and after RL.

    python benchmarks/smollm2.py                       # ~15-20 min on 2 CPU cores
    python benchmarks/smollm2.py -- --steps 4          # extra train.py flags after --
    python benchmarks/smollm2.py --reuse               # only re-read a finished run folder

Runs `train.py` with RECIPE below, then reads the run folder:
  - tool calls attempted vs executed, in every held-out response (eval-sft/, eval-rl/) and in the RL
    samples (samples.jsonl): attempted = calls the policy wrote in its own text (an opening tag,
    then its closing tag), executed = result blocks the harness appended after them. The two differ
    when a call is dropped, refused at the call limit, or cut by the length budget;
  - seconds per RL step (metrics.jsonl: step_s, of which rollout_s);
  - held-out Pass@1 of the SFT start and after RL (n questions x runs, temperature 1).
Writes benchmarks/results/smollm2.md with the machine.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import fresh_run, machine, run_minutes  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import data  # noqa: E402

# The short system prompt: the paper's (~270 SmolLM2 tokens) would make prompts 7x longer, and the
# SFT teaches the format anyway. One search page per call (--top_k 1) keeps the longest
# demonstrations (two searches + Python) under 384 response tokens. One torch thread: on shared
# cores two OpenMP threads stall at every op's barrier.
RECIPE = ["--model", "smollm2-135m", "--system_prompt", "short", "--threads", "1", "--top_k", "1",
          "--sft_demos", "200", "--sft_steps", "16", "--sft_batch", "4", "--sft_lr", "3e-3",
          "--steps", "4", "--questions_per_step", "4", "--k", "4", "--global_rollouts", "2",
          "--max_response_tokens", "384", "--segment_tokens", "64", "--lr", "1e-3",
          "--eval_limit", "16", "--eval_runs", "2", "--save_every", "2", "--sample_every", "1"]
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


def eval_texts(folder: Path) -> list[str]:
    return [run["text"] for line in open(folder / "examples.jsonl")
            for run in json.loads(line)["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/smollm2", help="the run folder")
    parser.add_argument("--reuse", action="store_true", help="read a finished run, do not train")
    parser.add_argument("rest", nargs="*", help="extra train.py flags (after --)")
    args = parser.parse_args()
    run = ROOT / args.out
    if not args.reuse:
        fresh_run(run)
        cmd = [sys.executable, "train.py", *RECIPE, "--output_dir", str(run), *args.rest]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    config = json.loads((run / "config.json").read_text())
    steps = [json.loads(line) for line in open(run / "metrics.jsonl")]
    sft = [json.loads(line) for line in open(run / "sft_metrics.jsonl")]
    before = json.loads((run / "eval-sft" / "summary.json").read_text())
    after = json.loads((run / "eval-rl" / "summary.json").read_text())
    rl_texts = [json.loads(line)["text"] for line in open(run / "samples.jsonl")]
    minutes = run_minutes(run)

    rows = [("held-out, SFT start", tally(eval_texts(run / "eval-sft"))),
            ("RL rollouts (samples.jsonl)", tally(rl_texts)),
            ("held-out, after RL", tally(eval_texts(run / "eval-rl")))]
    step_s = [s["step_s"] for s in steps]
    n, runs = before["n"], before["runs"]
    lines = [f"# SmolLM2-135M-Instruct on the built-in world, CPU: `python benchmarks/smollm2.py "
             f"{' '.join(args.rest)}`".rstrip() + "", "",
             f"Machine: {machine()}", "",
             f"Recipe: `python train.py {' '.join(RECIPE + args.rest)}` ({config['algo']}; "
             f"whole run {minutes:.1f} min, "
             f"SFT loss {sft[0]['loss']:.2f} -> {sft[-1]['loss']:.2f} over {len(sft)} steps)", "",
             "| responses | n | tool calls attempted | executed | executed / attempted |",
             "|---|---|---|---|---|"]
    for name, (count, attempted, executed) in rows:
        share = f"{executed / attempted:.3f}" if attempted else "-"
        lines.append(f"| {name} | {count} | {attempted} | {executed} | {share} |")
    lines += ["", "| RL step | seconds | of which rollout | reward | acc "
              "| search calls | python calls |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['step'] + 1} | {s['step_s']:.1f} | {s['rollout_s']:.1f} | {s['reward']:.3f} "
              f"| {s['acc']:.3f} | {s['search_calls']:.2f} | {s['python_calls']:.2f} |"
              for s in steps]
    lines += ["", f"Seconds per RL step: mean {statistics.mean(step_s):.1f}, "
              f"median {statistics.median(step_s):.1f} "
              f"({config['questions_per_step']} questions x k = {config['k']}).", "",
              f"| held-out (n = {n} questions x {runs} runs, "
              f"temperature {config['eval_temperature']}) | Pass@1 | "
              f"format failures | search calls | python calls |", "|---|---|---|---|---|"]
    for name, m in (("SFT start", before), ("after RL", after)):
        lines.append(f"| {name} | {m['pass1']:.3f} | {m['format_fail']:.3f} "
                     f"| {m['search_calls']:.2f} | {m['python_calls']:.2f} |")
    lines += ["", f"pass1_before={before['pass1']:.3f} pass1_after={after['pass1']:.3f}"]
    out = ROOT / "benchmarks" / "results" / "smollm2.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
