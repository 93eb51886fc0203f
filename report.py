"""What a training run shows: one log line per RL step, curves.png (redrawn during the run from
metrics.jsonl), and report.md, the held-out table of the SFT start against the policy after RL.

    python report.py runs/x          # redraw runs/x/curves.png, e.g. while the run goes on
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
            f"tools {m['search_calls'] + m['python_calls']:.2f} | branches {m['branches_per_q']:.1f} | "
            f"{m['step_s']:.0f}s (generate {m.get('generate_s', 0):.0f}s, tools {m.get('tools_s', 0):.0f}s, "
            f"slowest call {m.get('slowest_tool_s', 0):.1f}s)"
            + (f" | search failed {m['search_errors']:g}" if m.get("search_errors") else ""))


def step_metrics(examples: list, res, rewards: list[float], update_stats: list[dict]) -> dict:
    """One metrics.jsonl row's share from the rollout and the update: `examples[i]` is the question of
    trajectory i of `res` (a rollout.RolloutResult), `rewards[i]` its reward; `update_stats` are the
    loss's stats per micro-batch."""
    import data

    trajs, stats = res.trajectories, res.stats
    n, nq = len(trajs), max(1, len(stats))
    n_search = [sum(c[0] == "search" for c in t.tool_calls) for t in trajs]
    n_python = [sum(c[0] == "python" for c in t.tool_calls) for t in trajs]
    ems = [data.exact_match(data.extract_answer(t.text) or "", e.golds) for t, e in zip(trajs, examples)]
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
        "branches_after_first_call": sum(s.branches_after_first_call for s in stats) / max(1, n_branch),
        "consecutive_branch_share": sum(s.consecutive_branch_steps for s in stats) / max(1, n_branch),
        "response_tokens": sum(len(t.response_ids) for t in trajs) / n,
        "rollout_rounds": res.rounds, "generate_s": res.generate_s, "tools_s": res.tools_s,
        "slowest_tool_s": res.slowest_tool_s,
    }


PANELS = [("reward", "mean reward"), ("acc", "accuracy (EM)"), ("entropy", "policy entropy (sampled)"),
          (("clip_frac_low", "clip_frac_high"), "clip fractions"), (("search_calls", "python_calls"), "tool calls / traj"),
          ("branches_per_q", "branches / question"), ("consecutive_branch_share", "consecutive branching share"),
          ("response_tokens", "response tokens"), ("rollout_rounds", "rollout rounds (latency)")]


def plot_curves(run: Path) -> None:
    """Draw run/metrics.jsonl into run/curves.png (written whole, then renamed: never half a file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, (keys, title) in zip(axes.flat, PANELS):
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if isinstance(keys, tuple):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / ".curves.png")
    plt.close(fig)
    os.replace(run / ".curves.png", run / "curves.png")


REPORT_ROWS = [("pass1", "Pass@1"), ("mean_reward", "mean reward"), ("search_calls", "search calls / answer"),
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


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").exists():
        sys.exit("usage: python report.py RUN_FOLDER   (a folder with a metrics.jsonl, written by train.py)")
    plot_curves(Path(sys.argv[1]))
    print(Path(sys.argv[1]) / "curves.png")
