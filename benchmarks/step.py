"""Where the time of one RL step goes: `train.rl_step`, split into its phases, on the tiny preset
on CPU.

    python benchmarks/step.py                                # model runs/demo/seed-0/sft, 2 threads
    python benchmarks/step.py --model /path/to/sft --steps 1 --threads 1 --questions 2 --k 2
                                                             # quick look

The policy is loaded as the RL stage loads it (SFT'd tiny model + fresh LoRA, seed 0), with the tiny
Config of `--algo`. `phased_step` does train.rl_step's work with the same functions, order and
seeds:
  rollout        the tree sampler at temperature 1, with its parts: model.generate (logits processor
                 included); the forward passes that encode prompts and tool results before generate;
                 tools (time with at least one call running: calls run in parallel threads);
                 the rest (the sampler's own Python, tokenising tool results, cache copies)
  rewards, advantages, tensorise (train.trajectory_tensors: right-padded (B, T) tensors)
  old logp       reused from the rollout (cfg.recompute_old_logp=False): no work. The recompute is
                 timed on its own row, outside the step, and compared with the reused values.
  forward+loss   per mini-batch: token_logprobs with entropy, entropy-aware advantages, policy_loss
  backward       per mini-batch (what accelerate's `backward` does in one CPU process)
  optimizer      gradient-norm clip + AdamW step, per mini-batch
rl_step's metric bookkeeping is not timed; the `train.rl_step` row is the real step's own `step_s`,
and phased_step must reach train.rl_step's LoRA weights from the same start (checked). Seconds: mean
over `--steps` steps after a warm-up step. Peak RSS: the high-water mark within the phase (kernel
VmHWM, reset at its start via /proc/self/clear_refs), max over steps. `--profile N`: the top N rows
of a cProfile of one real train.rl_step (it slows Python-heavy code: read it for where, not how
long). Writes benchmarks/results/step.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")     # the Python sandbox forks

import torch  # noqa: E402

import kvcache  # noqa: E402
import train  # noqa: E402
from aepo import Config  # noqa: E402
from loss import group_advantages, reinforce_pp_advantages, token_logprobs  # noqa: E402
from rollout import rollout  # noqa: E402
from support import data, world  # noqa: E402
from support.cli import resolve  # noqa: E402
from support.policy import make_tools, system_prompt_for  # noqa: E402
from common import machine, busy_seconds  # noqa: E402  (benchmarks/common.py)

PHASES = ["rollout", "rewards", "advantages", "tensorise", "old logp (reused)", "forward+loss",
          "backward", "optimizer"]
INNER = ["  rollout: model.generate", "  rollout: encode prompts and tool results",
         "  rollout: tools (any call running)", "  rollout: the rest (sampler)"]
EXTRA = "old logp recompute (not in step)"




class Clock:
    """Seconds and calls per phase, summed over steps; peak RSS per phase (MB), the max over
    steps."""

    def __init__(self):
        self.seconds, self.calls, self.peak = (defaultdict(float), defaultdict(int),
                                               defaultdict(float))

    @contextmanager
    def __call__(self, phase: str):
        Path("/proc/self/clear_refs").write_text("5")            # VmHWM := current RSS
        t0 = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - t0
        self.calls[phase] += 1
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        self.peak[phase] = max(self.peak[phase], int(hwm.split()[1]) / 1024)


def timed(fn, spans: list):
    """fn, with each call's (start, end) appended to `spans` (list.append is thread-safe)."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append((t0, time.perf_counter()))
    return call




# --------------------------------------------------------------------------------------------------
# train.rl_step, phase by phase (one process: no accelerate wrapper, same arithmetic)


def phased_step(model, tok, opt, examples, tools, cfg: Config, step: int, clock: Clock, log: dict,
                acc) -> None:
    rng = random.Random(cfg.seed * 1_000_003 + step)
    batch = rng.sample(examples, min(cfg.questions_per_step, len(examples)))
    with clock("rollout"):
        model.eval()
        res = rollout(model, tok, [e.question for e in batch], tools, cfg,
                      seed=(cfg.seed * 1_000_003 + step) * 64,
                      system_prompt=system_prompt_for(cfg))
    trajs = res.trajectories
    with clock("rewards"):
        golds = [batch[t.question_idx].golds for t in trajs]
        rewards = torch.tensor([data.reward(t.text, g) for t, g in zip(trajs, golds)])  # (B,)
    with clock("advantages"):
        group = torch.tensor([t.question_idx for t in trajs])                           # (B,)
        adv_fn = group_advantages if cfg.adv_estimator == "grpo" else reinforce_pp_advantages
        adv = adv_fn(rewards, group)                                                    # (B,)
    with clock("tensorise"):
        tensors = train.trajectory_tensors(trajs, tok.pad_token_id, torch.device("cpu"))
        tensors["adv"] = train.token_advantages(adv, tensors, cfg)                     # (B, T)
    with clock("old logp (reused)"):
        pass                                                    # cfg.recompute_old_logp=False
    with clock(EXTRA), torch.no_grad():
        recomputed = token_logprobs(model, tensors["ids"], tensors["attn"])             # (B, T)
    gap = (recomputed - tensors["old_logp"])[tensors["loss_mask"] > 0].abs().max().item()
    log["logp_gap"] = max(log.get("logp_gap", 0.0), gap)
    if cfg.recompute_old_logp:
        tensors["old_logp"] = recomputed

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    order = torch.randperm(len(trajs),
                           generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
    for mb in order.chunk(cfg.mini_batches):
        n_tokens = tensors["loss_mask"][mb].sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        for micro, t in train.micro_batches(tensors, mb, cfg.grad_accum):
            with clock("forward+loss"):
                # the same code as rl_step
                loss, _ = train.micro_batch_loss(model, t, cfg, acc)
            with clock("backward"):
                (loss * t["loss_mask"].sum() / n_tokens).backward()
            lengths = t["attn"].sum(1).sort().values                                    # (b,)
            # length-sorted 8-row chunks
            chunked = sum(int(c.max()) * len(c) for c in lengths.split(8))
            for key, n in [("positions", t["ids"].numel()), ("real", int(lengths.sum())),
                           ("chunked", chunked)]:
                log[key] = log.get(key, 0) + n
        with clock("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if torch.isfinite(grad_norm):
                opt.step()
            opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# Driver: warm up, check against train.rl_step, time, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/demo/seed-0/sft", help="SFT'd tiny policy folder")
    p.add_argument("--algo", default="aepo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--questions", type=int, default=0, help="questions per step (0: the preset's)")
    p.add_argument("--k", type=int, default=0, help="trajectories per question (0: the preset's)")
    p.add_argument("--profile", type=int, default=25,
                   help="cProfile rows of one rl_step (0: no profile)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step.md"))
    args = p.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"--model {args.model}: no model there. Run `python train.py "
                 "--output_dir runs/demo/seed-0 --stage sft` (or `python benchmarks/demo.py`) "
                 "to write the SFT'd tiny policy, or pass --model.")
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    cfg = resolve(Config(algo=args.algo, init_from=str(Path(args.model).resolve()),
                         output_dir="unused"))
    cfg.questions_per_step, cfg.k = args.questions or cfg.questions_per_step, args.k or cfg.k
    # as train.main: the same fresh LoRA weights
    torch.manual_seed(cfg.seed)
    model, tok = train.load_rl_policy(cfg, Path("unused"))
    # 1 process
    examples, tools, acc = world.load_examples(cfg.dataset), make_tools(cfg), Accelerator(cpu=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    new_opt = lambda: torch.optim.AdamW(list(params.values()), lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)
    # LoRA weights before step 0
    restart = lambda: [params[n].data.copy_(start[n]) for n in params]

    phased_step(model, tok, new_opt(), examples, tools, cfg, 0, Clock(), {}, acc)       # warm-up
    restart()
    metrics, _ = train.rl_step(model, tok, new_opt(), examples, tools, cfg, 0, acc)
    reference = {n: p.detach().clone() for n, p in params.items()}
    restart()
    clock, opt, log, n = Clock(), new_opt(), {}, args.steps
    generate, gen_spans, enc_spans, tool_spans = model.generate, [], [], []
    model.generate = timed(generate, gen_spans)                   # the sampler calls model.generate
    encoders = {name: getattr(kvcache, name) for name in ("encode_prefixes", "encode")}
    # its forward passes outside generate
    for name, fn in encoders.items():
        setattr(kvcache, name, timed(fn, enc_spans))
    timed_tools = {name: timed(fn, tool_spans) for name, fn in tools.items()}
    for step in range(n):
        t0 = time.perf_counter()
        phased_step(model, tok, opt, examples, timed_tools, cfg, step, clock, log, acc)
        clock.seconds["step"] += time.perf_counter() - t0
        if step == 0:
            same = max((params[k] - reference[k]).abs().max().item() for k in params)
    model.generate = generate
    for name, fn in encoders.items():
        setattr(kvcache, name, fn)
    for phase, spans in zip(INNER, [gen_spans, enc_spans, tool_spans]):
        clock.seconds[phase], clock.calls[phase] = busy_seconds(spans), len(spans)
    clock.seconds[INNER[3]] = (clock.seconds["rollout"]
                               - sum(clock.seconds[phase] for phase in INNER[:3]))

    # the recompute is not part of the step
    total = (clock.seconds["step"] - clock.seconds[EXTRA]) / n
    rows = ["| phase | s / step | calls / step | share of step | peak RSS MB |",
            "|---|---|---|---|---|"]
    for phase in PHASES[:1] + INNER + PHASES[1:] + [EXTRA]:
        s, peak, calls = clock.seconds[phase] / n, clock.peak[phase], clock.calls[phase] / n
        rows.append(f"| {phase} | {s:.3f} | {f'{calls:.3g}' if calls else ''} "
                    f"| {100 * s / total:.1f}% "
                    f"| {f'{peak:.0f}' if peak else '-'} |")
    phases = sum(clock.seconds[ph] for ph in PHASES) / n
    rows += [f"| sum of phases | {phases:.3f} | | {100 * phases / total:.1f}% | |",
             f"| whole step (recompute excluded) | {total:.3f} | 1 | 100% "
             f"| {max(clock.peak.values()):.0f} |",
             f"| train.rl_step (step 0, its step_s) | {metrics['step_s']:.3f} | 1 | | |"]
    per_mb = lambda ph: clock.seconds[ph] / n / cfg.mini_batches
    notes = ["- phased_step vs train.rl_step after step 0: max |LoRA weight difference| = "
             f"{same:.1e}",
             "- reused vs recomputed old log-probs on sampled tokens: max |difference| = "
             f"{log['logp_gap']:.1e}",
             f"- per mini-batch ({cfg.mini_batches} per step, grad_accum {cfg.grad_accum}): "
             f"forward+loss {per_mb('forward+loss'):.3f} s, backward {per_mb('backward'):.3f} s",
             f"- training forward: {100 * (1 - log['real'] / log['positions']):.0f}% of positions "
             "are padding; length-sorted chunks of 8 rows would compute "
             f"{100 * (1 - log['chunked'] / log['positions']):.0f}% fewer positions"]
    report = [f"# One RL step on CPU, by phase (`--algo {cfg.algo}`, tiny preset)", "",
              f"Machine: {machine()}; torch threads {args.threads}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              "", f"Model {args.model} + LoRA r={cfg.lora_r}; "
              f"{cfg.questions_per_step} questions x k={cfg.k}; "
              f"mean over {n} steps after one warm-up step.", "", *rows, "", *notes]
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(train.rl_step, model, tok, opt, examples, tools, cfg, n, acc)
        for order, where, title in [("tottime", "", "all functions by self time"),
                                    ("cumulative", rf"{ROOT}/\w+\.py",
                                     "project functions by cumulative time")]:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats(order).print_stats(where, args.profile)
            body = text.getvalue().replace(str(ROOT) + "/", "").replace(sys.prefix + "/lib/", "")
            report += ["", f"## cProfile of one train.rl_step (step {n}): {title}, "
                       f"top {args.profile}", "",
                       "```", body[body.find("ncalls"):].rstrip(), "```"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
