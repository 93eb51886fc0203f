"""The cached engine's layout invariant: however a row's tokens got into the batch (a prompt placed
from a kept cache into a wider or narrower history, a tool result encoded before a branch copy, a
re-fed last token, rows that join later or leave), every sampled token, log-prob and entropy equals
what the reference engine gets by re-encoding each row from scratch. The KV storage is written in
place and grows in chunks (decode time per token flat in the length: benchmarks/decode.py)."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from engine import ReencodeEngine, Sampling
from fakes import toy_tokenizer
import kvcache
from kvcache import CachedEngine


def model_(vocab):
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=8, pad_token_id=0)).eval()


def play(engine, script):
    """Apply a list of verbs; return every segment generated, as (tokens, logp, entropy) per row."""
    out = []
    for verb, *args in script:
        if verb == "generate":              # ("generate", n[, limits[, until]])
            segs = engine.generate(*args[:1], [[] for _ in range(engine_rows(engine))], *args[1:])
            out.append([(s.tokens, s.logp, s.entropy) for s in segs])
        else:
            getattr(engine, verb)(*args)
    return out


def engine_rows(engine):
    return len(engine.seqs) if isinstance(engine, ReencodeEngine) else len(engine.unfed)


@pytest.mark.parametrize("chunk", [3, 256])   # 3: the storage grows in most calls, mid-segment
@torch.no_grad()
def test_cached_engine_equals_reencoding_under_every_verb(monkeypatch, chunk):
    monkeypatch.setattr(kvcache, "CHUNK", chunk)
    tok = toy_tokenizer()
    model = model_(len(tok))
    sampling = Sampling.make(tok, greedy=True)
    # never stop: compare every step
    sampling.eos_ids, sampling.tag_ids, sampling.tag_strings = [], [], []
    a, b, c = list(range(5, 12)), [12, 13, 14], list(range(15, 25))
    script = [("add", [a, b]), ("generate", 3),
              ("append", 0, [30, 31, 32]), ("append", 1, [33]),   # tool results
              ("select", [0, 1, 1]),                              # row 1 branches
              ("append", 2, [34, 35]), ("generate", 2),
              ("add", [c, a]),                                    # a longer prompt joins; a again
              ("generate", 4),
              ("select", [3, 0]),                                 # rows leave, order changes
              ("append", 1, [36]), ("generate", 3),
              ("release", a), ("add", [b]), ("generate", 2)]
    cached, reference = CachedEngine(model, sampling), ReencodeEngine(model, sampling)
    got, want = play(cached, script), play(reference, script)
    assert [[s[0] for s in r] for r in got] == [[s[0] for s in r] for r in want]
    for round_got, round_want in zip(got, want):
        for (_, lp, h), (_, lp_ref, h_ref) in zip(round_got, round_want):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp_ref), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(h), torch.tensor(h_ref), atol=1e-5, rtol=0)
    assert cached.prefill_tokens < reference.prefill_tokens


@torch.no_grad()
def test_cached_engine_equals_reencoding_when_rows_stop_at_their_own_limits():
    """Rows of one call that stop at different steps by their own limits (0: a row that waits for
    a tool is fed nothing), and a call that ends once a chosen row has stopped, cutting the others:
    each row then goes on from where it really stopped, a branch copy too."""
    tok = toy_tokenizer()
    model = model_(len(tok))
    sampling = Sampling.make(tok, greedy=True)
    sampling.eos_ids, sampling.tag_ids, sampling.tag_strings = [], [], []
    a, b, c = list(range(5, 12)), [12, 13, 14], list(range(15, 25))
    script = [("add", [a, b, c]), ("generate", 6, [2, 6, 0]),
              ("append", 2, [30, 31]),                        # row 2's tool result arrives
              ("generate", 6, [6, 0, 4], [False, False, True]),   # row 2's stop ends the call
              ("select", [0, 0, 1, 2]), ("rewind", 1, 3),     # row 0 branches 3 tokens back
              ("generate", 5, [1, 5, 0, 3]), ("generate", 3)]
    cached = CachedEngine(model, sampling)
    got, want = play(cached, script), play(ReencodeEngine(model, sampling), script)
    assert [[len(s[0]) for s in r] for r in got] == [[2, 6, 0], [4, 0, 4], [1, 5, 0, 3],
                                                     [3, 3, 3, 3]]
    # prompts but their last token (6 + 2 + 9), then per call what is fed: the last prompt tokens
    # (3); a re-fed token and row 2's result (1 + 2); one re-fed token per row allowed to sample
    # (3, then 4). A row waiting at limit 0 is fed nothing.
    assert cached.prefill_tokens == 17 + 3 + 3 + 3 + 4
    assert [[s[0] for s in r] for r in got] == [[s[0] for s in r] for r in want]
    for round_got, round_want in zip(got, want):
        for (_, lp, h), (_, lp_ref, h_ref) in zip(round_got, round_want):
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp_ref), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(h), torch.tensor(h_ref), atol=1e-5, rtol=0)


@torch.no_grad()
def test_decoding_writes_the_kv_storage_in_place():
    """Each decoded token's keys go into the storage the previous step used (the tensor of that step
    is kept alive, so a copy could not reuse its memory): the engine reserves the call's columns."""
    tok = toy_tokenizer()
    model = model_(len(tok))
    sampling = Sampling.make(tok)
    sampling.eos_ids, sampling.tag_ids, sampling.tag_strings = [], [], []
    engine = CachedEngine(model, sampling)
    engine.add([list(range(5, 40)), list(range(40, 50))])
    seen = []            # the layer-0 keys after each forward, kept alive

    def look(module, args, kwargs, output):
        seen.append(engine.cache.layers[0].keys)

    model.register_forward_hook(look, with_kwargs=True)
    engine.generate(300, tails=[[], []])
    moved = sum(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                for a, b in zip(seen, seen[1:]))
    assert len(seen) == 300 and moved == 0


@torch.no_grad()
def test_rows_that_leave_are_dropped_before_the_prefill():
    """A row that finishes as its tool result arrives (a budget or round limit) leaves at the next
    select: its result is never encoded, and the kept rows' prefill is not widened by it."""
    tok = toy_tokenizer()
    model = model_(len(tok))
    sampling = Sampling.make(tok, greedy=True)
    sampling.eos_ids, sampling.tag_ids, sampling.tag_strings = [], [], []
    engine = CachedEngine(model, sampling)
    engine.add([list(range(5, 12)), list(range(12, 15))])
    engine.generate(3, tails=[[], []])
    engine.append(0, [30, 31, 32])                           # row 0's result: it goes on
    engine.append(1, list(range(40, 80)))                    # row 1's: it finishes, and leaves
    widths = []
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape),
                                    with_kwargs=True)
    before = engine.prefill_tokens
    engine.select([0, 0])                                    # row 0 branches, row 1 leaves
    assert engine.prefill_tokens - before == 2               # row 0's result but its last token
    assert widths == [torch.Size([1, 3])]    # one row: its last sampled token (uncached) + 2
