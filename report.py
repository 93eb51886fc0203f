"""What a training run shows: one log line per RL step, curves.png (redrawn during the run from
metrics.jsonl), optionally live TensorBoard or Weights & Biases curves (--report_to), and report.md,
the held-out table of the SFT start against the policy after RL. Several runs side by side: one
curve per algorithm, the mean over its seeds with a band from the lowest to the highest seed.

    python report.py runs/x  # redraw runs/x/curves.png while the run goes on
    python report.py runs/reproduce/* --out cmp.png  # overlay runs, grouped by their --algo
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def log_line(m: dict, steps: int) -> str:
    """The fixed-order line printed after each RL step (m: one metrics.jsonl row)."""
    return (f"step {m['step'] + 1}/{steps} | reward {m['reward']:.2f} | acc {m['acc']:.2f} | "
            f"ent {m['entropy']:.2f} | clip {m['clip_frac_low'] + m['clip_frac_high']:.3f} | "
            f"tools {m['search_calls'] + m['python_calls']:.2f} | "
            f"branches {m['branches_per_q']:.1f} | "
            f"{m['step_s']:.0f}s (generate {m.get('generate_s', 0):.0f}s, "
            f"tools {m.get('tools_s', 0):.0f}s, "
            f"slowest call {m.get('slowest_tool_s', 0):.1f}s)"
            + (f" | search failed {m['search_errors']:g}" if m.get("search_errors") else ""))


def step_metrics(examples: list, res, rewards: list[float], update_stats: list[dict]) -> dict:
    """One metrics.jsonl row's share from the rollout and the update: `examples[i]` is the question
    of trajectory i of `res` (a rollout.RolloutResult), `rewards[i]` its reward; `update_stats` are
    the loss's stats per micro-batch."""
    import data

    trajs, stats = res.trajectories, res.stats
    n, nq = len(trajs), max(1, len(stats))
    n_search = [sum(c[0] == "search" for c in t.tool_calls) for t in trajs]
    n_python = [sum(c[0] == "python" for c in t.tool_calls) for t in trajs]
    ems = [data.exact_match(data.extract_answer(t.text) or "", e.golds)
           for t, e in zip(trajs, examples)]
    sampled = [h for t in trajs for h, m in zip(t.entropy, t.loss_mask) if m]
    n_branch = sum(s.n_branch for s in stats)
    by_kind: dict[str, list[bool]] = {}
    for e, ns in zip(examples, n_search):
        by_kind.setdefault(e.kind or "other", []).append(ns > 0)
    return {
        "reward": sum(rewards) / n, "acc": sum(ems) / n,
        "format_fail": sum(data.format_error(t.text) is not None for t in trajs) / n,
        "entropy": sum(sampled) / max(1, len(sampled)),
        **{k: sum(s[k] for s in update_stats) / max(1, len(update_stats)) for k in
           ("clip_frac_low", "clip_frac_high", "clip_kept_frac", "ratio_mean", "approx_kl")},
        "search_calls": sum(n_search) / n, "python_calls": sum(n_python) / n,
        **{f"search_rate_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "globals_per_q": sum(s.n_global for s in stats) / nq, "branches_per_q": n_branch / nq,
        "branches_after_first_call":
            sum(s.branches_after_first_call for s in stats) / max(1, n_branch),
        "consecutive_branch_share":
            sum(s.consecutive_branch_steps for s in stats) / max(1, n_branch),
        **{f"branch_top{top}_share": branch_concentration(trajs, top) for top in (1, 3)},
        "response_tokens": sum(len(t.response_ids) for t in trajs) / n,
        "sampled_tokens": res.generated_tokens,
        "rollout_rounds": res.rounds, "generate_s": res.generate_s, "tools_s": res.tools_s,
        "slowest_tool_s": res.slowest_tool_s,
    }


def branch_concentration(trajs: list, top: int) -> float:
    """Share of the branches of a rollout that grow from the `top` most-branched global chains of
    their group (arXiv 2510.14545, the analysis of entropy collapse in rollout: ARPO's branches
    crowd onto a few trajectories). A branch counts for the global chain it descends from; 0 when
    nothing branched."""
    by_id = {t.traj_id: t for t in trajs}
    per_root: dict[tuple[int, int], int] = {}
    for t in trajs:
        if t.is_global or t.is_duplicate:
            continue
        root = t
        while not root.is_global:
            root = by_id[root.parent_id]
        per_root[t.question_idx, root.traj_id] = per_root.get((t.question_idx, root.traj_id), 0) + 1
    groups: dict[int, list[int]] = {}
    for (q, _), count in per_root.items():
        groups.setdefault(q, []).append(count)
    on_top = sum(sum(sorted(counts, reverse=True)[:top]) for counts in groups.values())
    return on_top / max(1, sum(per_root.values()))


PANELS = [("reward", "mean reward"), ("acc", "accuracy (EM)"),
          ("entropy", "policy entropy (sampled)"),
          (("clip_frac_low", "clip_frac_high"), "clip fractions"),
          (("search_calls", "python_calls"), "tool calls / traj"),
          ("branches_per_q", "branches / question"),
          ("consecutive_branch_share", "consecutive branching share"),
          ("response_tokens", "response tokens"), ("rollout_rounds", "rollout rounds (latency)")]


def read_metrics(run: Path) -> list[dict]:
    """The rows of run/metrics.jsonl ([] when there is none yet)."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def _figure(panels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, (keys, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
    return plt, fig, list(axes.flat)     # a list: every algorithm draws on the same panels


def _save(plt, fig, path: Path) -> None:
    """Written whole, then renamed: a reader never sees half a file."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(run: Path) -> None:
    """Draw run/metrics.jsonl into run/curves.png."""
    rows = read_metrics(run)
    plt, fig, axes = _figure(PANELS)
    for ax, (keys, title) in zip(axes, PANELS):
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
        if isinstance(keys, tuple):
            ax.legend(fontsize=7)
    _save(plt, fig, Path(run) / "curves.png")


COMPARE_PANELS = [("reward", "mean reward"), ("acc", "accuracy (EM, sampled)"),
                  ("entropy", "policy entropy (sampled tokens)"),
                  ("clip_frac_high", "clip fraction (ratio > 1 + eps)"),
                  ("clip_frac_low", "clip fraction (ratio < 1 - eps)"),
                  ("search_calls", "search calls / trajectory"),
                  ("branches_per_q", "branches / question"),
                  ("branch_top1_share", "branch concentration (top-1 chain)"),
                  ("consecutive_branch_share", "consecutive branching share")]


def group_runs(runs: list[Path]) -> dict[str, list[Path]]:
    """Run folders by their algorithm (config.json's algo), in the order first seen."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        algo = json.loads((Path(run) / "config.json").read_text())["algo"]
        groups.setdefault(algo, []).append(Path(run))
    return groups


def mean_band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per step: mean, lowest and highest over the runs that reached the step (runs may stop at
    different steps under --token_budget)."""
    n = max(map(len, curves))
    at = [[c[i] for c in curves if i < len(c)] for i in range(n)]
    return [sum(v) / len(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def plot_compare(runs: list[Path], out: Path, x: str = "step") -> None:
    """One panel per metric, one line per algorithm: the mean over its runs, with a min-max band.
    x: "step", or "sampled_tokens_total" (the rollout's cost so far)."""
    plt, fig, axes = _figure(COMPARE_PANELS)
    for algo, folders in group_runs(runs).items():
        rows = [read_metrics(r) for r in folders]
        xs = mean_band([[r.get(x, r["step"]) for r in rs] for rs in rows])[0]
        for ax, (key, _) in zip(axes, COMPARE_PANELS):
            mean, low, high = mean_band([[r.get(key, float("nan")) for r in rs] for rs in rows])
            line, = ax.plot(xs, mean, label=f"{algo} ({len(folders)})")
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    for ax in axes:
        ax.set_xlabel(x.replace("_", " "))
    axes[0].legend(fontsize=8)
    _save(plt, fig, Path(out))


class Tracker:
    """--report_to: every metrics row also goes, live, to TensorBoard (run/tensorboard; `tensorboard
    --logdir runs`) or Weights & Biases (project aepo; WANDB_MODE=offline works without a
    network). `start`: the first step this process logs; on a resume TensorBoard drops what it holds
    from that step on (those steps are redone), and W&B starts a new run."""

    def __init__(self, cfg, run: Path, start: int = 0):
        self.kind, self.sink = cfg.report_to, None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.sink = SummaryWriter(str(Path(run) / "tensorboard"), purge_step=start or None)
        elif self.kind == "wandb":
            import dataclasses

            import wandb
            self.sink = wandb.init(project="aepo", name=Path(run).name, dir=str(run),
                                   config=dataclasses.asdict(cfg))

    def log(self, metrics: dict) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.sink.add_scalar(key, value, metrics["step"])
            self.sink.flush()
        elif self.kind == "wandb":
            self.sink.log(numbers, step=metrics["step"])

    def close(self) -> None:
        if self.sink is not None:
            (self.sink.close if self.kind == "tensorboard" else self.sink.finish)()


REPORT_ROWS = [("pass1", "Pass@1"), ("mean_reward", "mean reward"),
               ("search_calls", "search calls / answer"),
               ("python_calls", "python calls / answer"), ("format_fail", "format failures")]


def before_after(before: dict, after: dict, cfg, run: Path) -> str:
    """report.md: eval summaries (eval.evaluate) of the SFT start and of the policy after RL;
    cfg is the run's aepo.Config."""
    lines = [f"# {cfg.algo} on {cfg.eval_dataset} ({after['n']} questions x {cfg.eval_runs} runs, "
             f"T={cfg.eval_temperature})", "", "| metric | SFT start | after RL |", "|---|---|---|"]
    lines += [f"| {label} | {before[k]:.3f} | {after[k]:.3f} |" for k, label in REPORT_ROWS]
    text = "\n".join(lines) + "\n"
    (run / "report.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Redraw a run's curves, or overlay several runs.")
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("compare.png"),
                        help="the overlay's file (several runs)")
    parser.add_argument("--x", choices=("step", "sampled_tokens_total"), default="step")
    args = parser.parse_args(argv)
    needed = ("metrics.jsonl",) if len(args.runs) == 1 else ("metrics.jsonl", "config.json")
    missing = [str(r) for r in args.runs if not all((r / name).exists() for name in needed)]
    if missing:
        sys.exit(f"error: no {' and '.join(needed)} (written by train.py) in {', '.join(missing)}")
    if len(args.runs) == 1:
        plot_curves(args.runs[0])
        print(args.runs[0] / "curves.png")
    else:
        plot_compare(args.runs, args.out, args.x)
        print(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
