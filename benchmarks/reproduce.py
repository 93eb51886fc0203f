"""The paper's comparison in miniature: GRPO, ARPO and AEPO (3 seeds each) and AEPO with one
mechanism removed at a time (2 seeds each: no pre-monitoring, no branch penalty, PPO clipping instead
of stop-gradient clipping, no entropy-aware advantage) on the built-in world, every run
`python train.py --preset class` (RL from the cached SFT start, the same budget of sampled rollout
tokens, off-policy updates where clipping acts, then held-out evaluation).

    python benchmarks/reproduce.py --parallel 2      # 17 runs, two at a time, one torch thread each
    python benchmarks/reproduce.py --seeds 1 --ablation_seeds 0      # a lab-sized version: 3 runs
    python benchmarks/reproduce.py -- --token_budget 30000          # flags after -- go to train.py

A run whose eval-rl/summary.json exists is kept (so a crashed reproduction resumes where it stopped;
--fresh reruns everything); an unfinished run's folder is emptied and the run starts over. The runs of
one seed share the held-out evaluation of their common SFT start (share_sft_eval).
Writes benchmarks/results/reproduce.md (the table, with the machine and the paired differences),
reproduce.png and reproduce-tokens.png (mean and min-max band over seeds per algorithm;
report.plot_compare) and reproduce-rules.png (step entropy by tool call at the SFT start and after
RL, Delta H at the branch decisions, where branches are made), and prints the table, then the key
figures one `name=value` per line.

Columns: held-out Pass@1 and Pass@4 (150 questions x 4 runs, T = 1) of the SFT start and after RL;
tool calls per answer; RL steps the token budget allowed; policy entropy of sampled tokens (first
and last 5 steps); clip fractions (all tokens, the step's 20% highest-entropy tokens, the rest) and
the share of the gradient on clipped tokens; the step entropy of the first w tokens of the root
segment and after results 1 and 2; the share of branch decisions with Delta H = 0 and with a streak
l >= 1; the budget m; distinct tool-call paths per question; branches per question, branch
concentration (top-1 and top-3 global chains) and consecutive branching.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import fresh_run, machine, run_minutes  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import report  # noqa: E402

ALGOS = ("grpo", "arpo", "aepo")
ABLATIONS = ("aepo_no_pre_monitor", "aepo_no_penalty", "aepo_ppo_clip", "aepo_no_entropy_adv")


def plan(args) -> list[tuple[str, int]]:
    return ([(a, s) for a in args.algos for s in range(args.seeds)]
            + [(a, s) for a in args.ablations for s in range(args.ablation_seeds)])


def run_all(runs: list[tuple[str, int, Path]], args) -> None:
    """train.py for every run not yet finished, `args.parallel` at a time."""
    todo = [(a, s, r) for a, s, r in runs
            if args.fresh or not (r / "eval-rl" / "summary.json").exists()]
    threads = max(1, (os.cpu_count() or 2) // args.parallel) if args.parallel > 1 else 0
    active: list[tuple[subprocess.Popen, str]] = []
    for i, (algo, seed, run) in enumerate(todo):
        while len(active) >= args.parallel:
            active = _reap(active)
        cmd = [sys.executable, "train.py", "--preset", "class", "--algo", algo, "--seed", str(seed),
               "--output_dir", str(run), "--threads", str(threads), *args.rest]
        fresh_run(run)                             # an unfinished or --fresh run starts over
        share_sft_eval(run, seed, [r for _, s, r in runs if s == seed and r != run])
        log = open(run / "train.log", "w")
        print(f"[{i + 1}/{len(todo)}] {' '.join(cmd[1:])}  (log: {run / 'train.log'})", flush=True)
        active.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                       str(run)))
    while active:
        active = _reap(active)


def share_sft_eval(run: Path, seed: int, siblings: list[Path]) -> None:
    """Every run of one seed starts from the same cached SFT policy and evaluates it with the same
    seed, so their eval-sft records are identical (byte for byte); a run takes a finished sibling's,
    and train.py's evaluation, which resumes from examples.jsonl, only re-reads them."""
    donor = next((r for r in siblings if (r / "eval-sft" / "summary.json").exists()), None)
    if donor:
        (run / "eval-sft").mkdir()
        shutil.copy(donor / "eval-sft" / "examples.jsonl", run / "eval-sft" / "examples.jsonl")


def _reap(active):
    time.sleep(2)
    still = []
    for proc, run in active:
        if proc.poll() is None:
            still.append((proc, run))
        elif proc.returncode:
            sys.exit(f"error: {run} failed (exit {proc.returncode}); its log: {run}/train.log")
    return still


def summarize(algo: str, folders: list[Path]) -> dict:
    """The table row of one algorithm: each figure as (mean, std over seeds)."""
    per_run = []
    for run in folders:
        before = json.loads((run / "eval-sft" / "summary.json").read_text())
        after = json.loads((run / "eval-rl" / "summary.json").read_text())
        steps = report.read_metrics(run)
        mean = lambda key, rows=steps: sum(r.get(key, 0.0) for r in rows) / len(rows)
        per_run.append({
            "pass1_sft": before["pass1"], "pass1": after["pass1"],
            "passk": after["pass_at_k"][str(after["runs"])],
            "tools_sft": before["search_calls"] + before["python_calls"],
            "tools": after["search_calls"] + after["python_calls"], "steps": len(steps),
            "globals": mean("globals_per_q"),
            "tokens": steps[-1]["sampled_tokens_total"],
            "entropy_first": mean("entropy", steps[:5]),
            "entropy_last": mean("entropy", steps[-5:]),
            "clip": mean("clip_frac_low") + mean("clip_frac_high"),
            "clip_top20": mean("clip_frac_top20"), "clip_rest": mean("clip_frac_rest"),
            "clip_grad": mean("clip_grad_share"),
            "h0": mean("h_call0"), "h1": mean("h_call1"), "h2": mean("h_call2"),
            "dh_zero": mean("dh_zero_share"), "l_pos": mean("l_positive_share"),
            "m": mean("m"), "paths": mean("distinct_paths"),
            "branches": mean("branches_per_q"),
            "top1": mean("branch_top1_share"), "top3": mean("branch_top3_share"),
            "consecutive": mean("consecutive_branch_share"),
            "minutes": run_minutes(run)})
    out = {"algo": algo, "n": len(per_run)}
    for key in per_run[0]:
        values = [r[key] for r in per_run]
        out[key] = (statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    return out


COLUMNS = [("pass1_sft", "Pass@1 SFT start", 100, ".1f"), ("pass1", "Pass@1 after RL", 100, ".1f"),
           ("passk", "Pass@4 after RL", 100, ".1f"),
           ("tools_sft", "tool calls / answer, SFT start", 1, ".2f"),
           ("tools", "after RL", 1, ".2f"),
           ("steps", "RL steps", 1, ".1f"), ("tokens", "sampled tokens", 1e-3, ".1f"),
           ("entropy_first", "entropy, first 5 steps", 1, ".3f"),
           ("entropy_last", "entropy, last 5 steps", 1, ".3f"),
           ("clip", "clip fraction", 1, ".4f"),
           ("clip_top20", "clip, top-20% entropy tokens", 1, ".4f"),
           ("clip_rest", "clip, other tokens", 1, ".4f"),
           ("clip_grad", "gradient share on clipped tokens", 1, ".4f"),
           ("h0", "step entropy: root", 1, ".3f"), ("h1", "after result 1", 1, ".3f"),
           ("h2", "after result 2", 1, ".3f"),
           ("dh_zero", "Delta H = 0 at decisions", 1, ".2f"),
           ("l_pos", "decisions with l >= 1", 1, ".2f"), ("m", "m", 1, ".2f"),
           ("paths", "distinct tool paths / question", 1, ".2f"),
           ("globals", "global chains / question", 1, ".2f"),
           ("branches", "branches / question", 1, ".2f"),
           ("top1", "branches on top-1 chain", 1, ".2f"), ("top3", "on top-3 chains", 1, ".2f"),
           ("consecutive", "consecutive branching", 1, ".2f"),
           ("minutes", "wall time (min)", 1, ".1f")]


BRANCH_COLUMNS = ("top1", "top3", "consecutive", "dh_zero", "l_pos")


def table(rows: list[dict]) -> list[str]:
    head = "| algorithm (seeds) | " + " | ".join(label + (" (k)" if key == "tokens" else "")
                                             for key, label, _, _ in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = []
        for key, _, scale, fmt in COLUMNS:
            mean, std = r[key]
            if key in BRANCH_COLUMNS and r["branches"][0] == 0:       # nothing branched: no share
                cells.append("-")
                continue
            cells.append(f"{scale * mean:{fmt}}"
                         + (f" ± {scale * std:{fmt}}" if r["n"] > 1 else ""))
        lines.append(f"| {r['algo']} ({r['n']}) | " + " | ".join(cells) + " |")
    return lines


def plot_rules(groups: dict[str, list[Path]], path: Path) -> None:
    """Three panels of what the rollout rules saw: step entropy by tool call (the first 5 RL steps,
    i.e. the SFT start, against the last 5), Delta H at the branch decisions, and the tool call
    that the branches follow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, (algo, runs) in enumerate(groups.items()):
        rows = [report.read_metrics(r) for r in runs]
        for part, style in (("first", "--"), ("last", "-")):
            pick = [(rs[:5] if part == "first" else rs[-5:]) for rs in rows]
            ys = [statistics.mean(r.get(f"h_call{c}", float("nan")) for rs in pick for r in rs)
                  for c in range(4)]
            axes[0].plot(range(4), ys, style, color=f"C{i}", marker="o",
                         label=f"{algo}, {part} 5 steps")
        decisions = [d for rs in rows for r in rs for d in r.get("decisions", [])]
        if decisions:
            axes[1].hist([d[1] for d in decisions], bins=40, histtype="step", color=f"C{i}",
                         label=algo, density=True)
            made = [d for d in decisions if d[3]]
            calls = [sum(d[3] for d in made if min(d[0], 3) == c) / max(1, sum(d[3] for d in made))
                     for c in (1, 2, 3)]
            axes[2].bar([c + 0.12 * i for c in (1, 2, 3)], calls, width=0.12, color=f"C{i}",
                        label=algo)
    axes[0].set(title="step entropy (first w tokens) by tool results before it",
                xlabel="tool results before the segment (3: 3 or more)", ylabel="nats / token")
    axes[1].set(title="Delta H at branch decisions", xlabel="Delta H (normalised by log |V|)")
    axes[2].set(title="where branches are made", xlabel="after tool call (3: 3 or more)",
                ylabel="share of branches")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def paired(groups: dict[str, list[Path]], base: str = "aepo") -> list[str]:
    """Pass@1 after RL of each algorithm minus AEPO's, seed by seed (runs of one seed share the
    SFT start and the evaluation's seed), as mean and the per-seed differences."""
    def by_seed(runs):                              # run folders are named <algo>-seed<seed>
        return {r.name.rsplit("-seed", 1)[-1]:
                json.loads((r / "eval-rl" / "summary.json").read_text())["pass1"] for r in runs}
    ref = by_seed(groups.get(base, []))
    lines = []
    for algo, runs in groups.items():
        if algo == base:
            continue
        diffs = [100 * (v - ref[seed]) for seed, v in sorted(by_seed(runs).items()) if seed in ref]
        if diffs:
            lines.append(f"- {algo} - {base}: {statistics.mean(diffs):+.1f} points "
                         f"(per seed: {', '.join(f'{d:+.1f}' for d in diffs)})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of grpo, arpo and aepo")
    parser.add_argument("--ablation_seeds", type=int, default=2, help="seeds of each AEPO ablation")
    parser.add_argument("--algos", nargs="*", default=list(ALGOS), help="the algorithms compared")
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), help="AEPO's ablations")
    parser.add_argument("--out", default="runs/reproduce", help="parent folder of the runs")
    parser.add_argument("--results", default="benchmarks/results",
                        help="folder of reproduce.md/.png")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time (each gets cores // N threads)")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs too")
    parser.add_argument("rest", nargs="*", help="extra train.py flags (after --)")
    args = parser.parse_args()
    runs = [(a, s, ROOT / args.out / f"{a}-seed{s}") for a, s in plan(args)]
    run_all(runs, args)

    folders = [r for _, _, r in runs]
    groups = report.group_runs(folders)
    rows = [summarize(algo, fs) for algo, fs in groups.items()]
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    report.plot_compare(folders, results / "reproduce.png")
    report.plot_compare(folders, results / "reproduce-tokens.png", x="sampled_tokens_total")
    plot_rules(groups, results / "reproduce-rules.png")
    flags = " ".join(["--preset class", *args.rest])
    lines = [f"# GRPO vs ARPO vs AEPO on the built-in world (`train.py {flags}`)", "",
             f"Machine: {machine()}; {args.parallel} run(s) at a time.", "",
             "Mean ± standard deviation over seeds (population); held-out: 150 questions x 4 runs "
             "at T = 1.",
             "", *table(rows), "",
             "Paired Pass@1 differences (the runs of one seed share the SFT start):",
             *paired(groups), "",
             "Curves: reproduce.png (per RL step), reproduce-tokens.png (per sampled rollout "
             "token), reproduce-rules.png (step entropy by tool call, Delta H at decisions, where "
             "branches are made)."]
    (results / "reproduce.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for r in rows:                                          # the key figures, last
        for key in ("pass1", "clip", "clip_top20", "dh_zero", "l_pos", "h0", "h1"):
            print(f"{r['algo']}_{key}={r[key][0]:.4f}")


if __name__ == "__main__":
    main()
