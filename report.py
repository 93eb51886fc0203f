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
            f"{m['step_s']:.0f}s" + (f" | search failed {m['search_errors']:g}" if m.get("search_errors") else ""))


PANELS = [("reward", "mean reward"), ("acc", "accuracy (EM)"), ("entropy", "policy entropy (sampled)"),
          (("clip_frac_low", "clip_frac_high"), "clip fractions"), (("search_calls", "python_calls"), "tool calls / traj"),
          ("branches_per_q", "branches / question"), ("consecutive_branch_share", "consecutive branching share"),
          ("response_tokens", "response tokens")]


def plot_curves(run: Path) -> None:
    """Draw run/metrics.jsonl into run/curves.png (written whole, then renamed: never half a file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
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
