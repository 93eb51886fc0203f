"""What a training run shows: one log line per RL step, curves.png (redrawn during the run from
metrics.jsonl), optionally live TensorBoard or Weights & Biases curves (--report_to), and report.md,
the held-out table of the SFT start against the policy after RL. Several runs side by side: one
curve per algorithm, the mean over its seeds with a band from the lowest to the highest seed.

    python -m support.report runs/x  # redraw runs/x/curves.png while the run goes on
    python -m support.report runs/reproduce/* --out cmp.png  # overlay runs, grouped by their --algo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from support import data

# matplotlib (a second of start-up), TensorBoard and W&B (optional packages: --report_to) are
# imported where they are used, so `from support import report` stays light and works without them


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


def step_metrics(examples: list, res, rewards: list[float], update_stats: list[dict],
                 w: int = 20) -> dict:
    """One metrics.jsonl row's share from the rollout and the update: `examples[i]` is the question
    of trajectory i of `res` (a rollout.RolloutResult), `rewards[i]` its reward; `update_stats` are
    the loss's stats per micro-batch; w the entropy window. `decisions` lists every branch
    decision as [tool call it follows, Delta H, streak l, children]."""
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
           ("clip_frac_low", "clip_frac_high", "clip_kept_frac", "clip_grad_share", "ratio_mean",
            "approx_kl", "clip_frac_top20", "clip_frac_rest") if all(k in s for s in update_stats)},
        "search_calls": sum(n_search) / n, "python_calls": sum(n_python) / n,
        **{f"search_rate_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "globals_per_q": sum(s.n_global for s in stats) / nq, "branches_per_q": n_branch / nq,
        "branches_after_first_call":
            sum(s.branches_after_first_call for s in stats) / max(1, n_branch),
        "consecutive_branch_share":
            sum(s.consecutive_branch_steps for s in stats) / max(1, n_branch),
        **{f"branch_top{top}_share": branch_concentration(trajs, top) for top in (1, 3)},
        **rule_metrics(trajs, stats, w),
        "response_tokens": sum(len(t.response_ids) for t in trajs) / n,
        "sampled_tokens": res.sampled_tokens,
        "rollout_rounds": res.rounds, "generate_s": res.generate_s, "tools_s": res.tools_s,
        "slowest_tool_s": res.slowest_tool_s,
    }


def entropy_by_call(trajs: list, w: int) -> dict[int, list[float]]:
    """The mean token entropy (nats, exact) of the first w sampled tokens of each segment, keyed by
    the number of tool results before it (0: the root segment, from the question), over the global
    trajectories (each one path sampled from the policy; branches would repeat their parents')."""
    out: dict[int, list[float]] = {}
    for t in trajs:
        if not t.is_global or t.is_duplicate:
            continue
        i, calls, n = 0, 0, len(t.loss_mask)
        while i < n:
            j = i
            while j < n and t.loss_mask[j] == t.loss_mask[i]:
                j += 1
            if t.loss_mask[i]:                                   # a segment the policy sampled
                head = t.entropy[i:min(j, i + w)]
                out.setdefault(calls, []).append(sum(head) / len(head))
            else:                                                # a tool result
                calls += 1
            i = j
    return out


def rule_metrics(trajs: list, stats: list, w: int) -> dict:
    """What AEPO's rollout rules saw and did this step: step entropy by call index (h_call0 the
    root, h_call1 after the first result, ...; h_call3 pools 3 and more), Delta H at the branch
    decisions, the streak l there, the budget m and the entropy gap that set it, and the distinct
    tool-call sequences per question (of its k trajectories)."""
    by_call = entropy_by_call(trajs, w)
    pooled = {c: v for c, v in by_call.items() if c < 3}
    pooled[3] = [h for c, v in by_call.items() if c >= 3 for h in v]
    decisions = [d[1:] for s in stats for d in s.decisions]     # (call, Delta H, l, children)
    nd, nq = max(1, len(decisions)), max(1, len(stats))
    groups: dict[int, set] = {}
    for t in trajs:
        if not t.is_duplicate:
            groups.setdefault(t.question_idx, set()).add(tuple((c[0], c[1]) for c in t.tool_calls))
    return {
        **{f"h_call{c}": sum(v) / len(v) for c, v in sorted(pooled.items()) if v},
        "decisions_per_q": len(decisions) / nq,
        "dh_mean": sum(d[1] for d in decisions) / nd,
        "dh_zero_share": sum(abs(d[1]) < 1e-9 for d in decisions) / nd,
        "l_positive_share": sum(d[2] > 0 for d in decisions) / nd,
        "m": sum(s.m for s in stats) / nq,
        "h_root_minus_h_tool": sum(s.h_root - s.h_tool for s in stats) / nq,
        "distinct_paths": sum(map(len, groups.values())) / max(1, len(groups)),
        "decisions": [[d[0], round(d[1], 5), d[2], d[3]] for d in decisions],
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
          ("response_tokens", "response tokens"), ("rollout_rounds", "rollout rounds (latency)"),
          (("h_call0", "h_call1", "h_call2"), "step entropy by tool call (nats)"),
          (("clip_frac_top20", "clip_frac_rest"), "clip fraction: top-20% entropy vs rest"),
          ("distinct_paths", "distinct tool-call paths / question")]


def read_metrics(run: Path) -> list[dict]:
    """The rows of run/metrics.jsonl ([] when there is none yet)."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def _figure(panels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 3.4 * rows))
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
                  ("consecutive_branch_share", "consecutive branching share"),
                  ("h_call1", "step entropy after the first tool result (nats)"),
                  ("clip_grad_share", "gradient share on clipped tokens"),
                  ("distinct_paths", "distinct tool-call paths / question")]


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
