"""kvcache.py's layout invariant: however a row's tokens got into the batch (encoded in place, copied
from a kept prefix into a wider or narrower history, copied to a repeated row), the next-token logits
equal those of encoding the row alone from scratch."""
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import kvcache as kv

PAD = 0


def model_():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        pad_token_id=PAD)).eval()


def alone(model, seq):
    """Next-token logits of one sequence, no padding, no cache."""
    return model(input_ids=torch.tensor([seq])).logits[0, -1]                     # (V,)


def last_logits(model, batch):
    """Feed the batch's uncached columns; next-token logits of every row."""
    c = batch.cache.get_seq_length()
    return model(input_ids=batch.ids[:, c:], attention_mask=batch.mask, position_ids=batch.positions()[:, c:],
                 cache=batch.cache, use_cache=True).logits[:, -1]                 # (B, V)


@torch.no_grad()
def test_placed_prefixes_and_copied_rows_see_exactly_their_own_sequence():
    model = model_()
    a, b, c = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    kept = kv.encode_prefixes(model, [a[:-1], b[:-1]], PAD, "cpu")
    batch = kv.blank(model, 2, 3, kept[0], PAD, "cpu")                            # too narrow for a
    batch = kv.place(batch, 0, a[:-1], kept[0], PAD)                               # widens on the left
    batch = kv.place(batch, 1, b[:-1], kept[1], PAD)
    assert batch.ids.shape == (2, 6) and batch.mask.sum(1).tolist() == [6, 2]
    batch = kv.append(batch, [a[-1:], b[-1:]], PAD, "cpu")
    batch = kv.encode(model, batch, [[30, 31], [32]], PAD)                       # e.g. tool results
    batch = kv.add_rows(batch, 1, PAD)                                             # a row joins later
    batch = kv.place(batch, 2, c[:-1], kv.encode_prefixes(model, [c[:-1]], PAD, "cpu")[0], PAD)
    batch = kv.take(batch, [0, 1, 1, 2])                                           # row 1 branches
    batch = kv.append(batch, [[33], [34], [35], c[-1:]], PAD, "cpu")
    got = last_logits(model, batch)
    for row, seq in enumerate([a + [30, 31, 33], b + [32, 34], b + [32, 35], c]):
        torch.testing.assert_close(got[row], alone(model, seq), atol=1e-5, rtol=0)


@torch.no_grad()
def test_pop_last_refeeds_a_token_at_the_same_position():
    model = model_()
    seq = [5, 6, 7, 8]
    batch = kv.encode(model, kv.blank(model, 1, 0, kv.encode_prefixes(model, [[1]], PAD, "cpu")[0], PAD, "cpu"),
                      [seq], PAD)                                                  # all four cached
    batch = kv.append(batch, [[kv.pop_last(batch, 0)]], PAD, "cpu")              # 8 again, new column
    torch.testing.assert_close(last_logits(model, batch)[0], alone(model, seq), atol=1e-5, rtol=0)
