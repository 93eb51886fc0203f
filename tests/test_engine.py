"""The generate call both engines share (engine.sample_segments): where each row stops, what it
records, and what it costs the host. Each test guards one way of getting it wrong:
  - a closing tag spelled in more tokens than its canonical spelling (Qwen3 can spell `</search>`
    one character a token) must still stop the row;
  - a tag split across two generate calls (two rounds of the rollout) must still run its call;
  - log-probs and entropies are those of the temperature-1 policy over the full vocabulary, not of
    the tempered or top-p-truncated distribution tokens are drawn from;
  - top-k stays off (generate would otherwise apply its default top-50);
  - every column after a row's stop, the first one included, is filler (mask 0);
  - the stop check reads the device once per step for the whole batch.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Qwen3Config, Qwen3ForCausalLM

import engine
from aepo import Config
from engine import ReencodeEngine, Sampling, sample_segments
from fakes import ScriptedPolicy, ids, qwen3_tokenizer, toy_tokenizer
from kvcache import CachedEngine
from rollout import rollout   # before qwen3_tokenizer puts benchmarks/ (rollout.py) on the path
from support.policy import prompt_ids

ENGINES = {"cached": CachedEngine, "reencode": ReencodeEngine}


def prompt(tok, question):
    return prompt_ids(tok, question, "sys")


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that bring device data to the host."""

    READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# Where rows stop


@pytest.mark.parametrize("name", ["cached", "reencode"])
def test_a_tag_spelled_one_character_a_token_stops_the_row(name):
    """Qwen3 spells `</search>` in 3 tokens, but a policy may write it in 9, one per character: the
    window the stop check decodes must hold them all."""
    tok = qwen3_tokenizer()
    chars = [i for c in "</search>" for i in ids(tok, c)]
    assert len(chars) == 9 and len(ids(tok, "</search>")) == 3
    head = ids(tok, "<search> Mira Quell ")
    script = head + chars + ids(tok, " and more text")
    eng = ENGINES[name](ScriptedPolicy(tok, [script]), Sampling.make(tok, greedy=True))
    eng.add([prompt(tok, "Q?")])
    (seg,) = eng.generate(40, tails=[[]])
    assert (seg.stop, seg.tokens) == ("tag", head + chars)


def test_the_tag_window_is_the_longest_tag_in_characters():
    tok = qwen3_tokenizer()
    assert Sampling.make(tok).tag_window >= max(len(t) for t in engine.CLOSING_TAGS)


@pytest.mark.parametrize("tokenizer", ["bpe", "qwen3"])
def test_a_tag_split_across_two_rounds_still_runs_its_call(tokenizer):
    """Segments of 2 tokens: `</search>` (3 or 9 tokens) always straddles two generate calls. The
    row must stop at the tag and the search must run, its result be read, and the script go on."""
    tok = toy_tokenizer(tags_are_tokens=False) if tokenizer == "bpe" else qwen3_tokenizer()
    call = ids(tok, "<search> Mira </search>")
    answer = ids(tok, " <answer> \\boxed{ Vantor } </answer>")
    searched = []
    tools = {"search": lambda q: searched.append(q) or "Mira was born in Vantor.",
             "python": lambda c: ""}
    cfg = Config(k=1, questions_per_step=1, segment_tokens=2, branching=False, pre_monitor=False,
                 branch_penalty=False, global_rollouts=1, max_rounds=64)
    (t,) = rollout(ScriptedPolicy(tok, [call, answer]), tok, ["Q?"], tools, cfg, seed=0,
                   system_prompt="sys", greedy=True).trajectories
    assert searched == ["Mira"] and [c[1] for c in t.tool_calls] == ["Mira"]
    assert t.response_ids[:len(call)] == call and t.response_ids[-len(answer) - 1:-1] == answer
    assert "Vantor." in tok.decode(t.response_ids) and t.finish == "eos"


# --------------------------------------------------------------------------------------------------
# What is recorded


def random_qwen3(vocab, scale=1.0):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                         tie_word_embeddings=False)).eval()
    model.lm_head.weight.data *= scale
    return model


def never_stop(sampling: Sampling) -> Sampling:
    sampling.eos_ids, sampling.tag_ids, sampling.tag_strings = [], [], []
    return sampling


def raw_logits(model, seq, start):
    """The model's logits for every token from column `start` on (the temperature-1 policy)."""
    with torch.no_grad():
        return model(input_ids=seq).logits[:, start - 1:-1].float()             # (B, N, V)


@torch.no_grad()
def test_logp_and_entropy_are_of_the_temperature_1_full_distribution():
    """Tokens are drawn at temperature 0.5 from the top-p 0.8 nucleus; what is recorded is the
    policy the loss differentiates: log-softmax of the raw logits over the whole vocabulary."""
    model = random_qwen3(64, scale=40.0)               # peaked logits: the nucleus is a few tokens
    sampling = never_stop(Sampling.make(toy_tokenizer(), temperature=0.5, top_p=0.8))
    ids_ = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    seq, _, _, segments = sample_segments(model, ids_, torch.ones_like(ids_), None, 12, sampling,
                                          tails=[[]] * 3)
    logp = torch.log_softmax(raw_logits(model, seq, 5), -1)                     # (B, N, V)
    want_logp = logp.gather(-1, seq[:, 5:, None]).squeeze(-1)                 # (B, N)
    want_entropy = -(logp.exp() * logp).sum(-1)                                 # (B, N) exact
    got_logp = torch.tensor([s.logp for s in segments])
    got_entropy = torch.tensor([s.entropy for s in segments])
    torch.testing.assert_close(got_logp, want_logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_entropy, want_entropy, atol=1e-4, rtol=0)
    assert want_entropy.mean() > 0.1       # the temperature or the nucleus would change these


@torch.no_grad()
def test_top_k_is_off():
    """Near-uniform logits over 356 tokens: many samples fall outside the top 50, which generate's
    default top_k=50 would forbid."""
    tok = toy_tokenizer()
    model = random_qwen3(len(tok))
    sampling = never_stop(Sampling.make(tok))
    ids_ = torch.randint(1, len(tok), (2, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    seq, _, _, _ = sample_segments(model, ids_, torch.ones_like(ids_), None, 40, sampling,
                                   tails=[[]] * 2)
    logits = raw_logits(model, seq, 4)                                          # (B, N, V)
    rank = (logits > logits.gather(-1, seq[:, 4:, None])).sum(-1)               # (B, N)
    assert (rank >= 50).float().mean() > 0.5


# --------------------------------------------------------------------------------------------------
# Filler after a stop, and the host's reads


def three_rows(tok):
    """Rows that stop at different steps: a multi-token tag, a later tag, EOS."""
    scripts = {"Q1": ids(tok, "<search> x </search>"),
               "Q2": ids(tok, "<think> a b a b </think> <python> print(1) </python>"),
               "Q3": ids(tok, "<think> a </think>")}
    return (ScriptedPolicy(tok, {q: [seg] for q, seg in scripts.items()}),
            [prompt(tok, q + "?") for q in scripts], scripts)


def three_row_engine(name: str):
    """(tokenizer, engine of kind `name` holding three_rows' prompts, the three scripts)."""
    tok = toy_tokenizer(tags_are_tokens=False)
    model, prompts, scripts = three_rows(tok)
    rows_per_call = {"naive": 1}.get(name)
    eng = (ReencodeEngine(model, Sampling.make(tok, greedy=True), rows_per_call)
           if name != "cached" else CachedEngine(model, Sampling.make(tok, greedy=True)))
    eng.add(prompts)
    return tok, eng, list(scripts.values())


@pytest.mark.parametrize("name", ["cached", "reencode", "naive"])
def test_each_row_stops_at_its_own_limit_and_goes_on_in_the_next_call(name):
    """Per-row limits [2, 0, 60]: row 0 samples 2 tokens (no stop reason: its segment goes on),
    row 1 none at all (a row waiting for a tool), row 2 reaches its EOS first. The next call
    continues rows 0 and 1 exactly where they were, and samples nothing for row 2 (limit 0)."""
    tok, eng, (q1, q2, q3) = three_row_engine(name)
    first = eng.generate(60, tails=[[]] * 3, limits=[2, 0, 60])
    assert [(s.tokens, s.stop) for s in first] == [(q1[:2], None), ([], None),
                                                    (q3 + [tok.eos_token_id], "eos")]
    assert [len(s.logp) for s in first] == [len(s.entropy) for s in first] == [2, 0, len(q3) + 1]
    second = eng.generate(60, tails=[q1[:2], [], []], limits=[60, 60, 0])
    assert [(s.tokens, s.stop) for s in second] == [(q1[2:], "tag"), (q2, "tag"), ([], None)]
    assert eng.generated_tokens == len(q1) + len(q2) + len(q3) + 1


@pytest.mark.parametrize("name", ["cached", "reencode", "naive"])
def test_a_call_ends_once_the_rows_it_waits_for_have_stopped(name):
    """`until` marks row 0 (say, a row whose branch decision is due after 2 tokens): once it has
    stopped, the call ends and the other rows are cut at the same step. A call with no such row
    (each row alone, naive) runs every row to its own stop."""
    tok, eng, (q1, q2, q3) = three_row_engine(name)
    segs = eng.generate(60, tails=[[]] * 3, limits=[2, 60, 60], until=[True, False, False])
    if name == "naive":
        want = [(q1[:2], None), (q2, "tag"), (q3 + [tok.eos_token_id], "eos")]
    else:
        want = [(q1[:2], None), (q2[:2], None), (q3[:2], None)]
    assert [(s.tokens, s.stop) for s in segs] == want


def test_every_column_after_a_stop_is_filler():
    tok = toy_tokenizer(tags_are_tokens=False)
    model, prompts, scripts = three_rows(tok)
    ids_ = torch.tensor([[tok.pad_token_id] * (max(map(len, prompts)) - len(p)) + p
                         for p in prompts])
    mask = (torch.arange(ids_.shape[1]) >= torch.tensor(
        [ids_.shape[1] - len(p) for p in prompts])[:, None]).long()
    _, new_mask, _, segments = sample_segments(model, ids_, mask, None, 60,
                                               Sampling.make(tok, greedy=True), tails=[[]] * 3)
    assert [s.stop for s in segments] == ["tag", "tag", "eos"]
    assert [s.tokens for s in segments[:2]] == [scripts["Q1"], scripts["Q2"]]
    N = new_mask.shape[1]
    assert new_mask.tolist() == [[1] * len(s.tokens) + [0] * (N - len(s.tokens))
                                 for s in segments]


def test_the_stop_check_reads_the_device_once_per_step(monkeypatch):
    tok = toy_tokenizer(tags_are_tokens=False)
    model, prompts, scripts = three_rows(tok)
    reads, call = [], engine._StopRecorder.__call__

    def counted(self, input_ids, scores, **kw):
        with HostReads() as r:
            out = call(self, input_ids, scores, **kw)
        reads.append(r.n)
        return out

    monkeypatch.setattr(engine._StopRecorder, "__call__", counted)
    eng = ReencodeEngine(model, Sampling.make(tok, greedy=True))
    eng.add(prompts)
    segments = eng.generate(60, tails=[[]] * 3)
    assert [s.stop for s in segments] == ["tag", "tag", "eos"]
    assert len(reads) == max(len(s.tokens) for s in segments) and set(reads) == {1}
