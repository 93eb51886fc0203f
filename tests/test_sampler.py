"""The sampler under real tokenizers and real entropies: tags of several tokens, rows of one batch
that stop at different steps, segment entropies checked against hand-computed values, Delta H, the
budget m, the streak l, and equal round budgets for every algorithm. Each test runs under three
tokenizers: the toy one (every agent tag one token), a BPE where every tag is several tokens, and
the real Qwen3 vocabulary. Under the first two, every scripted scenario also runs under both
engines, the cached one and the reference that re-encodes every round: they must agree."""
import dataclasses
import math
import random

import pytest

import fakes
import rollout as rollout_module
from aepo import Config, global_budget
from fakes import ScriptedPolicy, ids, qwen3_tokenizer, toy_tokenizer
from kvcache import CachedEngine
from rollout import (Question, QuestionStats, _Sampler, budget_from_probe, n_children, next_streak,
                     rollout, wants_restart)
from tools import result_block

TOOLS = {"search": lambda q: f"Page 1: {q} was born in Vantor.", "python": lambda c: "25"}
CHAIN = dict(branching=False, pre_monitor=False, branch_penalty=False)


@pytest.fixture(scope="module", params=["toy", "bpe", "qwen3"])
def tok(request):
    tokenizer = {"toy": toy_tokenizer, "bpe": lambda: toy_tokenizer(tags_are_tokens=False),
                 "qwen3": qwen3_tokenizer}[request.param]()
    single = len(ids(tokenizer, "</search>")) == 1
    assert single == (request.param == "toy"), "the bpe and qwen3 tokenizers must split the tags"
    return tokenizer


def cfg_with(**kw):
    return dataclasses.replace(Config(), **kw)


def coin(tok, p):
    """A step that samples one word with probability p, else another: entropy H(p) either way."""
    a, b = [w[0] for w in (ids(tok, " " + x) for x in "a x b y was".split()) if len(w) == 1][:2]
    return {a: p, b: 1 - p}


def H(*ps):
    return sum(-p * math.log(p) - (1 - p) * math.log(1 - p) for p in ps)


@pytest.fixture
def checked_rollout(tok, request):
    """rollout() of a scripted scenario under the cached engine. Under the toy and BPE tokenizers
    (single-token and multi-token tags) the reference engine, which re-encodes every row every
    round, must give the same result first. Not under Qwen3's: the engines see only token ids, and
    the scripted policy, which decodes every history, is slow with that vocabulary."""
    compare = request.node.callspec.params["tok"] != "qwen3"
    return lambda model, questions, cfg: fakes.checked_rollout(
        model, tok, questions, TOOLS, cfg, seed=0, system_prompt="sys", compare=compare)



# --------------------------------------------------------------------------------------------------
# 1. Multi-token tags: rows of one batch that stop at different steps


@pytest.mark.parametrize("engine", ["cached", "reencode"])
def test_rows_that_stop_at_different_steps_equal_rows_sampled_alone(tok, engine):
    short = ids(tok, "<think> a </think> <search> x </search>")
    long = ids(tok, "<think> a b a b a b a b </think> <search> Mira Quell </search>")
    answer = ids(tok, " <answer> \\boxed{ y } </answer>")
    scripts = {"Q1": [short, answer], "Q2": [long, answer]}
    cfg = cfg_with(k=2, segment_tokens=64, **CHAIN)
    run = lambda qs: rollout(ScriptedPolicy(tok, scripts), tok, qs, TOOLS, cfg, seed=0,
                             system_prompt="sys", engine=engine).trajectories
    together = run(["Q1?", "Q2?"])
    alone = run(["Q1?"]) + run(["Q2?"])
    for t, ref, seg in zip(together, alone, [short] * 2 + [long] * 2):
        assert t.finish == "eos" and len(t.tool_calls) == 1, t.text
        assert ((t.response_ids, t.loss_mask, t.tool_calls)
                == (ref.response_ids, ref.loss_mask, ref.tool_calls))
        assert t.response_ids[:len(seg)] == seg                 # no filler pad taken as sampled
        assert t.tool_calls[0][1] in ("x", "Mira Quell")


# --------------------------------------------------------------------------------------------------
# 2. Segment entropies: the window starts at the first token sampled after a tool result


def entropy_script(tok, ps: list[list[float]]):
    """One segment per list of coin probabilities, each ending in a tool call; the last answers."""
    tails = ["<search> x </search>", " <search> y </search>", " <python> 1 </python>"]
    segs = [[coin(tok, p) for p in seg] + ids(tok, tails[i % 3]) for i, seg in enumerate(ps[:-1])]
    return segs + [[coin(tok, p) for p in ps[-1]] + ids(tok, " <answer> \\boxed{ z } </answer>")]


def test_segment_entropies_and_the_budget_m_are_hand_computed(tok, checked_rollout):
    ps = [[0.5, 0.9, 0.7, 0.6], [0.8, 0.55, 0.95, 0.5], [0.65, 0.75, 0.85, 0.99]]
    model = ScriptedPolicy(tok, entropy_script(tok, ps))
    cfg = cfg_with(k=4, entropy_window=3, branching=True, pre_monitor=True, branch_penalty=True,
                   beta=0.5)
    res = checked_rollout(model, ["Q1?", "Q2?"], cfg)
    want = [H(*seg[:3]) / math.log(len(tok)) for seg in ps]           # first w = 3 sampled tokens
    for t in res.trajectories:
        assert t.seg_entropy == pytest.approx(want, abs=1e-6)
    m = global_budget(4, want[0], (want[1] + want[2]) / 2, 0.5)
    for s in res.stats:
        assert (s.h_root, s.h_tool) == pytest.approx((want[0], (want[1] + want[2]) / 2), abs=1e-6)
        assert s.m == m


@pytest.mark.parametrize("where", ["after_result", "before_result"])
def test_branching_follows_the_entropy_after_the_tool_result(tok, where, checked_rollout):
    """ARPO with tau = 0 and a steep gamma: a decision branches iff Delta H > 0. The root is
    confident (E0), the segment after result 1 uncertain (E1 > E0), the rest confident again.
    The paper's rule measures H_t after result t: it branches at call 1 (Delta H = E1 - E0), the
    child restarts right after result 1, in the same round, and shares the root's H_init; it then
    keeps step with the root (their decisions at calls 2 and 3 come in pairs). The released order
    measures the segment that made the call: Delta H = 0 at call 1 and E1 - E0 at call 2."""
    ps = [[0.97] * 4, [0.5] * 4, [0.97] * 4, [0.97] * 4]
    model = ScriptedPolicy(tok, entropy_script(tok, ps))
    cfg = cfg_with(k=8, global_rollouts=1, branching=True, pre_monitor=False, branch_penalty=False,
                   tau=0.0, gamma=1000.0, entropy_window=4, max_rounds=4, step_entropy=where)
    res = checked_rollout(model, ["Q1?"], cfg)
    e = [H(*seg) / math.log(len(tok)) for seg in ps]
    (s,) = res.stats
    real = [t for t in res.trajectories if not t.is_duplicate]
    (root,) = [t for t in real if t.is_global]
    (child,) = [t for t in real if not t.is_global]
    # (source, call, Delta H, l, children) in the order made; l is the source path's streak
    if where == "after_result":
        want = [(root.traj_id, 1, e[1] - e[0], 0, 1), (root.traj_id, 2, 0.0, 1, 0),
                (child.traj_id, 2, 0.0, 1, 0), (root.traj_id, 3, 0.0, 0, 0),
                (child.traj_id, 3, 0.0, 0, 0)]
        node = 1
    else:
        want = [(root.traj_id, 1, 0.0, 0, 0), (root.traj_id, 2, e[1] - e[0], 0, 1),
                (root.traj_id, 3, 0.0, 1, 0), (child.traj_id, 3, 0.0, 1, 0)]
        node = 2
    assert [d[:2] + d[3:] for d in s.decisions] == [d[:2] + d[3:] for d in want]
    assert [d[2] for d in s.decisions] == pytest.approx([d[2] for d in want], abs=1e-6)
    assert (s.n_branch, s.branches_after_first_call) == (1, int(node > 1))
    # the child is its parent up to the end of result `node`, then samples on its own
    end = 0
    for _, _, output in root.tool_calls[:node]:     # the result blocks, found by their tokens
        block = ids(tok, result_block(output))
        end = next(i + len(block) for i in range(end, len(root.response_ids))
                   if root.response_ids[i:i + len(block)] == block)
    assert child.response_ids[:end] == root.response_ids[:end]
    assert child.tool_calls[:node] == root.tool_calls[:node] and len(child.tool_calls) == 3
    assert child.rounds == root.rounds == 4 and child.finish == root.finish == "eos"
    for t in real:
        assert t.seg_entropy == pytest.approx(e, abs=1e-6)


class CallLog:
    """An engine that records each generate call: (limits, until, tokens each row sampled)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, n, tails, limits=None, until=None):
        segments = self.inner.generate(n, tails, limits, until)
        self.calls.append((limits, until, [len(s.tokens) for s in segments]))
        return segments


def test_children_start_in_the_round_of_their_parents_decision(tok, checked_rollout,
                                                                 monkeypatch):
    """ARPO that always branches, w = 4, segments of n = 24 tokens. Round 1: Q1 and Q3 call a
    tool, Q2 thinks on. Round 2: Q1 and Q3 are at a node. The first call stops each of them after
    exactly w tokens (Q3 sooner where its next call is shorter: it then waits for its tool) and
    ends when both have stopped, cutting Q2 at the same step; both branch; in a second call of the
    same round each child samples a whole segment from its node while the others finish theirs
    (n - w tokens)."""
    logs = []
    monkeypatch.setitem(rollout_module.ENGINES, "cached",
                        lambda model, sampling: logs.append(CallLog(CachedEngine(model, sampling)))
                        or logs[-1])
    call, answer = ids(tok, "<search> x </search>"), ids(tok, " a" * 8 + " <answer> y </answer>")
    think = ids(tok, " b" * 30 + " <search> z </search>")
    model = ScriptedPolicy(tok, {"Q1": [call, answer], "Q2": [think, answer],
                                 "Q3": [call, call, answer]})
    cfg = cfg_with(k=2, global_rollouts=1, branching=True, pre_monitor=False, branch_penalty=False,
                   tau=1.0, gamma=0.0, entropy_window=4, segment_tokens=24, max_rounds=12)
    res = checked_rollout(model, ["Q1?", "Q2?", "Q3?"], cfg)
    calls = logs[0].calls
    assert calls[0] == ([24] * 3, None, [len(call), 24, len(call)])
    q3 = min(4, len(call))                    # Q3's tokens in the first call of round 2
    assert calls[1] == ([4, 24, 4], [True, False, True], [4, 4, q3])
    q3_left = 0 if q3 == len(call) else 20    # its call came before w tokens: it samples no more
    assert calls[2] == ([20, 24, 20, q3_left, 24], None,
                        [min(20, len(answer) - 3), min(24, len(answer) + 1),    # Q1, its child
                         min(20, len(think) - 28),                             # Q2
                         min(q3_left, len(call) - q3), min(24, len(call))])    # Q3, its child
    q1, child = [t for t in res.trajectories if t.question_idx == 0]
    assert child.parent_id == q1.traj_id and not child.is_duplicate
    assert child.response_ids == q1.response_ids and child.rounds == q1.rounds == 2
    # where no decision can create a child (a GRPO chain; no room left under k), a round is one
    # call: nothing is cut
    for rules in (dict(CHAIN, k=1), dict(k=1)):
        res = checked_rollout(model, ["Q1?", "Q2?", "Q3?"], dataclasses.replace(cfg, **rules))
        assert len(logs[-1].calls) == res.rounds and all(c[1] is None for c in logs[-1].calls)


def test_a_decision_is_due_w_tokens_after_the_node_across_rounds(monkeypatch):
    """w = 6, segments of 4 tokens: round 2 samples 4 tokens after the result (no decision yet);
    round 3 stops the row after 2 more, decides, and the child joins that round."""
    tok = toy_tokenizer()
    logs = []
    monkeypatch.setitem(rollout_module.ENGINES, "cached",
                        lambda model, sampling: logs.append(CallLog(CachedEngine(model, sampling)))
                        or logs[-1])
    call, answer = ids(tok, "<search> x </search>"), ids(tok, " a" * 8 + " <answer> y </answer>")
    assert len(call) <= 4                    # the call is round 1's segment
    cfg = cfg_with(k=2, global_rollouts=1, branching=True, pre_monitor=False, branch_penalty=False,
                   tau=1.0, gamma=0.0, entropy_window=6, segment_tokens=4, max_rounds=12)
    fakes.checked_rollout(ScriptedPolicy(tok, [call, answer]), tok, ["Q?"], TOOLS, cfg, seed=0,
                          system_prompt="sys")
    assert logs[0].calls[:4] == [([4], None, [len(call)]), ([4], None, [4]), ([2], [True], [2]),
                                 ([2, 4], None, [2, 4])]


def streak_run(tok, segment_tokens):
    """AEPO rule, penalty 0.5 per l (c = 1, 0.5, 0 at l = 0, 1, 2), tau = 1, steep gamma: a
    decision branches iff Delta H > 0 and l < 2. Entropies rise segment after segment."""
    ps = [[p] * 4 for p in (0.99, 0.95, 0.9, 0.8, 0.7, 0.6)]
    model = ScriptedPolicy(tok, entropy_script(tok, ps))
    cfg = cfg_with(k=16, global_rollouts=1, branching=True, pre_monitor=False,
                   branch_penalty=True, branch_penalty_rate=0.5, tau=1.0, gamma=1000.0,
                   entropy_window=4, call_limit=6, max_rounds=64, max_response_tokens=1024,
                   segment_tokens=segment_tokens)
    return ScriptedPolicy, model, cfg


def test_the_streak_l_counts_tool_steps_whatever_the_round_size(tok, checked_rollout):
    """The root's path: node 1 branches (l 0 -> 1), node 2 too (l 1 -> 2), node 3 is blocked
    (c = 0; l resets), nodes 4 and 5 branch again. Children inherit the streak of the node they
    start at. With segments of 4 tokens a segment spans several generate rounds; l is the same.
    A path at node i with streak l spawns T(i, l) trajectories: T(i, l) = [l < 2] (1 + 2 T(i+1, l+1))
    + [l = 2] T(i+1, 0), T(6, .) = 0, so T(1, 0) = 15 branches."""
    runs = {}
    for seg in (4, 64):
        _, model, cfg = streak_run(tok, seg)
        res = checked_rollout(model, ["Q1?"], cfg)
        (s,) = res.stats
        # the whole tree: 1 + 2 T(2, 1) = 15 branches, T(i, l) counted node by node: room never
        # binds, and no restart is needed
        assert (s.n_global, s.n_branch, s.n_restart) == (1, 15, 0)
        assert all(t.finish == "eos" for t in res.trajectories if not t.is_duplicate)
        root = [d for d in s.decisions if d[0] == 0]
        assert [(d[1], d[3], d[4]) for d in root] == [(1, 0, 1), (2, 1, 1), (3, 2, 0), (4, 0, 1),
                                                      (5, 1, 1)]
        runs[seg] = sorted((d[1], d[3], d[4]) for d in s.decisions)
        assert s.consecutive_branch_steps == sum(d[4] for d in s.decisions if d[3] > 0)
    assert runs[4] == runs[64]
    assert {l for _, l, _ in runs[4]} == {0, 1, 2}


def test_restarts_leave_l_alone_and_start_within_max_rounds_of_the_budget():
    cfg = cfg_with(k=4, max_rounds=10)
    sampler = _Sampler(None, None, TOOLS, cfg, random.Random(0), vocab=10)
    sampler.questions = [Question([1, 2], m=2, started=1), Question([3], m=2, started=4)]
    sampler.res.stats = [QuestionStats(), QuestionStats()]
    assert sampler._new_globals() == [0] and sampler.res.stats[0].n_restart == 1
    sampler.questions[0].active = 1                             # busy: no restart
    assert sampler._new_globals() == []
    late = Question([1], m=4, started=2, opened=7)              # AEPO: budget known at round 7
    assert wants_restart(late, k=4, round_=16, max_rounds=10)
    assert not wants_restart(late, k=4, round_=17, max_rounds=10)


# --------------------------------------------------------------------------------------------------
# 3. Equal budgets: no algorithm loses a trajectory to the round budget


@pytest.mark.parametrize("algo", [CHAIN,
                                  dict(branching=True, pre_monitor=False, branch_penalty=False),
                                  dict(branching=True, pre_monitor=True, branch_penalty=True)],
                         ids=["grpo", "arpo", "aepo"])
def test_no_algorithm_loses_trajectories_to_the_round_budget(tok, algo, checked_rollout):
    seg0 = ids(tok, "<think> a </think> <search> x </search>")
    model = ScriptedPolicy(tok, [seg0, ids(tok, " <answer> \\boxed{ y } </answer>")])
    cfg = cfg_with(k=8, segment_tokens=4, max_rounds=14, **algo)
    res = checked_rollout(model, ["Q1?", "Q2?"], cfg)
    assert [t.finish for t in res.trajectories] == ["eos"] * 16
    assert all(t.rounds <= cfg.max_rounds for t in res.trajectories)


# --------------------------------------------------------------------------------------------------
# The pure rules of the sampler


def test_n_children_respects_z_minus_one_and_the_room_under_k():
    always = cfg_with(branch_z=4, tau=1.0, gamma=0.0, branch_penalty=False)
    assert n_children(0.0, 0, room=10, cfg=always, rng=random.Random(0)) == 3
    assert n_children(0.0, 0, room=2, cfg=always, rng=random.Random(0)) == 2
    never = cfg_with(branch_z=4, tau=0.0, gamma=0.0, branch_penalty=False)
    assert n_children(0.0, 0, room=10, cfg=never, rng=random.Random(0)) == 0
    penalised = cfg_with(branch_z=4, tau=0.5, gamma=10.0, branch_penalty=True,
                         branch_penalty_rate=0.05)
    assert n_children(1.0, 20, room=10, cfg=penalised, rng=random.Random(0)) == 0  # c = 0 at l = 20
    assert n_children(1.0, 0, room=10, cfg=penalised, rng=random.Random(0)) == 3
    for room in (0, -2):                                  # no room (or less): not one draw
        rng = random.Random(0)
        assert n_children(0.0, 0, room=room, cfg=always, rng=rng) == 0
        assert rng.random() == random.Random(0).random()


@pytest.mark.parametrize("where", ["after_result", "before_result"])
def test_a_question_never_starts_more_than_k_and_the_probe_never_branches(tok, where,
                                                                           checked_rollout):
    """AEPO with tau = 0 (every draw branches) and a probe that calls two tools, k = 4: the probe
    decides nothing (m is unknown while it runs), then exactly m globals start with no restart, and
    branches fill the rest up to k and no further."""
    seg = ids(tok, "<think> a </think> <search> x </search>")
    model = ScriptedPolicy(tok, [seg, seg, ids(tok, " <answer> \\boxed{ y } </answer>")])
    cfg = cfg_with(k=4, branching=True, pre_monitor=True, branch_penalty=True, tau=0.0,
                   step_entropy=where)
    res = checked_rollout(model, ["Q1?", "Q2?"], cfg)
    for q, s in enumerate(res.stats):
        assert s.m == 3 and (s.n_global, s.n_restart) == (3, 0)        # floor(4 / 2) + 1
        assert s.n_global + s.n_branch == 4 and s.n_duplicate == 0
        probe = q                                                      # started first: ids 0, 1
        assert any(t.traj_id == probe and t.is_global for t in res.trajectories)
        assert s.decisions and all(d[0] != probe for d in s.decisions)


def test_budget_from_probe_excludes_the_root_segment_from_h_tool():
    m, h_root, h_tool = budget_from_probe([2.0, 1.0, 0.0], k=8, beta=0.5)
    assert (h_root, h_tool) == (2.0, 0.5)
    assert m == math.floor(8 / (1 + math.exp(-0.5 * 1.5))) + 1 == 6
    assert budget_from_probe([0.7], k=8, beta=0.5) == (5, 0.7, 0.7)   # no tool: H_tool = H_root


def test_next_streak_and_restart_rule():
    assert [next_streak(2, True), next_streak(2, False), next_streak(0, True)] == [3, 0, 1]
    idle = Question([1], m=4, started=2)
    assert wants_restart(idle, k=4, round_=3, max_rounds=12)
    assert not wants_restart(idle, k=4, round_=12, max_rounds=12)          # restarts only early on
    probe_running = Question([1], m=None, started=1)
    assert not wants_restart(probe_running, k=4, round_=0, max_rounds=12)
    assert not wants_restart(Question([1], m=4, started=4), k=4, round_=0, max_rounds=12)
    assert not wants_restart(Question([1], m=4, started=2, active=1), k=4, round_=0, max_rounds=12)
