"""Are the rollout's log-probs exact old log-probs under bf16?
The gap between the log-probs the sampler records (from generate's logits, KV cache, one token at a
time) and a recomputed forward (train.py's --recompute_old_logp: the whole sequence at once,
micro-batched), on CPU.

    python benchmarks/logp_gap.py  # tiny (Qwen3) and smollm2-135m, bf16 and fp32
    python benchmarks/logp_gap.py --models tiny --dtypes bfloat16

For each model and dtype: 4 world questions x k = 4 (grpo, temperature 1, 128 response tokens), the
policy with fresh LoRA adapters cast to the dtype; the same sampled tokens are scored both ways.
Reported on sampled tokens: max and mean |log pi_rollout - log pi_recomputed|, the mean |r - 1| of
the first update's ratio r = exp(difference) (0 if exact), and the share of tokens with r outside
[1 - 0.2, 1 + 0.2], which PPO clipping would treat as off-policy before any update.
Writes benchmarks/results/logp_gap.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def gap(model_name: str, dtype: str, seed: int = 0) -> dict:
    from support import world
    import train
    from aepo import Config
    from support.cli import resolve
    from support.policy import load_policy, make_tools, system_prompt_for
    from rollout import rollout

    cfg = resolve(Config(model=model_name, algo="grpo", output_dir="unused", preset="tiny"),
                  {"preset"})
    cfg = dataclasses.replace(cfg, k=4, questions_per_step=4, max_response_tokens=128,
                              segment_tokens=64,
                              system_prompt="short" if model_name == "tiny" else "paper")
    torch.manual_seed(seed)
    model, tok = load_policy(model_name, lora_r=16)
    model.to(getattr(torch, dtype)).eval()
    questions = [e.question for e in world.load_examples("world:train")[:cfg.questions_per_step]]
    res = rollout(model, tok, questions, make_tools(cfg), cfg, seed=seed,
                  system_prompt=system_prompt_for(cfg))
    t = train.trajectory_tensors(res.trajectories, tok.pad_token_id, torch.device("cpu"))
    recomputed = train.recompute_old_logp(model, t, n=4)  # (B, T)
    sampled = t["loss_mask"] > 0                          # (B, T)
    diff = (t["old_logp"] - recomputed)[sampled]          # (N,)
    r = diff.exp()                                        # (N,) first ratio
    return {"model": model_name, "dtype": dtype, "tokens": int(sampled.sum()),
            "max": diff.abs().max().item(), "mean": diff.abs().mean().item(),
            "ratio_dev": (r - 1).abs().mean().item(),
            "clipped": ((r < 0.8) | (r > 1.2)).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["tiny", "smollm2-135m"])
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/logp_gap.md"))
    args = p.parse_args()
    from common import machine

    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            g = gap(name, dtype)
            rows.append(f"| {g['model']} | {g['dtype']} | {g['tokens']} | {g['max']:.1e} "
                        f"| {g['mean']:.1e} | {g['ratio_dev']:.1e} | {100 * g['clipped']:.2f}% |")
            print(rows[-1], flush=True)
    report = ["# Reused vs recomputed old log-probs", "",
              f"Machine: {machine()} (no GPU lent); "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              "benchmarks/logp_gap.py", "",
              "| model | dtype | sampled tokens | max abs gap (nats) | mean abs gap "
              "| mean abs(r - 1) at the first update | r outside [0.8, 1.2] |",
              "|---|---|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
