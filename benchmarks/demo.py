"""The CPU demo, measured: `python train.py` (the embedded default) once per seed, then the held-out
Pass@1 of the SFT start and of the policy after RL, from each run's eval summaries.

    python benchmarks/demo.py --seeds 3            # ~10-12 min per seed on 2 CPU cores
    python benchmarks/demo.py --seeds 1 -- --algo grpo    # extra flags after -- go to train.py
    python benchmarks/demo.py --seeds 3 --reuse    # keep the seeds that already finished (after
                                                     a crash)

Prints one row per seed (with the RL steps' mean branches per question, the share of branches made
at a trajectory's second or later tool call, and rollout rounds) and, as the last line,
`pass1_gain=X`: the mean over seeds of the Pass@1 points gained by RL over the SFT start. Also
writes benchmarks/results/demo.md with the machine.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from common import fresh_run, machine, run_minutes  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/demo", help="parent folder of the per-seed runs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep seeds whose run already finished")
    parser.add_argument("rest", nargs="*", help="extra train.py flags (after --)")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        run = ROOT / args.out / f"seed-{seed}"
        done = run / "eval-rl" / "summary.json"
        if not (args.reuse and done.exists()):
            fresh_run(run)
            cmd = [sys.executable, "train.py", "--seed", str(seed), "--output_dir", str(run),
                   *args.rest]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        minutes = run_minutes(run)
        before = json.loads((run / "eval-sft" / "summary.json").read_text())
        after = json.loads(done.read_text())
        steps = [json.loads(line) for line in open(run / "metrics.jsonl")]
        # means over the RL steps
        rollout = {key: sum(r.get(key, 0.0) for r in steps) / len(steps)
                   for key in ("branches_per_q", "branches_after_first_call", "rollout_rounds")}
        rows.append((seed, before["pass1"], after["pass1"], minutes, before, after, rollout))
        print(f"seed {seed}: Pass@1 {before['pass1']:.3f} -> {after['pass1']:.3f} "
              f"({100 * (after['pass1'] - before['pass1']):+.1f} points) in {minutes:.1f} min",
              flush=True)

    gain = sum(100 * (a - b) for _, b, a, *_ in rows) / len(rows)
    lines = [f"# CPU demo: `python train.py {' '.join(args.rest)}` ({args.seeds} seeds)", "",
             f"Machine: {machine()}", "",
             "| seed | Pass@1 SFT start | Pass@1 after RL | gain (points) "
             "| search calls before -> after "
             "| format failures before -> after | branches / question | share after the first call "
             "| rollout rounds | wall time (min) |", "|---" * 10 + "|"]
    for seed, b, a, minutes, sb, sa, r in rows:
        lines.append(f"| {seed} | {b:.3f} | {a:.3f} | {100 * (a - b):+.1f} "
                     f"| {sb['search_calls']:.2f} -> {sa['search_calls']:.2f} "
                     f"| {sb['format_fail']:.3f} -> {sa['format_fail']:.3f} "
                     f"| {r['branches_per_q']:.2f} | {r['branches_after_first_call']:.2f} "
                     f"| {r['rollout_rounds']:.1f} | {minutes:.1f} |")
    lines += ["", f"pass1_gain={gain:.1f}"]
    out = ROOT / "benchmarks" / "results" / "demo.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
