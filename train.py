"""Cold-start SFT, then RL with AEPO (or a baseline), then evaluation: the project's main job. This
file holds the RL step and loop; the SFT stage and the cached SFT start are support/sft.py.

    python train.py                                   # the offline CPU demo on the built-in world
    python train.py --algo grpo --output_dir runs/g   # a baseline, same everything else
    python train.py --preset qwen3-1.7b               # one CUDA GPU: Qwen3-1.7B,
                                                      # 4-bit + LoRA, web search
    python train.py --output_dir runs/x --resume      # continue a run from its last checkpoint
    python train.py --preset class --algo arpo        # a lab: RL from the cached SFT start, ~6 min

Data flows one way: questions -> rollout.py (tree sampler with tools) -> data.reward -> loss.py
advantages -> old log-probs -> one epoch of mini-batch updates -> logs and plots
(support/report.py), checkpoints (support/checkpoint.py: a kill never leaves a broken one) ->
eval.py.
Everything a run writes goes into its folder (`--output_dir`): config.json, metrics.jsonl,
curves.png, samples.jsonl, checkpoint-<step>/ (LoRA adapter + optimizer + RNG), sft/, eval-*/ and
report.md.
"""
from __future__ import annotations

if __name__ == "__main__":   # the command line is checked before the imports below (seconds of
    from support import cli  # torch): a bad one stops in a line, then this module runs main()
    cli.run_script("train", cli.train_config)

import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from aepo import Config, save_config
from eval import evaluate
from loss import (entropy_aware_advantages, group_advantages, kl_k3, policy_loss,
                  reinforce_pp_advantages, token_logprobs)
from rollout import rollout
from support import cli, data, memory, report, world
from support.checkpoint import interrupted, resume, save_checkpoint
from support.policy import load_policy, make_tools, pad_right, system_prompt_for
from support.sft import cached_sft, sft
from tools import describe_isolation, take_search_stats

# --------------------------------------------------------------------------------------------------
# One RL step: rollout -> rewards -> advantages -> one epoch of mini-batch updates


def trajectory_tensors(trajs, pad: int, device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors of prompt + response; old_logp and entropy from the rollout
    (exact: same weights, temperature-1 logits, full vocabulary), 0 on prompt, tool and pad
    tokens."""
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    masks = [[0] * len(t.prompt_ids) + t.loss_mask for t in trajs]
    old = [[0.0] * len(t.prompt_ids) + t.logp for t in trajs]
    ent = [[0.0] * len(t.prompt_ids) + t.entropy for t in trajs]
    ids = pad_right(seqs, pad)
    attn = pad_right([[1] * len(s) for s in seqs], 0)
    return {"ids": ids.to(device), "attn": attn.to(device),
            "loss_mask": pad_right(masks, 0).to(device),
            "old_logp": pad_right(old, 0.0).float().to(device),
            "entropy": pad_right(ent, 0.0).float().to(device)}


def token_advantages(adv: torch.Tensor, tensors: dict, cfg: Config) -> torch.Tensor:
    """(B, T) per-token advantages of the whole step, fixed before the update: the group advantage
    A (B,) on every sampled token; with alpha > 0, AEPO's entropy-aware A~_t = A (1 + alpha z_t)
    (arXiv 2510.14545, eq. 12), z_t standardised over all the step's sampled tokens. z comes from
    the rollout's exact entropies (pi_old; equal to pi_theta's at the first mini-batch), so the
    update does not depend on how the batch is split into mini- and micro-batches."""
    mask = tensors["loss_mask"]                                                         # (B, T)
    if cfg.entropy_adv_alpha > 0:
        return entropy_aware_advantages(adv, tensors["entropy"], mask, cfg.entropy_adv_alpha)
    return adv[:, None] * mask                                                          # (B, T)


def micro_batches(tensors: dict, rows: torch.Tensor, n: int):
    """(row index, tensors) of `rows` split into n micro-batches, each cut to its longest sequence:
    exact, as padding is on the right and attends to nothing."""
    for micro in rows.chunk(n):
        width = int(tensors["attn"][micro].sum(1).max())
        yield micro, {k: v[micro, :width] for k, v in tensors.items()}


@torch.no_grad()
def recompute_old_logp(model, tensors: dict, n: int) -> torch.Tensor:
    """log pi_old of every sampled token by a forward pass (as the paper's code does), in n
    micro-batches of rows sorted by length: never more rows in flight than one update micro-batch.
    Returns (B, T)."""
    old_logp = torch.zeros_like(tensors["old_logp"])                                      # (B, T)
    by_length = tensors["attn"].sum(1).argsort()                                          # (B,)
    for micro, t in micro_batches(tensors, by_length, n):
        # the first sampled column: no logits before
        first = int(t["loss_mask"].any(0).int().argmax())
        old_logp[micro, :t["ids"].shape[1]] = token_logprobs(model, t["ids"], t["attn"],
                                                               first=first)
    return old_logp


def micro_batch_loss(model, t: dict, cfg: Config, accelerator) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (the surrogate: token mean over its sampled tokens) and its
    stats. t: trajectory_tensors rows (b, T) with "adv", their token advantages (b, T)."""
    # the first sampled column: no logits before
    first = int(t["loss_mask"].any(0).int().argmax())
    logp, entropy = token_logprobs(model, t["ids"], t["attn"], with_entropy=True,
                                     first=first)                                        # (b, T)
    loss, stats = policy_loss(logp, t["old_logp"], t["adv"], t["loss_mask"],
                                clip_mode=cfg.clip_mode, eps_low=cfg.eps_low,
                                eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, entropy=entropy,
                                high_entropy=t.get("high_entropy"))
    if cfg.kl_coef > 0:                      # reference policy: the same weights, adapters off
        with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
            ref = token_logprobs(model, t["ids"], t["attn"], first=first)
        loss = loss + cfg.kl_coef * kl_k3(logp, ref, t["loss_mask"])
    return loss, stats


def accumulate(model, tensors: dict, rows: torch.Tensor, cfg: Config, accelerator) -> list[dict]:
    """The gradient of one mini-batch (`rows`), its loss the token mean over all its sampled
    tokens, built from cfg.grad_accum micro-batches; returns their stats."""
    n_tokens = tensors["loss_mask"][rows].sum().clamp(min=1)
    stats = []
    for micro, t in micro_batches(tensors, rows, cfg.grad_accum):
        loss, s = micro_batch_loss(model, t, cfg, accelerator)
        accelerator.backward(loss * t["loss_mask"].sum() / n_tokens)
        stats.append(s)
    return stats


def update(model, opt, trajs, adv: torch.Tensor, tok, cfg: Config, step: int,
           accelerator) -> tuple[list[dict], int, float]:
    """cfg.epochs passes of mini-batch updates over the step's trajectories (adv (B,): their group
    advantages); returns the loss stats per micro-batch, the updates skipped for a non-finite
    gradient, and the last gradient norm."""
    device = accelerator.device
    tensors = trajectory_tensors(trajs, tok.pad_token_id, device)
    tensors["adv"] = token_advantages(adv, tensors, cfg)                                    # (B, T)
    sampled = tensors["entropy"][tensors["loss_mask"] > 0]                                  # (N,)
    top20 = sampled.quantile(0.8) if sampled.numel() else 0.0    # for the clip-fraction stats
    tensors["high_entropy"] = (tensors["entropy"] > top20) & (tensors["loss_mask"] > 0)     # (B, T)
    if cfg.recompute_old_logp:
        tensors["old_logp"] = recompute_old_logp(model, tensors, cfg.mini_batches * cfg.grad_accum)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    batches = [mb for _ in range(cfg.epochs)
               for mb in torch.randperm(len(trajs), generator=gen).chunk(cfg.mini_batches)]
    stats, skipped, grad_norm = [], 0, 0.0
    for mb in batches:                  # each epoch in a new random order of mini-batches
        opt.zero_grad(set_to_none=True)
        stats += accumulate(model, tensors, mb, cfg, accelerator)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(grad_norm):
            opt.step()
        else:                                            # never write a poisoned adapter
            skipped += 1
        opt.zero_grad(set_to_none=True)
    return stats, skipped, float(grad_norm)


def rl_step(model, tok, opt, examples, tools, cfg: Config, step: int,
            accelerator) -> tuple[dict, list]:
    """`accelerator` is the accelerate.Accelerator: with N processes each rolls out its share of the
    questions and DDP averages the gradients; with one process it changes nothing."""
    device = accelerator.device
    rng = random.Random(cfg.seed * 1_000_003 + step)
    batch = rng.sample(examples, min(cfg.questions_per_step, len(examples)))
    batch = batch[accelerator.process_index:: accelerator.num_processes]
    t0 = time.time()
    model.eval()
    res = rollout(accelerator.unwrap_model(model), tok, [e.question for e in batch], tools, cfg,
                  seed=(cfg.seed * 1_000_003 + step) * 64 + accelerator.process_index,
                  system_prompt=system_prompt_for(cfg))
    t_rollout = time.time() - t0
    trajs = res.trajectories
    golds = [batch[t.question_idx].golds for t in trajs]
    rewards = torch.tensor([data.reward(t.text, g) for t, g in zip(trajs, golds)])            # (B,)
    group = torch.tensor([t.question_idx for t in trajs])                                   # (B,)
    adv_fn = group_advantages if cfg.adv_estimator == "grpo" else reinforce_pp_advantages
    adv = adv_fn(rewards, group).to(device)                                                 # (B,)
    # every group's rewards equal on every process (DDP updates them together): nothing to learn
    zero = accelerator.reduce(adv.any().float().reshape(1), "sum").item() == 0
    stats, skipped, grad_norm = ([], 0, 0.0) if zero else update(model, opt, trajs, adv, tok,
                                                                 cfg, step, accelerator)

    metrics = {"step": step, **report.step_metrics([batch[t.question_idx] for t in trajs], res,
                                                   rewards.tolist(), stats, cfg.entropy_window),
               **{f"search_{k}": v for k, v in take_search_stats(tools).items() if k != "calls"},
               "zero_adv_step": int(zero), "grad_norm": float(grad_norm), "skipped": skipped,
               "rollout_s": t_rollout,
               "step_s": time.time() - t0, "processes": accelerator.num_processes}
    # the mean over processes (per-kind rates: the main process's own)
    if accelerator.num_processes > 1:
        shared = [k for k, v in metrics.items()
                  if not k.startswith("search_rate_") and isinstance(v, (int, float))]
        values = accelerator.reduce(torch.tensor([metrics[k] for k in shared], device=device,
                                                 dtype=torch.float64), "mean")
        metrics |= dict(zip(shared, values.tolist())) | {"step": step}
    samples = [{"step": step, "question": batch[trajs[i].question_idx].question,
                "golds": list(golds[i]), "reward": rewards[i].item(), "text": trajs[i].text}
               for i in range(0, len(trajs), cfg.k)][:4]
    return metrics, samples


# --------------------------------------------------------------------------------------------------
# The RL stage and the whole job


def rl_start(cfg: Config, run: Path) -> str:
    """Where RL starts: --init_from, else this run's SFT output, else the base model."""
    if cfg.init_from == "cached-sft":
        return str(cached_sft())
    if cfg.init_from:
        return cfg.init_from
    return str(run / "sft") if (run / "sft").exists() else cfg.model


def load_rl_policy(cfg: Config, run: Path, device=None):
    start = rl_start(cfg, run)
    # LoRA SFT: keep training that adapter
    if (Path(start) / "adapter_config.json").exists():
        return load_policy(cfg.model, adapter=start, load_in_4bit=cfg.load_in_4bit, device=device)
    return load_policy(start, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                       load_in_4bit=cfg.load_in_4bit, device=device)


def rl(cfg: Config, run: Path, model, tok, accelerator) -> None:
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = world.load_examples(cfg.dataset)
    tools = make_tools(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:   # the newest checkpoint, if any; the log lines after it go (all, if none)
        start = resume(run, model, opt, truncate=accelerator.is_main_process)
        print(f"resumed at step {start + 1}")
    ddp_model, opt = accelerator.prepare(model, opt)
    main = accelerator.is_main_process
    logged = report.read_metrics(run) if start else []     # the steps kept by truncate_logs
    sampled = logged[-1].get("sampled_tokens_total", 0) if logged else 0
    tracker = report.Tracker(cfg, run, start) if main else None
    bar = tqdm(range(start, cfg.steps), desc="rl", dynamic_ncols=True, initial=start,
               total=cfg.steps, disable=not main)
    steps_run = start
    for step in bar:
        if 0 < cfg.token_budget <= sampled:                 # resumed after the budget was spent
            break
        metrics, samples = rl_step(ddp_model, tok, opt, examples, tools, cfg, step, accelerator)
        steps_run = step + 1
        sampled += metrics["sampled_tokens"] * accelerator.num_processes
        metrics["sampled_tokens_total"] = sampled
        last = step == cfg.steps - 1 or 0 < cfg.token_budget <= sampled      # --token_budget spent
        if main:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            tracker.log(metrics)
            tqdm.write(report.log_line(metrics, cfg.steps))
            if step % cfg.sample_every == 0 or last:
                with open(run / "samples.jsonl", "a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in samples)
        if (step + 1) % cfg.save_every == 0 or last:
            if main:
                save_checkpoint(run, step, model, opt)
                report.plot_curves(run)
            accelerator.wait_for_everyone()
        if last:
            break
    if main:
        if cfg.token_budget:
            print(f"RL: {sampled} sampled tokens in {steps_run} steps "
                  f"(--token_budget {cfg.token_budget})")
        tracker.close()


def evaluate_policy(model, tok, cfg: Config, run: Path, name: str) -> dict:
    examples = world.load_examples(cfg.eval_dataset, limit=cfg.eval_limit or None)
    return evaluate(model, tok, examples, make_tools(cfg), cfg, runs=cfg.eval_runs,
                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, seed=cfg.seed,
                    system_prompt=system_prompt_for(cfg), out_dir=run / f"eval-{name}",
                    desc=f"eval {name}")


def choose_rollout_questions(cfg: Config) -> Config:
    """On a GPU, as many questions rolled out together as support/memory.py's upper bound fits in
    the free memory (said in one line); unchanged when the model's shape is unknown offline."""
    free = torch.cuda.mem_get_info()[0]
    try:
        print(memory.rollout_questions_line(cfg, free))
        return dataclasses.replace(cfg, rollout_questions=memory.rollout_questions_for(cfg, free))
    except SystemExit:                       # no local config.json to read the shape from
        return cfg


def main(argv: list[str] | None = None, checked: Config | None = None) -> None:
    """Run the job of the command line `argv` (or `checked`, what cli.train_config returned for
    it). Ctrl-C stops it with one line: what the run folder keeps and how to go on."""
    cfg = checked or cli.train_config(argv)
    try:
        job(cfg)
    except KeyboardInterrupt:
        print(interrupted(Path(cfg.output_dir)), file=sys.stderr)
        sys.exit(130)


def job(cfg: Config) -> None:
    """SFT, RL and evaluation, as cfg.stage says."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if torch.cuda.is_available() and cfg.rollout_questions == 0 and cfg.stage != "sft":
        cfg = choose_rollout_questions(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    run = Path(cfg.output_dir)
    if main_process:                          # one writer; under accelerate the others wait for it
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.json")
        print(f"run: {cfg.algo} on {cfg.model}, {cfg.stage}, seed {cfg.seed} -> {run} "
              f"(every setting: {run / 'config.json'})")
        print(describe_isolation(cfg.unsafe_python))
        if (cfg.stage in ("sft", "all") and cfg.sft_dataset
                and not (cfg.resume and (run / "sft").exists())):
            torch.manual_seed(cfg.seed)       # a seed gives the same SFT (LoRA's random start)
            sft(cfg, run)
    accelerator.wait_for_everyone()
    if cfg.stage in ("rl", "all"):
        torch.manual_seed(cfg.seed)           # the same fresh LoRA weights in every process
        model, tok = load_rl_policy(cfg, run, accelerator.device)
        wants_eval = cfg.stage == "all" and cfg.eval_dataset and main_process
        before = evaluate_policy(model, tok, cfg, run, "sft") if wants_eval else None
        accelerator.wait_for_everyone()
        rl(cfg, run, model, tok, accelerator)
        if before is not None:
            after = evaluate_policy(model, tok, cfg, run, "rl")
            print(report.before_after(before, after, cfg, run))
        accelerator.wait_for_everyone()
    if main_process:
        shown = [name for name in ("curves.png", "report.md") if (run / name).exists()]
        print(f"run folder: {run}" + (f" ({', '.join(shown)})" if shown else ""))
