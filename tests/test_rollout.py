"""The tree sampler: masks, call limit, restart and duplicate rules, branching limits, KV-cache
correctness (greedy tree == recompute from scratch) and determinism."""
import dataclasses

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from aepo import Config
from fakes import ScriptedPolicy, checked_rollout, ids, toy_tokenizer
from support.policy import prompt_ids
from tools import result_block

TOOLS = {"search": lambda q: f"Page 1: {q} was born in Vantor.", "python": lambda c: "25"}
CHAIN = dict(branching=False, pre_monitor=False, branch_penalty=False)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def rollout(model, tok, questions, tools, cfg, seed, system_prompt, **kw):
    """rollout() with the cached engine; every scripted scenario is also checked against the
    re-encoding engine."""
    compare = "engine" not in kw and isinstance(model, ScriptedPolicy)
    return checked_rollout(model, tok, questions, tools, cfg, seed, system_prompt, compare, **kw)


def cfg_with(**kw):
    return dataclasses.replace(Config(), **kw)


def test_masks_results_and_text(tok):
    seg0 = ids(tok, "<think> a </think> <search> Mira Quell </search>")
    seg1 = ids(tok, " <think> b </think> <answer> The final answer is \\boxed{ Vantor } </answer>")
    model = ScriptedPolicy(tok, [seg0, seg1])
    res = rollout(model, tok, ["Where was Mira Quell born?", "Q2?"], TOOLS, cfg_with(k=3, **CHAIN),
                  seed=0, system_prompt="sys")
    assert len(res.trajectories) == 6
    block = ids(tok, result_block(TOOLS["search"]("Mira Quell")))
    for t in res.trajectories:
        assert t.finish == "eos"
        assert t.tool_calls == [("search", "Mira Quell", TOOLS["search"]("Mira Quell"))]
        expected = seg0 + block + seg1 + [tok.eos_token_id]
        assert t.response_ids == expected
        assert t.loss_mask == [1] * len(seg0) + [0] * len(block) + [1] * (len(seg1) + 1)
        assert len(t.logp) == len(t.entropy) == len(t.response_ids)
        assert all(lp == 0.0 for lp, m in zip(t.logp, t.loss_mask) if m == 1)  # scripted: p = 1
        assert "<result>\nPage 1: Mira Quell was born in Vantor.\n</result>" in t.text
        assert t.text.endswith("</answer>")


def test_call_limit_forces_eos(tok):
    search = ids(tok, "<think> a </think> <search> x </search>")
    model = ScriptedPolicy(tok, [search, search, search, ids(tok, " <answer> y </answer>")])
    res = rollout(model, tok, ["Q?"], TOOLS, cfg_with(k=2, call_limit=2, **CHAIN), seed=0,
                  system_prompt="sys")
    for t in res.trajectories:
        assert t.finish == "call_limit" and len(t.tool_calls) == 2
        assert t.response_ids[-1] == tok.eos_token_id and t.loss_mask[-1] == 0  # forced: mask 0
        assert t.response_ids[-1 - len(search):-1] == search                 # third call not run


def test_length_budget_truncates(tok):
    model = ScriptedPolicy(tok, [ids(tok, " a b c d e f g h i j k l m n o p")])
    cfg = cfg_with(k=1, max_response_tokens=5, segment_tokens=3, **CHAIN)
    res = rollout(model, tok, ["Q?"], TOOLS, cfg, seed=0, system_prompt="sys")
    (t,) = res.trajectories
    assert t.finish == "length" and len(t.response_ids) == 5 and t.loss_mask == [1] * 5


def test_restart_then_duplicate(tok):
    """No branching (P = 0): an idle question restarts one global per round; what is still short at
    the end is padded by duplicating its last trajectory."""
    model = ScriptedPolicy(tok, [ids(tok, " <answer> y </answer>")])
    cfg = cfg_with(k=4, global_rollouts=1, branching=True, pre_monitor=False, branch_penalty=False,
                   tau=0.0, gamma=0.0, max_rounds=2)
    res = rollout(model, tok, ["Q1?", "Q2?"], TOOLS, cfg, seed=0, system_prompt="sys")
    assert len(res.trajectories) == 8
    for q, s in enumerate(res.stats):
        group = res.trajectories[4 * q: 4 * q + 4]
        assert (s.n_global, s.n_restart, s.n_branch, s.n_duplicate) == (2, 1, 0, 2)
        assert [t.is_duplicate for t in group] == [False, False, True, True]
        assert all(t.question_idx == q for t in group)
        assert group[3].response_ids == group[1].response_ids


def test_branching_never_exceeds_k_and_children_diverge_after_result(tok):
    """tau = 1, gamma = 0: ARPO always branches. Every child equals its parent up to and including
    the tool result, and a question never holds more than k trajectories."""
    a, b = ids(tok, " a")[0], ids(tok, " b")[0]
    seg0 = ids(tok, "<think>") + [{a: 0.5, b: 0.5}] + ids(tok, " </think> <search> x </search>")
    seg1 = [{a: 0.5, b: 0.5}] * 3 + ids(tok, " <search> z </search>")
    seg2 = [{a: 0.5, b: 0.5}] * 2 + ids(tok, " <answer> y </answer>")
    model = ScriptedPolicy(tok, [seg0, seg1, seg2])
    cfg = cfg_with(k=6, global_rollouts=2, branching=True, pre_monitor=False, branch_penalty=False,
                   tau=1.0, gamma=0.0, branch_z=3)
    res = rollout(model, tok, ["Q1?", "Q2?", "Q3?"], TOOLS, cfg, seed=3, system_prompt="sys")
    assert len(res.trajectories) == 18
    by_id = {t.traj_id: t for t in res.trajectories}
    n_children = 0
    for s in res.stats:
        assert s.n_global + s.n_branch <= cfg.k and s.n_branch > 0
        assert 0 < max(s.branches_per_source.values()) <= cfg.branch_z - 1   # Z - 1 per source
    result_end = tok.convert_tokens_to_ids("</result>")
    for t in res.trajectories:
        if t.parent_id is None or t.is_duplicate:
            continue
        n_children += 1
        parent = by_id[t.parent_id]
        # k fills up in the first round, so every child branched at its parent's first tool result
        end = parent.response_ids.index(result_end) + 1
        assert not t.is_global and t.tool_calls[0] == parent.tool_calls[0]
        for field in ("response_ids", "loss_mask", "logp", "entropy"):
            assert getattr(t, field)[:end] == getattr(parent, field)[:end], field
        assert t.seg_entropy[0] == parent.seg_entropy[0]
    assert n_children == sum(s.n_branch for s in res.stats) == 12


def test_aepo_probe_sets_the_budget(tok):
    seg0 = ids(tok, "<think> a </think> <search> x </search>")
    model = ScriptedPolicy(tok, [seg0, ids(tok, " <answer> y </answer>")])
    cfg = cfg_with(k=8, branching=True, pre_monitor=True, branch_penalty=True, beta=0.5)
    res = rollout(model, tok, ["Q1?", "Q2?"], TOOLS, cfg, seed=0, system_prompt="sys")
    for s in res.stats:
        # deterministic script: every entropy is 0, so m = floor(8 * sigmoid(0)) + 1 = 5
        assert (s.h_root, s.h_tool, s.m) == (0.0, 0.0, 5)
        assert s.n_global >= 5 and s.n_global + s.n_branch + s.n_duplicate == 8


@pytest.mark.parametrize("rules", [
    CHAIN,
    dict(branching=True, pre_monitor=True, branch_penalty=True, tau=2.0, gamma=0.0),  # no branching
    dict(branching=True, pre_monitor=False, branch_penalty=False, tau=1.0, gamma=0.0,
         global_rollouts=2)],
    ids=["grpo", "aepo-no-branch", "arpo-always-branch"])
def test_prompts_and_tool_results_are_encoded_once(tok, rules):
    """Prefill = each question's prompt[:-1] once, plus for every global its prompt's last token and
    its tool result, plus for every branch child the result's last token: later globals and restarts
    copy the kept prompt cache, and children copy their parent's cache with the result already
    encoded."""
    seg0 = ids(tok, "<think> a </think> <search> x </search>")
    model = ScriptedPolicy(tok, [seg0, ids(tok, " <answer> y </answer>")])
    questions = ["Where was Mira Quell born?", "Q2?"]
    res = rollout(model, tok, questions, TOOLS, cfg_with(k=8, **rules), seed=0, system_prompt="sys")
    result = len(ids(tok, result_block(TOOLS["search"]("x"))))
    assert all(t.finish == "eos" for t in res.trajectories)
    assert all(s.n_global + s.n_branch == 8 for s in res.stats)
    assert all(s.n_branch > 0 for s in res.stats) == (rules.get("tau") == 1.0)
    expected = sum(len(prompt_ids(tok, q, "sys")) - 1 + s.n_global * (1 + result) + s.n_branch
                   for q, s in zip(questions, res.stats))
    assert res.prefill_tokens == expected


def _biased_random_qwen(tok, seed=6):
    """A random tiny Qwen3 whose greedy output opens and closes searches and sometimes ends: enough
    to exercise branching, restarts and the call limit with real attention and KV caches. (Seed and
    scales were picked by searching for a model that shows all of these.)"""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        model.model.norm.weight[:3] = 1.5
        biases = [("<search>", 1.0), ("</search>", 0.5), ("<|im_end|>", 0.5)]
        for dim, (tag, scale) in enumerate(biases):
            i = tok.convert_tokens_to_ids(tag)
            model.lm_head.weight[i] = 0.0
            model.lm_head.weight[i, dim] = scale
    return model


@pytest.mark.parametrize("algo", ["grpo", "arpo", "aepo"])
def test_greedy_cached_tree_equals_recompute_from_scratch(tok, algo):
    model = _biased_random_qwen(tok)
    rules = dict(pre_monitor=algo == "aepo", branch_penalty=algo == "aepo",
                 branching=algo != "grpo")
    cfg = cfg_with(k=4, global_rollouts=2, segment_tokens=12, max_response_tokens=120, call_limit=2,
                   **rules)
    questions = ["Where was Mira Quell born?", "Q2 long question about a city?", "x?",
                 "Which company?"]
    runs = {mode: rollout(model, tok, questions, TOOLS, cfg, seed=1, system_prompt="sys",
                          greedy=True, engine=mode) for mode in ("cached", "reencode", "naive")}
    tree = runs["cached"]
    assert (sum(s.n_branch for s in tree.stats) > 0) == (algo != "grpo")
    assert {t.finish for t in tree.trajectories} == {"call_limit", "eos"}
    if algo == "arpo":
        assert sum(s.n_restart for s in tree.stats) > 0
    for mode in ("reencode", "naive"):
        for a, b in zip(tree.trajectories, runs[mode].trajectories):
            assert a.response_ids == b.response_ids and a.loss_mask == b.loss_mask
            for key in ("logp", "entropy"):
                torch.testing.assert_close(torch.tensor(getattr(a, key)),
                                           torch.tensor(getattr(b, key)), atol=1e-4, rtol=0)
    assert tree.prefill_tokens < runs["reencode"].prefill_tokens


def test_same_seed_same_trajectories(tok):
    model = _biased_random_qwen(tok)
    cfg = cfg_with(k=4, global_rollouts=2, segment_tokens=12, max_response_tokens=80)
    run = lambda seed: rollout(model, tok, ["Q1?", "Q2?"], TOOLS, cfg, seed=seed,
                               system_prompt="sys")
    a, b, c = run(0), run(0), run(1)
    assert [t.response_ids for t in a.trajectories] == [t.response_ids for t in b.trajectories]
    assert [t.response_ids for t in a.trajectories] != [t.response_ids for t in c.trajectories]


def test_the_call_is_cut_at_the_last_closing_tag():
    from rollout import up_to_last_tag

    assert up_to_last_tag("<search> a </search> b </search>\n") == "<search> a </search> b </search>"
    assert up_to_last_tag("x <python> 1 </python>)") == "x <python> 1 </python>"


def test_a_sampled_pad_ends_the_row_and_leaves_the_text(tok):
    """The pad id is a stop token too: a policy that samples it finishes ("eos"), and neither it nor
    EOS reaches the text the reward reads."""
    model = ScriptedPolicy(tok, [ids(tok, " <answer> y </answer>") + [tok.pad_token_id]])
    (t,) = rollout(model, tok, ["Q?"], TOOLS, cfg_with(k=1, **CHAIN), seed=0,
                   system_prompt="sys").trajectories
    assert t.finish == "eos" and t.response_ids[-1] == tok.pad_token_id
    assert t.text == tok.decode(ids(tok, " <answer> y </answer>"))


def test_budget_edges(tok):
    """EOS landing exactly on the response budget is a normal end; a tool result longer than the room
    left is cut at the budget (finish "length")."""
    seg = ids(tok, " a b c")
    model = ScriptedPolicy(tok, [seg])                               # then EOS
    res = rollout(model, tok, ["Q?"], TOOLS, cfg_with(k=1, max_response_tokens=len(seg) + 1,
                                                      **CHAIN), seed=0, system_prompt="sys")
    (t,) = res.trajectories
    assert t.finish == "eos" and len(t.response_ids) == len(seg) + 1
    call = ids(tok, "<search> x </search>")
    model = ScriptedPolicy(tok, [call, seg])
    res = rollout(model, tok, ["Q?"], TOOLS, cfg_with(k=1, max_response_tokens=len(call) + 3,
                                                      **CHAIN), seed=0, system_prompt="sys")
    (t,) = res.trajectories
    assert t.finish == "length" and len(t.response_ids) == len(call) + 3
    assert t.loss_mask == [1] * len(call) + [0] * 3 and len(t.tool_calls) == 1


def test_each_round_gives_the_row_with_most_room_its_full_segment(tok):
    """max_new_tokens follows the row with the most room left: a long row near its budget must not
    shorten the other rows' rounds. Sampled tokens are counted as kept."""
    long = ids(tok, " a" * 20 + " <search> x </search>")
    short = ids(tok, " b <search> x </search>")
    answer = ids(tok, " a" * 12 + " <answer> y </answer>")
    model = ScriptedPolicy(tok, {"Q1": [long, answer], "Q2": [short, answer]})
    block = len(ids(tok, result_block(TOOLS["search"]("x"))))
    budget = len(long) + block + 6                  # Q1 has 6 tokens of room after its result
    res = rollout(model, tok, ["Q1?", "Q2?"], TOOLS,
                  cfg_with(k=1, max_response_tokens=budget, **CHAIN), seed=0, system_prompt="sys")
    q1, q2 = res.trajectories
    assert q1.finish == "length" and q2.finish == "eos" and q2.rounds == 2
    # Q1 sampled past its budget in round 2; sampled_tokens counts only what the trajectories keep
    assert res.sampled_tokens == sum(q1.loss_mask) + sum(q2.loss_mask) < res.generated_tokens
