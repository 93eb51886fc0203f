"""Batched generation with one KV cache kept across `generate` calls: the memory under the tree sampler.

    import kvcache as kv
    batch = kv.append(None, [prompt_a, prompt_b], pad, device)          # two rows, no history yet
    batch, new = kv.generate_segment(model, batch, 64, stop_ids, do_sample=True, pad_token_id=pad)
    batch = kv.append(batch, [result_a, [kv.pop_last(batch, 1)]], pad, device)   # feed, continue

Layout (B rows, W columns). Row b's sequence is ids[b] at its mask-1 columns, in order. Every other
column is filler (mask 0), which that row never attends to. New tokens join as a block, right-aligned
with filler before them. Position ids follow the mask's cumulative sum, so each row sees exactly its own
sequence wherever its tokens sit. The cache holds keys and values for the first c = cache.get_seq_length()
columns; after `generate`, the last column (each row's last sampled token) is not cached yet, and the
next call feeds it.

Copying. Keys are cached with their positions already applied (rotary embeddings), so cached tokens may
be copied into any columns of a row whose earlier history is the same: branch children copy their
parent's row (`take` with a repeated index), and a global trajectory that starts mid-rollout gets its
question's prompt (`place`), encoded once by `encode_prefixes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor

from loss import entropy_of_logp

KV = list[tuple[torch.Tensor, torch.Tensor]]     # per layer: (keys, values), each (heads, n, head_dim)


@dataclass
class Batch:
    ids: torch.Tensor                 # (B, W) token ids; filler columns hold pad
    mask: torch.Tensor                # (B, W) 1 at the row's own tokens, 0 at filler
    cache: DynamicCache | None        # keys and values of ids[:, :c]

    def positions(self) -> torch.Tensor:
        return (self.mask.cumsum(-1) - 1).clamp(min=0)                          # (B, W)


def right_aligned(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) ids and mask of token lists, right-aligned, filler pads on the left."""
    N = max(map(len, rows))
    ids = torch.tensor([[pad] * (N - len(r)) + r for r in rows], device=device)          # (B, N)
    mask = torch.tensor([[0] * (N - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, N)
    return ids, mask


def append(batch: Batch | None, rows: list[list[int]], pad: int, device) -> Batch:
    """Each row's tokens appended as one right-aligned block (not encoded yet: `generate` or `encode`)."""
    ids, mask = right_aligned(rows, pad, device)
    if batch is None:
        return Batch(ids, mask, None)
    return Batch(torch.cat([batch.ids, ids], 1), torch.cat([batch.mask, mask], 1), batch.cache)


def pop_last(batch: Batch, b: int) -> int:
    """Row b's last token, masked out where it sits so that it can be fed again as a new column: a row
    that continues its segment must have a real token in the block's last column (generate samples
    from the last position). Its position, the mask's cumulative sum, stays the same."""
    j = int(batch.mask[b].nonzero()[-1])
    batch.mask[b, j] = 0
    return int(batch.ids[b, j])


def add_rows(batch: Batch, n: int, pad: int) -> Batch:
    """n rows with an all-filler history (mask 0, zero cache), for rows that join mid-rollout."""
    if n == 0:
        return batch
    for layer in batch.cache.layers:
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((n, *layer.keys.shape[1:]))])
        layer.values = torch.cat([layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))])
    return Batch(torch.cat([batch.ids, batch.ids.new_full((n, batch.ids.shape[1]), pad)]),
                 torch.cat([batch.mask, batch.mask.new_zeros((n, batch.mask.shape[1]))]), batch.cache)


def widen(batch: Batch, n: int, pad: int) -> Batch:
    """n filler columns on the left (mask 0, zero cache), making room to `place` a long prompt."""
    if n <= 0:
        return batch
    for layer in batch.cache.layers:
        k, v = layer.keys, layer.values                                         # (B, heads, c, head_dim)
        layer.keys = torch.cat([k.new_zeros((*k.shape[:2], n, k.shape[3])), k], 2)
        layer.values = torch.cat([v.new_zeros((*v.shape[:2], n, v.shape[3])), v], 2)
    B = batch.ids.shape[0]
    return Batch(torch.cat([batch.ids.new_full((B, n), pad), batch.ids], 1),
                 torch.cat([batch.mask.new_zeros((B, n)), batch.mask], 1), batch.cache)


def take(batch: Batch, index: list[int]) -> Batch:
    """Rows `index` of the batch (a repeated index copies the row, cache included), then without the
    leading columns that no remaining row attends to (rows that left owned them)."""
    idx = torch.tensor(index, device=batch.ids.device)
    batch.cache.batch_select_indices(idx)
    ids, mask = batch.ids[idx], batch.mask[idx]                                 # (B', W)
    used = mask[:, :-1].any(0).nonzero()
    c = int(used[0]) if len(used) else ids.shape[1] - 1
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, c:], layer.values[:, :, c:]
    return Batch(ids[:, c:], mask[:, c:], batch.cache)


def encode(model, batch: Batch, rows: list[list[int]], pad: int) -> Batch:
    """Append each row's tokens and run them through the model into the cache, together with any
    column left uncached; afterwards every column is cached. Logits are not kept."""
    c = batch.cache.get_seq_length()
    batch = append(batch, rows, pad, batch.ids.device)
    model(input_ids=batch.ids[:, c:], attention_mask=batch.mask, position_ids=batch.positions()[:, c:],
          cache=batch.cache, use_cache=True, logits_to_keep=1)
    return batch


def encode_prefixes(model, seqs: list[list[int]], pad: int, device) -> list[KV]:
    """Each sequence's keys and values, from one left-padded forward pass, to be `place`d later."""
    batch = Batch(*right_aligned(seqs, pad, device), DynamicCache(config=model.config))   # (U, N)
    model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions(),
          cache=batch.cache, use_cache=True, logits_to_keep=1)
    N = batch.ids.shape[1]
    return [[(layer.keys[u, :, N - len(s):], layer.values[u, :, N - len(s):]) for layer in batch.cache.layers]
            for u, s in enumerate(seqs)]


def blank(model, n_rows: int, width: int, like: KV, pad: int, device) -> Batch:
    """A batch of n_rows all-filler rows of the given width, with a zero cache shaped like `like`."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(like):
        cache.update(k.new_zeros((n_rows, k.shape[0], width, k.shape[2])),
                     v.new_zeros((n_rows, v.shape[0], width, v.shape[2])), i)
    return Batch(torch.full((n_rows, width), pad, dtype=torch.long, device=device),
                 torch.zeros((n_rows, width), dtype=torch.long, device=device), cache)


def place(batch: Batch, b: int, tokens: list[int], kept: KV, pad: int) -> Batch:
    """Make `tokens`, whose keys and values are `kept`, the history of row b (an all-filler row): they go
    in the last cached columns, after widening the batch on the left if it is too short."""
    n = len(tokens)
    batch = widen(batch, n - batch.cache.get_seq_length(), pad)
    c = batch.cache.get_seq_length()
    for layer, (k, v) in zip(batch.cache.layers, kept):
        layer.keys[b, :, c - n:c], layer.values[b, :, c - n:c] = k, v
    batch.ids[b, c - n:c] = torch.tensor(tokens, device=batch.ids.device)
    batch.mask[b, c - n:c] = 1
    return batch


# ----------------------------------------------------------------------------------------------------
# One generate call over the whole batch


class _Recorder(LogitsProcessor):
    """Records the exact entropy and the sampled token's log-prob from the raw logits of each step.

    The processor sees logits before temperature / top-p, i.e. the temperature-1 policy. The token
    sampled at step t is only known at step t + 1 (it is then the last input id), so the log-softmax of
    one step is kept until the next: O(B x V) memory instead of all logits.
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


def generate_segment(model, batch: Batch, max_new_tokens: int, stop_ids: set[int], **generate_kwargs):
    """Continue every row by up to max_new_tokens, each until its first stop token. Returns the batch with
    the new columns (after a row's stop: filler) and, per row, (tokens, log-probs, entropies), the stop
    token included. generate_kwargs go to `model.generate` (sampling settings, eos and pad ids, ...)."""
    recorder = _Recorder()
    out = model.generate(input_ids=batch.ids, attention_mask=batch.mask, cache=batch.cache,
                         max_new_tokens=max_new_tokens, logits_processor=[recorder],
                         return_dict_in_generate=True, **generate_kwargs)
    seq = out.sequences                                                         # (B, W + N)
    new = seq[:, batch.ids.shape[1]:]                                           # (B, N)
    logp, entropy = recorder.finish(seq[:, -1])                                 # (B, N) each
    new_mask = torch.ones_like(new)                                             # (B, N)
    segments = []
    for b, toks in enumerate(new.cpu().tolist()):
        n = next((i + 1 for i, t in enumerate(toks) if t in stop_ids), len(toks))
        new_mask[b, n:] = 0
        segments.append((toks[:n], logp[b, :n].tolist(), entropy[b, :n].tolist()))
    return Batch(seq, torch.cat([batch.mask, new_mask], 1), out.cache), segments
