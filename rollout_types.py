"""What a rollout returns: the trajectories, per-question statistics of the entropy rules, and the
token and time counters; and how the results of consecutive chunks of questions become one.

    from rollout import rollout
    result = rollout(model, tokenizer, questions, tools, cfg, seed=0, system_prompt=prompt)
    result.stats[0].m, result.stats[0].n_branch    # a QuestionStats per question

Only bookkeeping lives here; the sampler that fills these (rollout.py) holds the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aepo import Trajectory


@dataclass
class QuestionStats:
    m: int = 0                    # global budget (AEPO: from pre-monitoring)
    h_root: float = 0.0           # segment entropy of the probe's first segment
    h_tool: float = 0.0           # mean segment entropy of the probe's segments after tool results
    n_global: int = 0             # global trajectories started (restarts included)
    n_branch: int = 0             # branch children created
    n_restart: int = 0
    n_duplicate: int = 0
    branches_after_first_call: int = 0  # branch events at a source's second or later tool call
    consecutive_branch_steps: int = 0   # branches made while the source's streak l > 0
    branches_per_source: dict[int, int] = field(default_factory=dict)
    # every branch decision: (source traj_id, the tool call it follows, Delta H, streak l, children)
    decisions: list[tuple[int, int, float, int, int]] = field(default_factory=list)


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]      # k per question, in question order
    stats: list[QuestionStats]
    generated_tokens: int = 0           # tokens sampled by the policy
    sampled_tokens: int = 0             # of those, the ones kept in trajectories
    prefill_tokens: int = 0             # tokens the model encoded without sampling them
    rounds: int = 0                     # generate rounds (latency)
    generate_s: float = 0.0
    tools_s: float = 0.0
    slowest_tool_s: float = 0.0


def merge_chunks(parts: list[tuple[int, RolloutResult]]) -> RolloutResult:
    """One result from (index of its first question, result) of consecutive chunks of questions:
    question and trajectory ids are offset so that they stay unique; counters add up."""
    out, next_id = RolloutResult([], []), 0
    for first, res in parts:
        for t in res.trajectories:
            t.question_idx += first
            t.traj_id += next_id
            t.parent_id = None if t.parent_id is None else t.parent_id + next_id
        for s in res.stats:
            s.branches_per_source = {i + next_id: n for i, n in s.branches_per_source.items()}
            s.decisions = [(i + next_id, *rest) for i, *rest in s.decisions]
        next_id = 1 + max(t.traj_id for t in res.trajectories)
        out.trajectories += res.trajectories
        out.stats += res.stats
        for key in ("generated_tokens", "sampled_tokens", "prefill_tokens", "rounds", "generate_s", "tools_s"):
            setattr(out, key, getattr(out, key) + getattr(res, key))
        out.slowest_tool_s = max(out.slowest_tool_s, res.slowest_tool_s)
    return out
