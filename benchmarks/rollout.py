"""Rollout throughput of the tree sampler against two baselines, on the tiny policy after SFT.

    python benchmarks/rollout.py                             # model runs/demo/seed-0/sft, 2 threads
    python benchmarks/rollout.py --model /path/to/sft --threads 1 --questions 2 --k 2
                                                             # a quick look

Same work in every mode: the first 8 held-out world questions, k = 8 each, the tiny Config's
budgets, seed 0, greedy decoding, local tools (BM25 + Python sandbox). Two settings: the GRPO chain
(branching off: k global trajectories per question) and the AEPO tree (pre-monitoring,
entropy-guided branching, branch penalty). The policy is the bare SFT'd model, as eval loads it (RL
samples through LoRA adapters: see benchmarks/step.py). Three modes, each an engine of
`rollout(..., engine=...)`:
  naive    one trajectory at a time; every round re-encodes its whole sequence
  batched  every active trajectory of every question in one generate call; full re-encode each round
  tree     ours: batched, and the KV cache is kept across rounds and copied to branch children and
           (each question's prompt) to every global the question starts
Each (setting, mode) runs in a fresh subprocess: load, warm up on two other questions, time.
Columns:
  wall s          median wall time of --repeats identical timed rollout calls (their range in
                  brackets)
  gen tok/s       tokens sampled by the policy / that median wall (tool time included)
  prefill/gen     tokens encoded without being sampled (prompts, tool results, re-encoded history)
                  per sampled token: the sampler's own `prefill_tokens / generated_tokens` (real
                  tokens)
  positions/gen   every position the model computed (padding, fillers and finished rows still in the
                  batch included; counted by a forward hook) per sampled token
  tool s          time during which at least one tool call was running (calls run in parallel
                  threads)
  rounds / calls  the sampler's rounds (every live row samples one segment per round) and the
                  model's generate calls (naive: one per row and round; a round in which a branch
                  decision is due takes two calls: up to the decision, then the rest)
  peak RSS        resident-set high-water mark of the timed rollout alone (kernel VmHWM, reset after
                  the warm-up via /proc/self/clear_refs; else getrusage's ru_maxrss); growth over
                  its start
Greedy outputs (response_ids, loss masks) must equal naive's: OK, or MISMATCH with where the first
difference is (a sampled token: the model; a tool result: the tools gave another answer). Writes
benchmarks/results/rollout.md; the last line is `speedup_vs_naive=X` (tree over naive, AEPO tree).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from common import machine, busy_seconds  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SETTINGS = {"grpo": "GRPO chain", "aepo": "AEPO tree"}
MODES = ("naive", "batched", "tree")
ENGINE = {"naive": "naive", "batched": "reencode", "tree": "cached"}    # rollout(engine=...)


def tps(r: dict) -> float:
    return r["generated"] / r["wall_s"]


def where(a: list, b: list) -> str:
    """Where two [response_ids, loss_mask] pairs first differ: a sampled token or a tool result."""
    j = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), min(len(a[0]), len(b[0])))
    return "tool result" if j < len(a[1]) and a[1][j] == 0 else "sampled token"


def code_version() -> str:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,
                                    text=True).stdout.split()
    dirty = [f for f in git("status", "--short", "--", "*.py") if f.endswith(".py")]
    return " ".join(git("rev-parse", "--short", "HEAD")) + (
        f" + uncommitted {', '.join(dirty)}" if dirty else "")




# --------------------------------------------------------------------------------------------------
# Measuring inside one worker process


def timed(tools: dict, spans: list) -> dict:
    """The same tools, each call's (start, end) appended to `spans` (calls run in parallel
    threads)."""
    lock = threading.Lock()

    def wrap(fn):
        def call(arg):
            t0 = time.perf_counter()
            try:
                return fn(arg)
            finally:
                with lock:
                    spans.append((t0, time.perf_counter()))
        return call
    return {name: wrap(fn) for name, fn in tools.items()}




def peak_reset() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not
    allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mb(key: str) -> float:
    return int(next(l for l in open("/proc/self/status")
                    if l.startswith(key + ":")).split()[1]) / 1024


def worker(args) -> dict:
    import torch

    from support import world
    from aepo import Config
    from support.cli import resolve
    from support.policy import load_policy, make_tools, system_prompt_for
    from rollout import rollout

    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(resolve(Config(algo=args.setting, output_dir="unused", seed=0)),
                              k=args.k)
    model, tok = load_policy(args.model, lora_r=0, trainable=False)
    model.eval()
    positions = [0]                  # every position the model computes, padding included
    count = lambda module, args_, kwargs: positions.__setitem__(
        0, positions[0] + kwargs["input_ids"].numel())
    model.register_forward_pre_hook(count, with_kwargs=True)
    calls, generate = [0], model.generate

    def counted_generate(*a, **kw):
        calls[0] += 1
        return generate(*a, **kw)
    model.generate = counted_generate
    heldout = world.load_examples("world:heldout")
    questions = [e.question for e in heldout[:args.questions]]
    warm = [e.question for e in heldout[args.questions:args.questions + 2]]
    spans: list = []
    tools = timed(make_tools(cfg), spans)
    run = lambda qs: rollout(model, tok, qs, tools, cfg, seed=0,
                             system_prompt=system_prompt_for(cfg),
                             greedy=True, engine=ENGINE[args.worker])
    run(warm)
    spans.clear()
    positions[0] = 0
    reset_ok = peak_reset()
    rss_start = status_mb("VmRSS")
    walls = []
    for _ in range(args.repeats):            # identical greedy runs; the median wall is reported
        spans.clear()
        positions[0] = calls[0] = 0
        t0 = time.perf_counter()
        res = run(questions)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    peak = (status_mb("VmHWM") if reset_ok
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"wall_s": wall, "walls": walls, "generated": res.generated_tokens,
            "prefill": res.prefill_tokens,
            "positions": positions[0], "tool_calls": len(spans), "tool_s": busy_seconds(spans),
            "rounds": res.rounds, "calls": calls[0],
            "peak_mb": peak, "rss_start_mb": rss_start,
            "peak_method": "VmHWM" if reset_ok else "ru_maxrss",
            "branches": sum(s.n_branch for s in res.stats),
            "prompt_prefill": sum(s.n_global * len(res.trajectories[q * cfg.k].prompt_ids)
                                  for q, s in enumerate(res.stats)),
            "prompt_once": sum(len(res.trajectories[q * cfg.k].prompt_ids)
                               for q in range(len(questions))),
            "responses": [[t.response_ids, t.loss_mask] for t in res.trajectories]}


# --------------------------------------------------------------------------------------------------
# The driver: one fresh process per (setting, mode), then the table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/demo/seed-0/sft", help="SFT'd tiny policy folder")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--questions", type=int, default=8, help="held-out world questions")
    p.add_argument("--k", type=int, default=8, help="trajectories per question")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per (setting, mode); median wall")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.md"))
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)   # internal: one measurement
    p.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    shown = Path(os.path.abspath(args.model))      # as given (a link into .cache/ stays one)
    args.model = str(Path(args.model).resolve())
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"--model {args.model}: no model there. Run `python train.py "
                 "--output_dir runs/demo/seed-0 --stage sft` (or `python benchmarks/demo.py`) "
                 "to write the SFT'd tiny policy, or pass --model FOLDER.")
    if args.worker:
        return print(json.dumps(worker(args)))

    results, load = {}, [os.getloadavg()[0]]
    for setting in args.settings:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--setting", setting,
                   "--model", args.model, "--threads", str(args.threads),
                   "--questions", str(args.questions), "--k", str(args.k),
                   "--repeats", str(args.repeats)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"worker {setting}/{mode} failed:\n{out.stderr[-3000:]}")
            results[setting, mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{setting}/{mode}: {tps(r):.0f} tok/s in {r['wall_s']:.1f}s", file=sys.stderr,
                  flush=True)

    load.append(os.getloadavg()[0])
    rows = ["| setting | mode | generated | wall s (range) | gen tok/s | vs naive | prefill/gen "
            "| positions/gen | rounds / calls | branches | tool calls | tool s "
            "| peak RSS MB (growth) | greedy = naive |", "|---" * 14 + "|"]
    notes = []
    for s in args.settings:
        R = {m: results[s, m] for m in MODES}
        for m, r in R.items():
            diff = [where(a, b) for a, b in zip(r["responses"], R["naive"]["responses"]) if a != b]
            same = ("ref" if m == "naive" else "OK" if not diff else
                    f"MISMATCH {len(diff)}/{len(r['responses'])} "
                    f"(first: {', '.join(sorted(set(diff)))})")
            rows.append(f"| {SETTINGS[s]} | {m}{' (ours)' * (m == 'tree')} | {r['generated']} "
                        f"| {r['wall_s']:.2f} ({min(r['walls']):.2f}-{max(r['walls']):.2f}) "
                        f"| {tps(r):.0f} | {tps(r) / tps(R['naive']):.2f}x "
                        f"| {r['prefill'] / r['generated']:.2f} "
                        f"| {r['positions'] / r['generated']:.2f} | {r['rounds']} / {r['calls']} "
                        f"| {r['branches']} "
                        f"| {r['tool_calls']} | {r['tool_s']:.3f} "
                        f"| {r['peak_mb']:.0f} (+{r['peak_mb'] - r['rss_start_mb']:.0f}) "
                        f"| {same} |")
        tree = R["tree"]
        notes.append(f"- {SETTINGS[s]}: tree / naive gen tok/s = "
                     f"{tps(tree) / tps(R['naive']):.2f}x (target >= 3); "
                     "batched / tree prefill per generated token = "
                     f"{R['batched']['prefill'] / tree['prefill']:.2f}x "
                     "(target >= 3). The tree encodes each question's prompt once for all the "
                     "globals it starts (its last token is fed per global), each tool result once "
                     "(branch children copy it with the parent's cache), and one re-fed token per "
                     "segment continued")
    head = "aepo" if "aepo" in args.settings else args.settings[0]
    report = [f"# Rollout throughput: naive vs batched vs tree (last line: {SETTINGS[head]})", "",
              f"Machine: {machine()}; torch threads {args.threads}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; code {code_version()}; "
              f"load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end, on "
              f"{os.cpu_count()} cores (above the core count, other jobs shared the CPU and the "
              "walls are slower and noisier; the ratios between modes of one run still compare)",
              "",
              f"Model {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}; "
              f"{args.questions} held-out world questions x k={args.k}; seed 0, greedy; "
              f"tiny Config budgets; median wall of {args.repeats} "
              f"timed runs; peak RSS by "
              f"{results[head, 'tree']['peak_method']}.", "", *rows, "", *notes, "",
              f"speedup_vs_naive={tps(results[head, 'tree']) / tps(results[head, 'naive']):.2f}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report[6:]))


if __name__ == "__main__":
    main()
