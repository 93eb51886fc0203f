"""The tree sampler's generate engine in its simplest form: every round, re-encode every row.

The sampler (rollout.py) drives an engine through six verbs. It holds one row per active
trajectory, in the sampler's order, and never sees a tensor:

    engine.add(prompts)             new rows, each starting from its prompt's token ids
    engine.generate(n, tails, limits, until)   sample up to n tokens for every row, row b at
                                    most limits[b] (0: none); the call ends early once the rows
                                    marked in `until` have stopped -> one Segment per row
    engine.append(b, tokens)        tokens the policy did not sample (a tool result, a forced EOS)
    engine.select(index)            keep rows `index`, in that order; a repeated index copies a row
    engine.rewind(b, n)             forget row b's last n tokens (a branch child restarts at a node)
    engine.release(prompt)          no later row will start from this prompt

`ReencodeEngine` below is the reference: about forty lines, no cache kept between rounds. It is what
the tests compare the cached engine (kvcache.py) against, token for token, and the benchmark's
baseline. Both share `sample_segments`, the one `model.generate` call that records, for every
sampled token, its exact entropy and log-prob under the temperature-1 policy, and that knows where
each row really stopped (a stop tag that is several tokens long, or EOS), so that filler never
passes for a sample.

    engine = ReencodeEngine(model, Sampling.make(tokenizer))
    engine.add([prompt_ids])
    (segment,) = engine.generate(64, tails=[[]])
    segment.tokens, segment.logp, segment.entropy, segment.stop   # stop: "eos" | "tag" | None
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from loss import entropy_of_logp

# generation stops after a tool call (arXiv 2510.14545, sec. 3)
CLOSING_TAGS = ("</search>", "</python>")


@dataclass
class Segment:
    tokens: list[int]           # sampled by the policy, the stop token(s) included
    logp: list[float]           # log pi(token) under the temperature-1 policy
    entropy: list[float]        # exact entropy (nats) of the distribution each token came from
    stop: str | None            # "eos", "tag" (a tool closing tag) or None (ran out of tokens)


@dataclass
class Sampling:
    """How tokens are drawn and where a segment stops: the same settings for every round."""

    tokenizer: object
    eos_ids: list[int]                # single tokens that end a trajectory (EOS, and the pad id)
    tag_ids: list[int]                # closing tags that are single tokens (the tiny tokenizer)
    tag_strings: list[str]            # closing tags that are several tokens (real tokenizers)
    tag_window: int                   # a row's last tokens decoded to see such a tag complete
    pad: int
    generate_kwargs: dict = field(default_factory=dict)
    _text: dict = field(default_factory=dict, repr=False)   # token id -> its text (memo)

    @staticmethod
    def make(tokenizer, *, greedy: bool = False, temperature: float = 1.0,
             top_p: float = 1.0) -> "Sampling":
        ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in CLOSING_TAGS}
        single = {tag: i for tag, i in ids.items()
                  if i is not None and i != tokenizer.unk_token_id and tokenizer.decode([i]) == tag}
        pad = tokenizer.pad_token_id
        kwargs = (dict(do_sample=False, temperature=None, top_k=None, top_p=None) if greedy else
                  dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p))  # no top-k
        strings = [tag for tag in CLOSING_TAGS if tag not in single]
        # Every token of a tag's spelling holds at least one of its characters, and a vocabulary may
        # spell it one character a token (Qwen3's can): its length in characters bounds the tokens
        # to decode, + 2 of slack. Its canonical token count (3 for </search> in Qwen3) does not.
        window = max(map(len, strings), default=1) + 2
        return Sampling(tokenizer, sorted({tokenizer.eos_token_id, pad}), sorted(single.values()),
                        strings, window, pad, kwargs)

    def may_close(self, token: int) -> bool:
        """Whether the token's text holds a closing tag's last character ('>'): only such a token
        can complete a tag, so only then is the row's window decoded."""
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return any(tag[-1] in self._text[token] for tag in self.tag_strings)


class _Recorder(LogitsProcessor):
    """Records the exact entropy and the sampled token's log-prob from the raw logits of each step.

    The processor sees logits before temperature / top-p, i.e. the temperature-1 policy. The token
    sampled at step t is only known at step t + 1 (it is then the last input id), so the log-softmax
    of one step is kept until the next: O(B x V) memory instead of all logits.
    """

    def __init__(self):
        self.entropy, self.logp, self._prev = [], [], None

    def __call__(self, input_ids, scores):
        if self._prev is not None:
            self.logp.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))   # (B,)
        self._prev = torch.log_softmax(scores.float(), dim=-1)                     # (B, V)
        self.entropy.append(entropy_of_logp(self._prev))                            # (B,) exact
        return scores

    def finish(self, last_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.logp.append(self._prev.gather(1, last_ids[:, None]).squeeze(1))
        return torch.stack(self.logp, 1).cpu(), torch.stack(self.entropy, 1).cpu()  # (B, N) each


class _StopRecorder(StoppingCriteria):
    """Stops each row at EOS, at a closing tag or at its own token limit, and records the step and
    the reason (None for the limit). Once every row marked in `until` has stopped, the call ends:
    the rows still going are cut there (their reason is None too).

    One host transfer per step for the whole batch: the column of tokens just sampled. The host
    keeps each row's last `tag_window` tokens (`tails`: its segment's tokens before this call, so
    that a tag split across two calls is still seen) and decodes them only when the new token may
    end a tag. After a row stops, `generate` fills it with the pad id; `stopped_at` tells the
    sampler where its real tokens end. `eos_token_id` is set so that `generate` does that filling
    (it pads only when an EOS criterion is present). A row whose limit is 0 samples nothing: the
    token `generate` draws for it at the first step is filler.
    """

    def __init__(self, sampling: Sampling, tails: list[list[int]], start: int,
                 limits: list[int] | None = None, until: list[bool] | None = None):
        self.s, self.start = sampling, start
        self.limits = limits or [float("inf")] * len(tails)
        self.until = [b for b, u in enumerate(until or []) if u]
        self.eos_token_id = sampling.eos_ids
        self.eos, self.tags = set(sampling.eos_ids), set(sampling.tag_ids)
        self.recent = [list(tail[-sampling.tag_window:]) for tail in tails]  # on the host, per row
        self.stopped_at: list[int | None] = [None] * len(tails)
        self.reason: list[str | None] = [None] * len(tails)
        self.done: torch.Tensor | None = None         # (B,) on the device: True once stopped

    def __call__(self, input_ids, scores, **kwargs):
        step = input_ids.shape[1] - self.start                  # tokens generated so far
        last = input_ids[:, -1].tolist()                        # the step's one host transfer
        stopped = self.done is None
        for b, token in enumerate(last):
            if self.stopped_at[b] is not None:
                continue
            if step > self.limits[b]:                          # allowed no token at all
                self.stopped_at[b], stopped = self.limits[b], True
                continue
            recent = self.recent[b]
            recent.append(token)
            del recent[:-self.s.tag_window]
            reason = ("eos" if token in self.eos else "tag" if token in self.tags else
                      "tag" if (self.s.tag_strings and self.s.may_close(token)
                                and self._ends_tag(recent)) else None)
            if reason or step == self.limits[b]:
                self.stopped_at[b], self.reason[b], stopped = step, reason, True
        if stopped:                                             # to the device only when it changes
            self.done = torch.tensor([s is not None for s in self.stopped_at],
                                     device=input_ids.device)
            if self.until and all(self.stopped_at[b] is not None for b in self.until):
                return torch.ones_like(self.done)               # the call ends for every row
        return self.done

    def _ends_tag(self, recent: list[int]) -> bool:
        """A closing tag that the last token completes (it was not in the text before it)."""
        decode = lambda ids: self.s.tokenizer.decode(ids, skip_special_tokens=False)
        text = decode(recent)
        found = [tag for tag in self.s.tag_strings if tag in text]
        return bool(found) and any(tag not in decode(recent[:-1]) for tag in found)


def sample_segments(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new_tokens: int,
                    sampling: Sampling, tails: list[list[int]], limits: list[int] | None = None,
                    until: list[bool] | None = None):
    """Continue every row of (B, W) `ids` by up to max_new_tokens, each until its first stop (or
    its limit, limits[b] tokens; or until the rows marked in `until` have all stopped). `cache`
    holds keys and values of a prefix of the columns (or is None). Returns the full (B, W + N)
    ids, the (B, N) mask of the new columns (0 after a row's stop), the cache, and one Segment
    per row."""
    recorder, stops = _Recorder(), _StopRecorder(sampling, tails, ids.shape[1], limits, until)
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                         max_new_tokens=max_new_tokens, logits_processor=[recorder],
                         stopping_criteria=StoppingCriteriaList([stops]),
                         eos_token_id=sampling.eos_ids, pad_token_id=sampling.pad,
                         return_dict_in_generate=True, **sampling.generate_kwargs)
    seq = out.sequences                                                         # (B, W + N)
    new = seq[:, ids.shape[1]:]                                                 # (B, N)
    logp, entropy = recorder.finish(seq[:, -1])                                 # (B, N) each
    N = new.shape[1]
    ends = [N if at is None else at for at in stops.stopped_at]    # row b's real tokens: new[b, :n]
    new_mask = (torch.arange(N, device=new.device)
                < torch.tensor(ends, device=new.device)[:, None]).long()  # (B, N) 0 after a stop
    segments = [Segment(toks[:n], logp[b, :n].tolist(), entropy[b, :n].tolist(), stops.reason[b])
                for b, (toks, n) in enumerate(zip(new.cpu().tolist(), ends))]
    return seq, new_mask, out.cache, segments


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) ids and mask of token lists, right-aligned, filler pads on the left."""
    N = max(map(len, rows))
    ids = torch.tensor([[pad] * (N - len(r)) + r for r in rows], device=device)          # (B, N)
    mask = torch.tensor([[0] * (N - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, N)
    return ids, mask


# --------------------------------------------------------------------------------------------------
# The reference engine


class ReencodeEngine:
    """Keeps each row as a token list and re-encodes all of them every round. `rows_per_call=1` runs
    one row at a time (the naive baseline); None puts every row in one left-padded batch."""

    def __init__(self, model, sampling: Sampling, rows_per_call: int | None = None):
        self.model, self.sampling, self.rows_per_call = model, sampling, rows_per_call
        self.device = next(model.parameters()).device
        self.seqs: list[list[int]] = []
        self.prefill_tokens = self.generated_tokens = 0   # encoded without sampling / sampled

    def add(self, prompts: list[list[int]]) -> None:
        self.seqs += [list(p) for p in prompts]

    def append(self, b: int, tokens: list[int]) -> None:
        self.seqs[b] += tokens

    def select(self, index: list[int]) -> None:
        self.seqs = [list(self.seqs[i]) for i in index]

    def rewind(self, b: int, n: int) -> None:
        if n:
            del self.seqs[b][-n:]

    def release(self, prompt: list[int]) -> None:
        pass                                                 # nothing is kept between rounds

    def generate(self, max_new_tokens: int, tails: list[list[int]],
                 limits: list[int] | None = None, until: list[bool] | None = None
                 ) -> list[Segment]:
        """Row b samples up to limits[b] tokens (default max_new_tokens); a call ends once its
        rows marked in `until` have stopped (a call without one: once all have). A call whose rows
        may all sample nothing is skipped (rows_per_call=1: a row that waits for a tool)."""
        n = self.rows_per_call or len(self.seqs)
        limits = limits or [max_new_tokens] * len(self.seqs)
        segments = []
        for i in range(0, len(self.seqs), n):
            rows = self.seqs[i:i + n]
            if not any(limits[i:i + n]):
                segments += [Segment([], [], [], None) for _ in rows]
                continue
            ids, mask = left_padded(rows, self.sampling.pad, self.device)      # (b, N)
            segments += sample_segments(self.model, ids, mask, None, max_new_tokens, self.sampling,
                                        tails[i:i + n], limits[i:i + n],
                                        until and until[i:i + n])[3]
            self.prefill_tokens += sum(map(len, rows))
        for seq, seg in zip(self.seqs, segments):
            seq += seg.tokens
        self.generated_tokens += sum(len(s.tokens) for s in segments)
        return segments
