"""report.py: the branch-concentration statistic by hand, the seed band, and the overlay of runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aepo import Trajectory
from support import report

ROOT = Path(__file__).resolve().parents[1]


def _tree(question: int, edges: dict[int, int | None], duplicates=()) -> list[Trajectory]:
    """Trajectories of one group: traj_id -> parent_id (None: a global chain)."""
    return [Trajectory(question_idx=question, prompt_ids=[], traj_id=i, parent_id=p,
                       is_global=p is None, is_duplicate=i in duplicates)
            for i, p in edges.items()]


def test_branch_concentration_counts_branches_by_their_global_chain():
    # Group 0: chains 0 and 1. Chain 0 gets branches 2, 3 and 4 (4 branched from branch 3), chain 1
    # gets branch 5; 6, a copy of branch 5 that pads the group, is not a branch.
    group0 = _tree(0, {0: None, 1: None, 2: 0, 3: 0, 4: 3, 5: 1, 6: 1}, duplicates={6})
    # Group 1 (ids go on across the call): chains 10, 11, 12 with 1, 2 and 0 branches.
    group1 = _tree(1, {10: None, 11: None, 12: None, 13: 10, 14: 11, 15: 11})
    trajs = group0 + group1
    # top-1: group 0's chain 0 (3 of 4) + group 1's chain 11 (2 of 3) = 5 of 7 branches
    assert report.branch_concentration(trajs, 1) == pytest.approx(5 / 7)
    # top-3 takes every chain here
    assert report.branch_concentration(trajs, 3) == pytest.approx(7 / 7)
    assert report.branch_concentration(group1, 1) == pytest.approx(2 / 3)
    # nothing branched
    assert report.branch_concentration(_tree(0, {0: None, 1: None}), 1) == 0.0


def test_mean_band_over_runs_of_different_lengths():
    mean, low, high = report.mean_band([[1.0, 2.0, 3.0], [3.0, 4.0]])
    assert mean == [2.0, 3.0, 3.0] and low == [1.0, 2.0, 3.0] and high == [3.0, 4.0, 3.0]


def _fake_run(folder: Path, algo: str, rewards: list[float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"algo": algo}))
    rows = [{"step": i, "reward": r, "acc": r, "entropy": 0.5, "clip_frac_low": 0.0,
             "clip_frac_high": 0.01, "search_calls": 1.0, "branches_per_q": 2.0,
             "branch_top1_share": 0.5, "consecutive_branch_share": 0.1,
             "sampled_tokens_total": 100 * (i + 1)} for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_runs_are_grouped_by_algorithm_and_overlaid(tmp_path, monkeypatch):
    runs = [_fake_run(tmp_path / "g0", "grpo", [0.1, 0.2]),
            _fake_run(tmp_path / "a0", "aepo", [0.2, 0.4]),
            _fake_run(tmp_path / "g1", "grpo", [0.3, 0.2, 0.5])]
    assert report.group_runs(runs) == {"grpo": [runs[0], runs[2]], "aepo": [runs[1]]}
    out = tmp_path / "cmp.png"
    cli = subprocess.run([sys.executable, "-m", "support.report", *map(str, runs), "--out",
                          str(out), "--x", "sampled_tokens_total"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: drawn.append(fig))
    report.plot_compare(runs, out)
    panels = drawn[0].axes[:len(report.COMPARE_PANELS)]
    assert all([line.get_label() for line in ax.lines] == ["grpo (2)", "aepo (1)"] for ax in panels)
    # grpo's reward: the means of 0.1|0.3, 0.2|0.2 and 0.5
    reward = panels[0].lines[0].get_ydata().tolist()
    assert reward == pytest.approx([0.2, 0.2, 0.5])
    bad = subprocess.run([sys.executable, "-m", "support.report", str(runs[0]),
                          str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "nothing" in bad.stderr and "metrics.jsonl" in bad.stderr


def test_rule_metrics_by_hand():
    """Step entropy by tool call over the global trajectories (first w sampled tokens after each
    result), Delta H at decisions, the streak, m and distinct tool paths, computed by hand."""
    from aepo import Trajectory
    from rollout import QuestionStats

    g = Trajectory(question_idx=0, prompt_ids=[1], loss_mask=[1, 1, 1, 0, 0, 1, 1, 0, 1],
                   entropy=[1.0, 2.0, 9.0, 0, 0, 4.0, 6.0, 0, 3.0],
                   tool_calls=[("search", "a", "r"), ("python", "1", "2")])
    child = Trajectory(question_idx=0, prompt_ids=[1], loss_mask=[1, 0, 1], entropy=[5.0, 0, 7.0],
                       tool_calls=[("search", "a", "r")], is_global=False, parent_id=0, traj_id=1)
    dup = Trajectory(question_idx=0, prompt_ids=[1], loss_mask=[1], entropy=[8.0],
                     is_duplicate=True, traj_id=2)
    stats = [QuestionStats(m=5, h_root=0.5, h_tool=0.2,
                           decisions=[(0, 1, 0.0, 0, 1), (0, 2, -0.25, 1, 0), (1, 2, 0.5, 1, 0)])]
    m = report.rule_metrics([g, child, dup], stats, w=2)
    # the global only: root (1 + 2) / 2, after result 1 (4 + 6) / 2, after result 2: 3
    assert (m["h_call0"], m["h_call1"], m["h_call2"]) == (1.5, 5.0, 3.0) and "h_call3" not in m
    assert m["decisions_per_q"] == 3 and m["dh_mean"] == pytest.approx(0.25 / 3)
    assert m["dh_zero_share"] == pytest.approx(1 / 3)
    assert m["l_positive_share"] == pytest.approx(2 / 3)
    assert (m["m"], m["h_root_minus_h_tool"]) == (5, pytest.approx(0.3))
    assert m["distinct_paths"] == 2                       # (search a, python 1) and (search a)
    assert m["decisions"] == [[1, 0.0, 0, 1], [2, -0.25, 1, 0], [2, 0.5, 1, 0]]
