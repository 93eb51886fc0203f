"""Cold-start SFT: the policy learns the agent format from demonstration trajectories (tool
results masked out, as in RL) before RL starts; and the cached SFT start that `--init_from
cached-sft` (the class preset) begins from, built once per machine. train.py calls `sft(cfg, run)`
for a run's own SFT stage and `cached_sft()` for the shared start; RL itself lives in train.py.

    python train.py --stage sft --output_dir runs/x   # a run's own SFT only: runs/x/sft
    python -m support.sft                              # build (or find) the cached SFT start

In: demonstrations (world.demonstrations for the built-in world, else a jsonl of `data.Demo`s), the
model named by the config. Out: a model folder (`<run>/sft`, or the cache's `sft-<key>/sft`) and
sft_metrics.jsonl beside it (the loss per step; curves.png plots it).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import tools
from aepo import Config
from loss import TOKEN_LOGPROBS_CODE, token_logprobs
from support import data, loaders, policy, tiny, world
from support.checkpoint import atomic_save
from support.policy import load_policy, pad_right, pick_device, prompt_ids, system_prompt_for
from tools import BM25Search

# --------------------------------------------------------------------------------------------------
# Demonstrations -> (ids, loss_mask) rows -> batches


def demo_tensors(tokenizer, demo, system_prompt: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one demonstration: prompt 0, model text 1, tool results 0, EOS 1. Each
    piece is tokenised on its own, exactly as the rollout appends tool results."""
    ids = prompt_ids(tokenizer, demo.question, system_prompt)
    mask = [0] * len(ids)
    for text, is_result in data.split_response(demo.response):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [0 if is_result else 1] * len(piece)
    return ids + [tokenizer.eos_token_id], mask + [1]


def sft_rows(cfg: Config, tok) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of every demonstration the SFT trains on."""
    if cfg.sft_dataset == "world":
        search = lambda docs: BM25Search(docs, snippet_chars=cfg.snippet_chars).search
        demos = world.demonstrations(cfg.sft_demos, seed=cfg.seed, make_search=search,
                                     top_k=cfg.top_k, bad_fraction=cfg.sft_bad_fraction)
    else:
        demos = loaders.load_demos(cfg.sft_dataset)
    return [demo_tensors(tok, d, system_prompt_for(cfg)) for d in demos]


def length_grouped_batches(rows: list, batch: int, rng: random.Random, pool: int = 8):
    """Endless random batches of similar lengths (padding is wasted compute): draw pool x batch
    rows, sort them by length, cut into batches, and serve those in random order."""
    while True:
        drawn = sorted(rng.sample(rows, min(len(rows), pool * batch)), key=lambda r: len(r[0]))
        chunks = [drawn[i:i + batch] for i in range(0, len(drawn), batch)]
        rng.shuffle(chunks)
        yield from chunks


# --------------------------------------------------------------------------------------------------
# The SFT


def sft(cfg: Config, run: Path) -> Path:
    """Train on demonstrations; returns the folder the RL stage starts from."""
    device = pick_device()
    full = cfg.model == "tiny"                       # a random-weight model needs every parameter
    model, tok = load_policy(cfg.model, lora_r=0 if full else cfg.lora_r, device=device,
                             load_in_4bit=cfg.load_in_4bit)
    rows = sft_rows(cfg, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.sft_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.sft_steps)))))
    batches = length_grouped_batches(rows, cfg.sft_batch, random.Random(cfg.seed))
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="sft", dynamic_ncols=True)
    with open(run / "sft_metrics.jsonl", "w") as log:
        for step in bar:
            batch = next(batches)
            ids = pad_right([r[0] for r in batch], tok.pad_token_id).to(device)        # (B, T)
            mask = pad_right([r[1] for r in batch], 0).to(device).float()               # (B, T)
            attn = pad_right([[1] * len(r[0]) for r in batch], 0).to(device)            # (B, T)
            logp = token_logprobs(model, ids, attn)
            nll = -(logp * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            nll.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{nll.item():.3f}")
            log.write(json.dumps({"step": step, "loss": nll.item()}) + "\n")
    out = run / "sft"
    atomic_save(out, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return out


# --------------------------------------------------------------------------------------------------
# The cached SFT start of the class preset, keyed by what it is made of


def sft_data_digest(base: Config) -> str:
    """sha256 of what the default SFT trains on: the starting weights and every demonstration's
    token ids and loss mask. Making 4,000 demonstrations takes a minute, so the digest is
    remembered (.cache/sft-digests.json) per version of the files that make them."""
    makers = (world, data, tiny, policy, tools, sys.modules[__name__])   # this file: sft_rows
    code = tiny.code_hash(*(Path(m.__file__).read_text() for m in makers))
    memo = tiny.CACHE_DIR / "sft-digests.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if code not in known:
        model, tok = load_policy(base.model, lora_r=0, device=torch.device("cpu"))
        digest = hashlib.sha256(json.dumps(sft_rows(base, tok)).encode())
        for p in model.state_dict().values():
            digest.update(p.detach().float().numpy().tobytes())
        known[code] = digest.hexdigest()
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)                       # whole or not at all
    return known[code]


def cached_sft_folder() -> Path:
    """Where the cached SFT start lives: the cache folder's sft-<key>. The key hashes what the
    start is made of: the starting weights and every demonstration's token ids and loss mask
    (sft_data_digest), the recipe, and the SFT's own code (`sft` and the functions of
    loss.TOKEN_LOGPROBS_CODE); so any change to the world, the prompts or the tokenizer that
    reaches the demonstrations builds a new one, and nothing else does."""
    base = Config()
    recipe = {f: getattr(base, f) for f in (
        "model", "sft_steps", "sft_batch", "sft_lr", "sft_demos", "sft_bad_fraction", "seed",
        "top_k", "snippet_chars", "system_prompt", "weight_decay", "grad_clip")}
    # the SFT loss's functions (not all of loss.py: a student editing the RL losses keeps the cache)
    sources = [inspect.getsource(f) for f in (sft, *TOKEN_LOGPROBS_CODE)]
    key = tiny.code_hash(*sources, f"recipe = {recipe!r}", f"data = {sft_data_digest(base)!r}")
    return tiny.CACHE_DIR / f"sft-{key}"


def cached_sft() -> Path:
    """--init_from cached-sft: the tiny policy after the default cold-start SFT (seed 0), trained
    once per machine into cached_sft_folder(), like the tiny model itself, and shared by every run
    that starts from it (the `class` preset). A lock lets two runs started together build it
    once."""
    folder = cached_sft_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "sft" / "config.json").exists():
            base = Config()
            print(f"building the cached SFT start in {folder} (once per machine: "
                  f"{base.sft_steps} steps, about 10-20 min on 2 CPU cores)")
            sft(base, folder)
    return folder / "sft"


if __name__ == "__main__":
    print(cached_sft())
