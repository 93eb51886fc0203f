"""Peak GPU memory of a training recipe, estimated from the model's shape and the config:
will a run fit?

    python -m support.memory               # Qwen3-1.7B, qwen3-1.7b recipe: 24, 16, 12 GB GPUs
    python -m support.memory --model Qwen3-4B --rollout_questions 1 --gpu_gb 24
    python -m support.memory --max_response_tokens 8192 --grad_accum 8   # any Config flag works

In: a Shape (layers, widths, vocabulary; known for the Qwen3 aliases, else read from a folder's
config.json) and a Config. Out: bytes per component and the peak of each phase of an RL step:
  rollout    weights + LoRA + AdamW state + the KV cache of the rows rolled out together
             (rollout_questions x k rows x (prompt + response) tokens x `filler`, the share of the
             batched layout's columns that are filler) + one no-grad forward over the largest block
             fed at once (a prompt, or a tool result of top_k x snippet_chars / 4 tokens, per row)
  recompute  (--recompute_old_logp) one no-grad forward of an update micro-batch + one logits chunk
  update     weights + LoRA + its gradients + AdamW state + the activations autograd keeps (every
             layer's, or with gradient checkpointing each layer's input) + the larger of one logits
             chunk of token_logprobs (B x 128 positions x V; never B x T x V) and, with
             checkpointing, one recomputed layer
Activation bytes per token and layer are counted tensor by tensor (layer_bytes below, Qwen3/Llama
layers, LoRA on all linear layers, SDPA attention that stores no T x T matrix) and checked against
measured peaks on CPU by benchmarks/memory.py. `cuda_overhead_gb` is an allowance for the CUDA
context and allocator fragmentation: it is not measured (no GPU has been lent to this project).

Two figures per phase: the typical peak ("peak_*", what the CPU measurements check) and an upper
bound ("bound_*", what the "fits" column and the README's claims use). The bound adds the worst
case of the engine's filler columns, the columns reserved for a generate call, the prefill's
repeated K/V and attention mask over the cache's width, the allocator's reserved-over-allocated
overhead and the CUDA context (`_bound`). `rollout_questions_for(cfg, free_bytes)` picks how many
questions to roll out together so that the bound fits the free GPU memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
F32 = 4          # bytes: LoRA weights, their gradients and AdamW moments, float32 log-prob work
CHUNK = 128      # positions per logits chunk in loss.token_logprobs
# The upper bound's allowances (see `estimate`):
FILLER_BOUND = 1.6    # KV columns per row over its tokens in the worst case of the engine's layout
KV_CHUNK = 256        # kvcache.CHUNK: the storage is reserved in whole chunks
ALLOCATOR = 0.3       # PyTorch's reserved-over-allocated overhead (fragmentation), at most
CUDA_CONTEXT_GB = 0.5  # the CUDA context and kernels, outside PyTorch's allocator


@dataclass(frozen=True)
class Shape:
    """The sizes that set memory. q = heads x head_dim, kv = kv_heads x head_dim."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


# Published config.json values (hub: Qwen/<name>).
SHAPES = {
    "qwen3-0.6b": Shape(28, 1024, 3072, 16, 8, 128, 151936),
    "qwen3-1.7b": Shape(28, 2048, 6144, 16, 8, 128, 151936),
    "qwen3-4b": Shape(36, 2560, 9728, 32, 8, 128, 151936),
    "qwen3-8b": Shape(36, 4096, 12288, 32, 8, 128, 151936, tied=False),
}


def model_shape(model: str) -> Shape:
    """Shape of an alias / hub id (SHAPES) or of a local folder with a config.json."""
    name = model.split("/")[-1].lower()
    if name in SHAPES:
        return SHAPES[name]
    path = Path(model) / "config.json"
    if not path.exists():
        raise SystemExit(f"memory.py: no shape for --model {model!r}: not one of {sorted(SHAPES)} "
                         f"and no {path}. Give a model folder, or add its config.json values to "
                         "SHAPES in memory.py.")
    c = json.loads(path.read_text())
    return Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
                 c["num_attention_heads"], c["num_key_value_heads"],
                 c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                 c["vocab_size"], c.get("tie_word_embeddings", True))


# --------------------------------------------------------------------------------------------------
# Parameters and per-token bytes (pure functions of the shape)


def param_counts(s: Shape, lora_r: int) -> tuple[int, int, int]:
    """(linear, embedding, LoRA) parameter counts. LoRA on q, k, v, o, gate, up, down: r x
    (in + out)."""
    h, q, kv, i = s.hidden, s.q, s.kv, s.intermediate
    linear = s.layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
    embedding = s.vocab * h * (1 if s.tied else 2)
    lora = s.layers * lora_r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    return linear, embedding, lora


def layer_bytes(s: Shape, d: int, lora_r: int) -> int:
    """Bytes per token one decoder layer keeps for backward (LoRA on every linear layer, frozen
    base, model dtype of d bytes, float32 adapters). Counted from what autograd saves:
      RMSNorm (x2, and q_norm, k_norm)   its float32 input, 1 / rms              4 (2h + q + kv)
                                                                                 + 4 (2 + 2)
      LoRA A inputs                      bf16 model: a float32 copy per adapter  4 (5h + q + i)
                                         fp32 model: the shared inputs          4 (2h + q + i)
      LoRA B inputs                      r wide, 7 adapters                      4 x 7 r
      attention (SDPA)                   q, k, v, log-sum-exp (+ output in bf16) d (q + 2kv)
                                                                                 + 4 heads (+ d q)
      SwiGLU                             gate, up, silu(gate)                    3 d i
    Frozen base weights save no input (their gradient needs only the weight)."""
    h, q, kv, i = s.hidden, s.q, s.kv, s.intermediate
    cast = d < F32                              # peft casts each adapter's input to float32
    norms = F32 * (2 * h + q + kv) + F32 * 4
    lora_in = F32 * ((5 * h + q + i) if cast else (2 * h + q + i)) + F32 * 7 * lora_r
    attention = d * (q + 2 * kv) + F32 * s.heads + (d * q if cast else 0)
    return norms + lora_in + attention + 3 * d * i


def forward_bytes(s: Shape, d: int) -> int:
    """Bytes per token alive at the peak of one no-grad layer forward, inside the MLP's up
    projection: the residual, the hidden states and their normed copy (+ the float32 copy an adapter
    makes of it), silu(gate), the base output, and the adapter's float32 output and sum
    (peft adds in float32)."""
    cast = d < F32
    return (d * (3 * s.hidden + 2 * s.intermediate) + 2 * F32 * s.intermediate
            + (F32 * s.hidden if cast else 0))


def logits_chunk_bytes(s: Shape, rows: int, d: int, backward: bool) -> int:
    """token_logprobs' largest transient: rows x CHUNK positions of logits in float32
    (+ the model-dtype head output when d < 4) and float32 temporaries. No grad: the log-sum-exp's.
    Training: the larger of the forward with the entropy (log-softmax, exp, product, result, a bool
    mask) and the chunk's backward (recomputed logits, softmax, the gather's scattered gradient,
    their sum, the head's input gradient): 5 float32 copies."""
    per = (d if d < F32 else 0) + (5 * F32 + 1 if backward else 2 * F32)
    return rows * CHUNK * s.vocab * per


# --------------------------------------------------------------------------------------------------
# The estimate of one recipe


def estimate(s: Shape, cfg, *, dtype_bytes: int = 2, filler: float = 1.0,
             cuda_overhead_gb: float = 1.0) -> dict[str, float]:
    """Bytes per component and per phase ("peak_*") for Config `cfg` on Shape `s`; "peak" is their
    max."""
    d = dtype_bytes
    linear, embedding, lora = param_counts(s, cfg.lora_r)
    # NF4, double-quantised absmax
    bits = 4 + 8 / 64 + 32 / (64 * 256) if cfg.load_in_4bit else 8 * d
    tokens = cfg.max_prompt_tokens + cfg.max_response_tokens             # per row at the budget
    rows_out = (cfg.rollout_questions or cfg.questions_per_step) * cfg.k
    rows_in = math.ceil(cfg.questions_per_step * cfg.k / (cfg.mini_batches * cfg.grad_accum))
    # tokens fed at once per row
    fed = max(cfg.max_prompt_tokens, cfg.top_k * cfg.snippet_chars // 4)
    saved = s.layers * (s.hidden * d if cfg.gradient_checkpointing
                        else layer_bytes(s, d, cfg.lora_r))  # per token
    # embeddings out, final hidden states, final norm input
    saved += 2 * s.hidden * d + F32 * s.hidden
    e = {
        "weights": linear * bits / 8 + embedding * d,
        "lora": lora * F32,
        "lora_grad": lora * F32,
        "adamw": 2 * lora * F32,
        "kv_cache": rows_out * tokens * filler * s.layers * 2 * s.kv * d,
        # + one layer's K and V copied when the cache grows (torch.cat), + last-position logits
        "rollout_forward": rows_out * fed * forward_bytes(s, d)
        + rows_out * tokens * filler * 2 * s.kv * d
        + rows_out * s.vocab * 3 * F32,
        "recompute_forward": rows_in * tokens * s.hidden * d
        + max(rows_in * tokens * forward_bytes(s, d),
              logits_chunk_bytes(s, rows_in, d, backward=False)),
        # + the bool attention mask
        "activations": rows_in * tokens * saved + rows_in * tokens * tokens,
        # backward meets the logits chunks first, then (checkpointing) one recomputed layer
        # at a time
        "backward_transient": max(logits_chunk_bytes(s, rows_in, d, backward=True),
                                  rows_in * tokens * layer_bytes(s, d, cfg.lora_r)
                                  if cfg.gradient_checkpointing else 0),
        "cuda_overhead": cuda_overhead_gb * GB,
    }
    state = e["weights"] + e["lora"] + e["adamw"] + e["cuda_overhead"]
    e["peak_rollout"] = state + e["kv_cache"] + e["rollout_forward"]
    e["peak_recompute"] = state + e["recompute_forward"] if cfg.recompute_old_logp else 0.0
    e["peak_update"] = state + e["lora_grad"] + e["activations"] + e["backward_transient"]
    e["peak"] = max(e["peak_rollout"], e["peak_recompute"], e["peak_update"])
    e |= _bound(s, cfg, e, d, rows_out, tokens, fed)
    return e


def _bound(s: Shape, cfg, e: dict, d: int, rows: int, tokens: int, fed: int) -> dict[str, float]:
    """The upper bound of each phase ("bound_*"). Beyond the typical estimate it counts:
      filler     the KV columns of rows that wait on others (FILLER_BOUND x the row's tokens, the
                 worst case of a simulation of the engine's column bookkeeping), + the columns the
                 engine reserves for one generate call (segment_tokens) and the chunk rounding
      prefill    one layer's K and V repeated to every query head over the whole cache width, and
                 the attention mask of the block fed at once over that width (bool + additive copy)
      allocator  PyTorch's reserved-over-allocated overhead, ALLOCATOR of everything allocated
      context    the CUDA context, CUDA_CONTEXT_GB (in place of the typical estimate's allowance)"""
    width = math.ceil(tokens * FILLER_BOUND) + cfg.segment_tokens + KV_CHUNK   # columns per row
    kv = rows * width * s.layers * 2 * s.kv * d
    prefill = rows * (2 * s.heads * width * s.head_dim * d + fed * width * (1 + d))
    forward = (rows * fed * forward_bytes(s, d) + rows * width * 2 * s.kv * d
               + rows * s.vocab * 3 * F32 + prefill)
    state = e["weights"] + e["lora"] + e["adamw"]
    scale = lambda allocated: allocated * (1 + ALLOCATOR) + CUDA_CONTEXT_GB * GB
    b = {"kv_cache_bound": kv, "prefill_transient_bound": prefill,
         "bound_rollout": scale(state + kv + forward),
         "bound_recompute": (scale(state + e["recompute_forward"]) if cfg.recompute_old_logp
                             else 0.0),
         "bound_update": scale(state + e["lora_grad"] + e["activations"]
                               + e["backward_transient"])}
    for phase in ("rollout", "recompute", "update"):      # never under the typical figure
        b[f"bound_{phase}"] = max(b[f"bound_{phase}"], e[f"peak_{phase}"])
    b["bound"] = max(b["bound_rollout"], b["bound_recompute"], b["bound_update"])
    return b


def table(s: Shape, cfg, gpus: list[float], **kw) -> str:
    """A markdown table of the estimate in GB: typical and upper bound per phase, and whether the
    bound fits each GPU."""
    e = estimate(s, cfg, **kw)
    rows = [f"| {k} | {v / GB:.2f} |" for k, v in e.items() if v and not k.startswith("bound")]
    rows += [f"| **{k} (upper bound)** | {v / GB:.2f} |" for k, v in e.items()
             if v and k.startswith("bound")]
    fits = [f"| fits {g:g} GB | {'yes' if e['bound'] <= g * GB else 'NO'} "
            f"(bound {e['bound'] / GB:.1f}, typical {e['peak'] / GB:.1f}) |" for g in gpus]
    head = (f"{cfg.model}: {cfg.rollout_questions or cfg.questions_per_step} questions x k={cfg.k} "
            f"rolled out together, {cfg.max_prompt_tokens} + {cfg.max_response_tokens} tokens, "
            "update micro-batch of "
            f"{math.ceil(cfg.questions_per_step * cfg.k / (cfg.mini_batches * cfg.grad_accum))} "
            f"rows, {'4-bit' if cfg.load_in_4bit else 'bf16'} weights, LoRA r={cfg.lora_r}, "
            f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    return "\n".join([head, "", "| component | GB |", "|---|---|", *rows, *fits])


# --------------------------------------------------------------------------------------------------
# Choosing how many questions to roll out together


def rollout_questions_for(cfg, free_bytes: float, shape: Shape | None = None) -> int:
    """The most questions (1 to questions_per_step) whose rollout, with the rest of the step, fits
    `free_bytes` of GPU memory by the upper bound (`estimate(...)["bound"]`). `free_bytes`: the
    device's free memory before the model is loaded (torch.cuda.mem_get_info()[0]). 1 when even
    one question does not fit (then the bound says by how much: rollout_questions_line)."""
    shape = shape or model_shape(cfg.model)
    bound = lambda n: estimate(shape, dataclasses.replace(cfg, rollout_questions=n))["bound"]
    fits = [n for n in range(1, cfg.questions_per_step + 1) if bound(n) <= free_bytes]
    return max(fits, default=1)


def rollout_questions_line(cfg, free_bytes: float, shape: Shape | None = None) -> str:
    """One line for the start of a run: the choice of rollout_questions and why."""
    shape = shape or model_shape(cfg.model)
    n = rollout_questions_for(cfg, free_bytes, shape)
    bound = estimate(shape, dataclasses.replace(cfg, rollout_questions=n))["bound"]
    return (f"rollout_questions: {n} of {cfg.questions_per_step} questions rolled out together "
            f"(memory.py upper bound {bound / GB:.1f} GB; {free_bytes / GB:.1f} GB free"
            + (", does NOT fit even one question: lower --max_response_tokens or --k)"
               if bound > free_bytes else ")"))


def main(argv: list[str] | None = None) -> None:
    from aepo import Config
    from support.cli import FlagParser, explicit_flags, resolve

    argv = sys.argv[1:] if argv is None else argv
    gpus = [24.0, 16.0, 12.0]
    if "--gpu_gb" in argv:
        at = argv.index("--gpu_gb")
        gpus = [float(argv.pop(at + 1)) for _ in range(len(argv) - at - 1)
                if not argv[at + 1].startswith("--")]
        argv.pop(at)
    if not any(a.startswith("--model") for a in argv):
        argv = ["--model", "Qwen3-1.7B", *argv]
    (cfg,) = FlagParser(Config).parse_args_into_dataclasses(args=argv)
    explicit = explicit_flags(argv)
    cfg = resolve(dataclasses.replace(cfg, output_dir="unused"), explicit, device_check=False)
    shape = model_shape(cfg.model)
    if cfg.rollout_questions == 0:           # a run on a GPU picks it from the free memory
        for g in gpus:
            print(f"on {g:g} GB: {rollout_questions_line(cfg, g * GB, shape)}")
        cfg = dataclasses.replace(cfg, rollout_questions=rollout_questions_for(
            cfg, min(gpus) * GB, shape))
    print(table(shape, cfg, gpus))


if __name__ == "__main__":
    main()
