"""The cached engine: the verbs of engine.py (add, generate, append, select, rewind, release) with
one KV cache kept across rounds, so that each token is encoded once, in storage written in place.

    engine = CachedEngine(model, Sampling.make(tokenizer))   # a drop-in for engine.ReencodeEngine

Layout. The batch is B rows x W columns of token ids, a 0/1 mask of the same shape, and a KV cache
for the first c columns:

                 cached: keys and values in `cache`               uncached
      column     0                                           c-1 | c ... W-1
      row 0      .  .  P  P  P  P  S  S  S  S  .  .  R  R  R  R  | S
      row 1      P  P  P  P  P  P  S  S  S  S  S  S  S  .  .  R  | R
      row 2      .  .  .  .  .  .  .  .  .  P  P  P  P  P  P  P  | P
                 P prompt, S sampled, R tool result, . filler (mask 0)

Row b's sequence is ids[b] at its mask-1 columns, in order; filler is never attended to. Position
ids follow the mask's cumulative sum, so each row sees exactly its own sequence wherever its tokens
sit. New tokens join as a right-aligned block, filler before them. Keys are cached with their
positions already applied (rotary embeddings), so cached columns can be copied between rows with the
same history: a branch child copies its parent's row (`select` with a repeated index), and a global
that starts mid-rollout gets its prompt's keys and values, encoded once per prompt (`add`).

What the model encodes besides sampled tokens (`prefill_tokens`): each prompt but its last token
once, then per row its prompt's last token, each tool result once (before a branch copies it), and
one token per continued segment (`generate` samples from the last fed column, so that token is fed
again).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine import Sampling, Segment, left_padded, sample_segments

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each (heads, n, head_dim)
CHUNK = 256       # columns the KV storage grows by


# --------------------------------------------------------------------------------------------------
# The KV storage: written in place, grown in chunks


class ChunkedLayer(DynamicLayer):
    """One layer's keys and values in (B, heads, capacity, head_dim) storage, of which the first `n`
    columns are used. A decoded token's key and value are written in place into the next free
    column. The engine reserves the columns a generate call can add before it starts (`reserve`),
    so no decoding step copies the cache; past that, the storage grows by whole chunks of CHUNK
    columns. (transformers' DynamicLayer concatenates the whole layer at every token: traffic that
    grows with the square of the length.)

    `keys` / `values` are views of the used columns; assigning them (a batch select, a widening)
    replaces the storage, which then grows again from that size.
    """

    def __init__(self):
        self._k = self._v = None
        self.n = 0
        super().__init__()

    keys = property(lambda self: None if self._k is None else self._k[:, :, :self.n])
    values = property(lambda self: None if self._v is None else self._v[:, :, :self.n])

    @keys.setter
    def keys(self, k):
        self._k, self.n = k, 0 if k is None or k.dim() < 3 else k.shape[-2]

    @values.setter
    def values(self, v):
        self._v = v

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.is_initialized = key_states.device, True
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.n, key_states.shape[-2]
        self.reserve(n + m)
        self._k[:, :, n:n + m] = key_states
        self._v[:, :, n:n + m] = value_states
        self.n = n + m
        return self.keys, self.values

    def reserve(self, columns: int) -> None:
        """Storage for `columns` columns (rounded up to whole chunks), so that writing up to there
        copies nothing. The engine reserves a generate call's columns before it starts."""
        if self.is_initialized and columns > self._k.shape[-2]:
            capacity = -(-columns // CHUNK) * CHUNK
            self._k, self._v = (self._grown(t, capacity) for t in (self._k, self._v))

    def _grown(self, old: torch.Tensor, capacity: int) -> torch.Tensor:
        new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))  # (B, heads, cap, dim)
        new[:, :, :self.n] = old[:, :, :self.n]
        return new

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        self.n = max(0, self.n + tokens_to_remove)               # negative: drop the last tokens


def chunked_cache(config) -> DynamicCache:
    """An empty cache for `config`'s model whose layers are ChunkedLayers."""
    cache = DynamicCache(config=config)
    cache.layers = [ChunkedLayer() for _ in cache.layers]
    cache.layer_class_to_replicate = ChunkedLayer if cache.layer_class_to_replicate else None
    return cache


# --------------------------------------------------------------------------------------------------
# The engine


class CachedEngine:
    def __init__(self, model, sampling: Sampling):
        self.model, self.sampling, self.pad = model, sampling, sampling.pad
        self.device = next(model.parameters()).device
        self.ids = torch.empty((0, 0), dtype=torch.long, device=self.device)    # (B, W)
        self.mask = torch.empty((0, 0), dtype=torch.long, device=self.device)   # (B, W)
        self.cache: DynamicCache | None = None       # keys and values of ids[:, :c]
        self.unfed: list[list[int]] = []           # per row: tokens of its sequence not yet in ids
        self.prompt_kv: dict[tuple[int, ...], KV] = {}   # prompt -> keys and values of prompt[:-1]
        self.prefill_tokens = self.generated_tokens = 0

    # -- the verbs ---------------------------------------------------------------------------------
    def add(self, prompts: list[list[int]]) -> None:
        """New rows: prompt[:-1] copied from its kept cache (encoded now if new); the last token is
        left unfed."""
        todo = sorted({tuple(p) for p in prompts if len(p) > 1} - self.prompt_kv.keys())
        if todo:
            self.prompt_kv |= dict(zip(todo, self._encode_alone([list(p[:-1]) for p in todo])))
            self.prefill_tokens += sum(len(p) - 1 for p in todo)
        B = self.ids.shape[0]
        self._add_filler_rows(len(prompts))
        for b, prompt in enumerate(prompts, start=B):
            if len(prompt) > 1:
                self._copy_prefix(b, prompt[:-1], self.prompt_kv[tuple(prompt)])
            self.unfed.append(list(prompt[-1:]))

    def append(self, b: int, tokens: list[int]) -> None:
        self.unfed[b] += tokens

    def select(self, index: list[int]) -> None:
        """Keep rows `index`. Rows that leave go first, their unfed tokens (a tool result that
        arrived as the row finished) never encoded; then the kept rows' unfed tokens but the last
        are encoded, so that the copies of a row share its encoded tool result instead of each
        encoding it again."""
        if not index:                                        # no rows left (prompt_kv stays)
            self.ids, self.mask = self.ids[:0, :0], self.mask[:0, :0]
            self.cache, self.unfed = None, []
            return
        kept = sorted(set(index))
        if len(kept) < len(self.unfed):
            self._keep(kept)
            index = [kept.index(i) for i in index]
        self._encode_unfed_heads()
        self._keep(index)

    def _keep(self, index: list[int]) -> None:
        idx = torch.tensor(index, device=self.device)
        self.cache.batch_select_indices(idx)
        self.ids, self.mask = self.ids[idx], self.mask[idx]                       # (B', W)
        self.unfed = [list(self.unfed[i]) for i in index]
        used = self.mask[:, :-1].any(0).nonzero()        # drop leading columns no row attends to
        self._drop_leading(int(used[0]) if len(used) else self.ids.shape[1] - 1)

    def rewind(self, b: int, n: int) -> None:
        """Forget row b's last n tokens: unfed ones are dropped, encoded ones masked out where they
        sit (they become filler; the positions of later tokens follow the mask's cumsum)."""
        unfed = min(n, len(self.unfed[b]))
        del self.unfed[b][len(self.unfed[b]) - unfed:]
        if n > unfed:
            cols = self.mask[b].nonzero()[-(n - unfed):, 0]                      # (n - unfed,)
            self.mask[b, cols] = 0

    def release(self, prompt: list[int]) -> None:
        self.prompt_kv.pop(tuple(prompt), None)

    def generate(self, max_new_tokens: int, tails: list[list[int]],
                 limits: list[int] | None = None, until: list[bool] | None = None
                 ) -> list[Segment]:
        """Feed every row's unfed tokens and sample up to max_new_tokens for each row, row b at
        most limits[b], until the rows marked in `until` have stopped (engine.py). A row whose
        limit is 0 (it waits for a tool) is fed nothing: its query is filler and what is drawn for
        it is dropped."""
        for b, unfed in enumerate(self.unfed):
            if not unfed and (limits is None or limits[b]):   # continuing a segment: re-feed its
                unfed.append(self._pop_last(b))               # last token
        self.prefill_tokens += sum(map(len, self.unfed))
        self._append_columns(self.unfed)
        self.unfed = [[] for _ in self.unfed]
        if self.cache is None:
            self.cache = chunked_cache(self.model.config)
        for layer in self.cache.layers:           # room for every column this call can add
            layer.reserve(self.ids.shape[1] + max_new_tokens)
        seq, new_mask, self.cache, segments = sample_segments(
            self.model, self.ids, self.mask, self.cache, max_new_tokens, self.sampling, tails,
            limits, until)
        self.ids, self.mask = seq, torch.cat([self.mask, new_mask], 1)           # (B, W + N)
        self.generated_tokens += sum(len(s.tokens) for s in segments)
        return segments

    # -- the layout --------------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        return (self.mask.cumsum(-1) - 1).clamp(min=0)                         # (B, W)

    def _append_columns(self, rows: list[list[int]]) -> None:
        ids, mask = left_padded(rows, self.pad, self.device)                    # (B, N)
        self.ids, self.mask = torch.cat([self.ids, ids], 1), torch.cat([self.mask, mask], 1)

    def _encode_unfed_heads(self) -> None:
        """Run every row's unfed[:-1] through the model into the cache (and any uncached column)."""
        heads = [p[:-1] for p in self.unfed]                            # all but the last token
        if not any(heads):
            return
        self.unfed = [p[-1:] for p in self.unfed]
        self.prefill_tokens += sum(map(len, heads))
        c = self.cache.get_seq_length()
        self._append_columns(heads)
        self.model(input_ids=self.ids[:, c:], attention_mask=self.mask,
                   position_ids=self.positions()[:, c:], cache=self.cache, use_cache=True,
                   logits_to_keep=1)

    def _encode_alone(self, seqs: list[list[int]]) -> list[KV]:
        """Each sequence's keys and values, from one left-padded forward pass outside the batch."""
        ids, mask = left_padded(seqs, self.pad, self.device)                   # (U, N)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache, use_cache=True,
                   logits_to_keep=1)
        N = ids.shape[1]
        return [[(layer.keys[u, :, N - len(s):], layer.values[u, :, N - len(s):])
                 for layer in cache.layers] for u, s in enumerate(seqs)]

    def _copy_prefix(self, b: int, tokens: list[int], prefix_kv: KV) -> None:
        """Make `tokens`, whose keys and values are `prefix_kv`, the history of row b (an all-filler
        row): they go in the last cached columns, after widening the batch on the left if needed."""
        if self.cache is None:
            self._start_cache(prefix_kv)
        n, c = len(tokens), self.cache.get_seq_length()
        if n > c:
            self._widen(n - c)
            c = n
        for layer, (k, v) in zip(self.cache.layers, prefix_kv):
            layer.keys[b, :, c - n:c], layer.values[b, :, c - n:c] = k, v
        self.ids[b, c - n:c] = torch.tensor(tokens, device=self.device)
        self.mask[b, c - n:c] = 1

    def _start_cache(self, like: KV) -> None:
        """An empty cache (no columns yet) for the current rows, shaped like `like`."""
        self.cache, B = chunked_cache(self.model.config), self.ids.shape[0]
        for i, (k, v) in enumerate(like):
            self.cache.update(k.new_zeros((B, k.shape[0], 0, k.shape[2])),
                              v.new_zeros((B, v.shape[0], 0, v.shape[2])), i)

    def _add_filler_rows(self, n: int) -> None:
        B, W = self.ids.shape
        self.ids = torch.cat([self.ids, self.ids.new_full((n, W), self.pad)])
        self.mask = torch.cat([self.mask, self.mask.new_zeros((n, W))])
        for layer in self.cache.layers if self.cache is not None else []:
            k, v = layer.keys, layer.values                          # (B, heads, c, head_dim)
            layer.keys = torch.cat([k, k.new_zeros((n, *k.shape[1:]))])
            layer.values = torch.cat([v, v.new_zeros((n, *v.shape[1:]))])

    def _widen(self, n: int) -> None:
        """n filler columns on the left, cached as zeros (never attended)."""
        for layer in self.cache.layers:
            k, v = layer.keys, layer.values                          # (B, heads, c, head_dim)
            layer.keys = torch.cat([k.new_zeros((*k.shape[:2], n, k.shape[3])), k], 2)
            layer.values = torch.cat([v.new_zeros((*v.shape[:2], n, v.shape[3])), v], 2)
        B = self.ids.shape[0]
        self.ids = torch.cat([self.ids.new_full((B, n), self.pad), self.ids], 1)
        self.mask = torch.cat([self.mask.new_zeros((B, n)), self.mask], 1)

    def _drop_leading(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
        self.ids, self.mask = self.ids[:, n:], self.mask[:, n:]

    def _pop_last(self, b: int) -> int:
        """Row b's last token, masked out where it sits so that it can be fed again as a new column
        (generate samples from the last column); its position (the mask's cumsum) is unchanged."""
        j = int(self.mask[b].nonzero()[-1])
        self.mask[b, j] = 0
        return int(self.ids[b, j])
