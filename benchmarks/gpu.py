"""The qwen3-1.7b recipe on one CUDA GPU, phase by phase, at the recipe's budgets: rollout
throughput of three engines, one RL step, peak GPU memory beside support/memory.py's estimate and
upper bound, and the old log-prob gap of 4-bit and bf16. A Qwen3-1.7B-shaped model with random weights
and the real Qwen tokenizer, both built offline; neither the sandbox nor the hub is used.

    bash benchmarks/gpu.sh                      # on the GPU machine: carried wheels, 8 minutes
    python benchmarks/gpu.py --small --out /tmp/gpu.md    # every phase on CPU at toy sizes (CI)

The model and tokenizer come from benchmarks/qwen_offline.py.

A random model never writes a tool call, so the rollout's engine is wrapped (ForcedCalls): every
segment of sampled text ends with a search call, whose synthetic result is as long as the recipe's
(top_k x snippet_chars characters), and each segment's recorded entropies rise with the row's
calls, so that AEPO's entropy rule branches. The KV cache, the prefills and the branching are then
those of an AEPO step at the recipe's budgets. Phases, each written to --out as soon as it ends
(the plan after the probe says what each is expected to take; a phase that would end after
--deadline_s is skipped, and the rollout's response budget is halved until it fits):
  load     build, save (bf16) and load the model as train.py loads the recipe (4-bit NF4 + LoRA)
  probe    plain generate of the rollout's rows: seconds per decode step, and a prefill's tokens/s
  rollout  the recipe's AEPO rollout, rollout_questions from memory.rollout_questions_for and the
           free memory: generated tokens/s of the cached engine, branches, peak memory
  engines  one question: cached engine vs re-encoding engine vs plain generate (no tree): tokens/s
  old_logp train.recompute_old_logp of the rollout: seconds, peak memory, the gap to the rollout's
  update   one update (mini_batches x grad_accum micro-batches, gradient checkpointing) on the
           rollout, with random +-1 advantages (random weights earn no reward): seconds, peak
  bf16     the same weights in bf16: one question's rollout and its old log-prob gap
Peak memory per phase: torch.cuda.max_memory_allocated and max_memory_reserved, beside
support/memory.py's typical estimate and upper bound for the same config.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_offline import QWEN3_1_7B, SMALL, build_model, qwen_tokenizer  # noqa: E402,F401


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# --------------------------------------------------------------------------------------------------
# A random model that acts like an agent


class ForcedCalls:
    """The engine verbs (engine.py) around another engine: a row's segment that did not stop ends
    with a search call after at most limit - len(call) sampled tokens (up to `calls` per row, the
    limit being the row's token limit for the call), and its recorded entropies are scaled up with
    the row's calls so far (AEPO then branches)."""

    def __init__(self, inner, tokenizer, calls: int):
        self.inner, self.calls, self.made = inner, calls, []
        self.call = tokenizer.encode(" <search> where was Mira Quell born </search>",
                                     add_special_tokens=False)

    def __getattr__(self, name):        # append, rewind, release, the token counts: the inner's
        return getattr(self.inner, name)

    def add(self, prompts):
        self.made += [0] * len(prompts)
        self.inner.add(prompts)

    def select(self, index):
        self.made = [self.made[i] for i in index]
        self.inner.select(index)

    def generate(self, n, tails, limits=None, until=None):
        limits = limits or [n] * len(tails)
        inner = [max(1, limit - len(self.call)) if limit else 0 for limit in limits]
        segments = self.inner.generate(max(inner), tails, inner, until)
        for b, seg in enumerate(segments):
            seg.entropy = [h * (1 + self.made[b]) for h in seg.entropy]
            if seg.stop is None and self.made[b] < self.calls and limits[b] > len(self.call):
                seg.tokens += self.call
                seg.logp += [0.0] * len(self.call)
                seg.entropy += [0.0] * len(self.call)
                seg.stop = "tag"
                self.inner.append(b, self.call)
                self.made[b] += 1
        return segments


def synthetic_tools(cfg, seed: int = 0) -> dict:
    """Search: top_k snippets of snippet_chars characters of words (as long as the recipe's
    results); python: a number."""
    words = ("the city of Vantor lies on a river and was founded in 1962 by settlers from the "
             "north who built a bridge a school and a market").split()
    rng = random.Random(seed)
    snippet = lambda: " ".join(rng.choice(words) for _ in range(cfg.snippet_chars // 5))
    search = lambda q: "\n".join(f"Page {i + 1}: {snippet()[:cfg.snippet_chars]}"
                                 for i in range(cfg.top_k))
    return {"search": search, "python": lambda code: "42"}


# --------------------------------------------------------------------------------------------------
# Measuring


class Report:
    """The report's rows, written to `path` after every phase."""

    def __init__(self, path: Path, head: list[str]):
        self.path, self.head, self.rows = path, head, []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, *rows: tuple[str, str]) -> None:
        self.rows += rows
        self.write()
        print("\n".join(f"{a}: {b}" for a, b in rows), file=sys.stderr, flush=True)

    def write(self, tail: list[str] = ()) -> None:
        text = [*self.head, "| what | measured |", "|---|---|",
                *[f"| {a} | {b} |" for a, b in self.rows], "", *tail]
        self.path.write_text("\n".join(text) + "\n")


PEAKS: list[float] = []      # every phase's peak allocated GiB


class Phase:
    """Wall time and peak GPU memory (allocated, reserved) of a block."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0
        self.alloc = gib(torch.cuda.max_memory_allocated()) if self.cuda else 0.0
        PEAKS.append(self.alloc)
        self.reserved = gib(torch.cuda.max_memory_reserved()) if self.cuda else 0.0

    def memory(self, e: dict, phase: str) -> str:
        return (f"{self.alloc:.2f} allocated / {self.reserved:.2f} reserved GiB; support/memory.py "
                f"{gib(e[f'peak_{phase}']):.2f} typical, {gib(e[f'bound_{phase}']):.2f} bound GiB")


def logp_gap(t: dict, recomputed: torch.Tensor) -> str:
    """mean and max |log pi_rollout - log pi_recomputed| over sampled tokens (not the forced calls,
    recorded with entropy 0); share of ratios outside [0.8, 1.2]."""
    sampled = (t["loss_mask"] > 0) & (t["entropy"] != 0)                          # (B, T)
    diff = (t["old_logp"] - recomputed)[sampled]                                  # (N,)
    d, out = diff.abs(), (diff.exp() - 1).abs() > 0.2
    return (f"mean {d.mean():.4f}, max {d.max():.3f}, ratio outside [0.8, 1.2] "
            f"{out.float().mean():.3%} of {d.numel()} tokens")


def plain_generate(model, tok, prompt: list[int], rows: int, tokens: int, device) -> float:
    """Tokens per second of `generate` without a tree: `rows` copies of the prompt, sampled."""
    ids = torch.tensor([prompt] * rows, device=device)                            # (B, P)
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                   pad_token_id=tok.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows * tokens / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# The phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="toy model and budgets (CPU check)")
    p.add_argument("--algo", default="aepo")
    p.add_argument("--folder", default="/tmp/qwen3-1.7b-random",
                   help="where the random model is saved")
    p.add_argument("--deadline_s", type=float, default=450.0,
                   help="seconds from now by which every phase must have ended")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    args = p.parse_args()
    deadline = time.perf_counter() + args.deadline_s

    from support import memory
    import train
    import rollout as R
    from support.cli import parse_config
    from common import machine
    from engine import ReencodeEngine
    from kvcache import CachedEngine
    from support.policy import load_policy, prompt_ids, system_prompt_for

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (4-bit NF4); on CPU run it with --small.")
    device = torch.device("cuda" if cuda else "cpu")
    budgets = (["--k", "4", "--questions_per_step", "2", "--segment_tokens", "16",
                "--max_response_tokens", "96", "--max_prompt_tokens", "256", "--top_k", "2",
                "--snippet_chars", "60", "--mini_batches", "2", "--grad_accum", "2"]
               if args.small else [])
    cfg = parse_config(["--preset", "qwen3-1.7b", "--algo", args.algo, "--model", args.folder,
                        "--output_dir", "/tmp/gpu-bench", "--load_in_4bit", str(cuda), *budgets])
    shape = (memory.Shape(2, 64, 128, 2, 1, 32, 151936) if args.small
             else memory.model_shape("Qwen3-1.7B"))
    free = torch.cuda.mem_get_info()[0] if cuda else 2 * 2**30
    cfg = dataclasses.replace(cfg, rollout_questions=memory.rollout_questions_for(cfg, free, shape))
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
    report = Report(Path(args.out), [
        "# qwen3-1.7b recipe on one GPU: rollout, old log-probs, update, memory", "",
        f"Device: {name}; host {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
        f" {'--small (toy sizes, CPU)' if args.small else 'Qwen3-1.7B shape, random weights'}", ""])
    left = lambda: deadline - time.perf_counter()

    # load ------------------------------------------------------------------------------------
    with Phase(cuda) as ph:
        build_model(Path(args.folder), SMALL if args.small else QWEN3_1_7B, device)
        model, tok = load_policy(cfg.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 load_in_4bit=cfg.load_in_4bit, device=device)
    weights = gib(torch.cuda.memory_allocated()) if cuda else 0.0
    report.add(("load", f"{ph.s:.0f} s (build, save bf16, load "
                        f"{'4-bit NF4' if cfg.load_in_4bit else 'bf16'} + LoRA r={cfg.lora_r}); "
                        f"weights {weights:.2f} GiB; {gib(free):.1f} GiB free before"),
               ("rollout_questions", f"{cfg.rollout_questions} of {cfg.questions_per_step} "
                                     f"(memory.rollout_questions_for, {gib(free):.1f} GiB free)"))

    # probe -----------------------------------------------------------------------------------
    model.eval()
    system_prompt = system_prompt_for(cfg)
    prompt = prompt_ids(tok, "Where was Mira Quell born?", system_prompt)
    rows = cfg.rollout_questions * cfg.k
    with torch.no_grad():
        plain_generate(model, tok, prompt, rows, 8, device)                       # warm-up
        t0 = time.perf_counter()
        plain_generate(model, tok, prompt, rows, 32, device)
        step_s = (time.perf_counter() - t0) / 32
        t0 = time.perf_counter()
        ids = torch.randint(0, 1000, (rows, 512), device=device)
        model(input_ids=ids, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        prefill_tps = ids.numel() / (time.perf_counter() - t0)

    def plan(c):
        """Seconds each later phase should take: decode steps x step_s, prefills at prefill_tps,
        an update as 4 forward passes (forward, backward, the checkpointed recompute)."""
        result = c.top_k * c.snippet_chars // 4                      # tokens of a tool result
        # a trajectory's rounds: its budget is spent by segments and results; x2: AEPO's branches
        rounds = 2 * (-(-c.max_response_tokens // (c.segment_tokens + result)) + 1)
        tokens = rows * (c.max_prompt_tokens + c.max_response_tokens)
        rollout = rounds * c.segment_tokens * step_s + rows * rounds * result / prefill_tps
        one = rollout / c.rollout_questions
        return {"rollout": rollout, "engines": 3 * one, "old_logp": tokens / prefill_tps,
                "update": 4 * tokens / prefill_tps, "bf16": one + 30}

    while sum(plan(cfg).values()) > left() - 5 and cfg.max_response_tokens > 4 * cfg.segment_tokens:
        cfg = dataclasses.replace(cfg, max_response_tokens=cfg.max_response_tokens // 2)
    est = plan(cfg)
    report.add(("probe", f"{step_s * 1000:.1f} ms per decode step at {rows} rows; prefill "
                         f"{prefill_tps:.0f} tokens/s"),
               ("plan", f"{', '.join(f'{k} {v:.0f} s' for k, v in est.items())}: "
                        f"{sum(est.values()):.0f} s of {left():.0f} s left; response budget "
                        f"{cfg.max_response_tokens}"))
    fits = lambda phase: est[phase] < left() or report.add((phase, "skipped: past the deadline"))

    # rollout ---------------------------------------------------------------------------------
    tools = synthetic_tools(cfg)
    R.ENGINES["forced"] = lambda m, s: ForcedCalls(CachedEngine(m, s), tok, cfg.call_limit - 1)
    R.ENGINES["forced-reencode"] = lambda m, s: ForcedCalls(ReencodeEngine(m, s), tok,
                                                            cfg.call_limit - 1)
    questions = [f"Where was person {i} born?" for i in range(cfg.questions_per_step)]
    e = memory.estimate(shape, cfg)
    if not fits("rollout"):
        return
    with Phase(cuda) as ph:
        res = R.rollout(model, tok, questions, tools, cfg, seed=0, system_prompt=system_prompt,
                        engine="forced")
    calls = sum(len(t.tool_calls) for t in res.trajectories)
    report.add(("rollout", f"{len(questions)} questions x k={cfg.k}, {cfg.rollout_questions} "
                           f"together, {cfg.max_prompt_tokens} + {cfg.max_response_tokens} tokens, "
                           f"segments {cfg.segment_tokens}, algo {cfg.algo}: {ph.s:.1f} s, "
                           f"{res.generated_tokens} generated ({res.generated_tokens / ph.s:.0f} "
                           f"tokens/s), {res.prefill_tokens} prefilled, {calls} tool calls, "
                           f"{sum(s.n_branch for s in res.stats)} branches, {res.rounds} rounds"),
               ("rollout memory", ph.memory(e, "rollout")))

    # engines ---------------------------------------------------------------------------------
    if fits("engines"):
        one = dataclasses.replace(cfg, rollout_questions=1)
        tps = {}
        for engine in ("forced", "forced-reencode"):
            with Phase(cuda) as ph:
                r = R.rollout(model, tok, questions[:1], tools, one, seed=1,
                              system_prompt=system_prompt, engine=engine)
            tps[engine] = r.generated_tokens / ph.s
        with torch.no_grad():
            plain = plain_generate(model, tok, prompt, cfg.k, cfg.segment_tokens, device)
        report.add(("engines (1 question x k)", f"cached {tps['forced']:.0f}, re-encoding "
                    f"{tps['forced-reencode']:.0f}, plain generate {plain:.0f} tokens/s (plain: "
                    f"k rows x {cfg.segment_tokens} tokens, no tree, no tools)"))

    # old log-probs ---------------------------------------------------------------------------
    tensors = train.trajectory_tensors(res.trajectories, tok.pad_token_id, device)
    if fits("old_logp"):
        with Phase(cuda) as ph:
            old = train.recompute_old_logp(model, tensors, cfg.mini_batches * cfg.grad_accum)
        report.add(("old log-probs", f"{ph.s:.1f} s for {len(res.trajectories)} rows; gap to the "
                                     f"rollout's ({'4-bit' if cfg.load_in_4bit else 'bf16'}): "
                                     f"{logp_gap(tensors, old)}"),
                   ("old log-probs memory", ph.memory(e, "recompute")))
        tensors["old_logp"] = old

    # update ----------------------------------------------------------------------------------
    if fits("update"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from accelerate import Accelerator
        acc = Accelerator(cpu=not cuda)
        params = [q for q in model.parameters() if q.requires_grad]
        ddp, opt = acc.prepare(model, torch.optim.AdamW(params, lr=cfg.lr))
        adv = torch.randint(0, 2, (len(res.trajectories),), generator=torch.Generator()
                            .manual_seed(0)).float().mul(2).sub(1).to(device)        # (B,) +-1
        tensors["adv"] = train.token_advantages(adv, tensors, cfg)
        ddp.train()
        with Phase(cuda) as ph:
            for mb in torch.randperm(len(res.trajectories)).chunk(cfg.mini_batches):
                train.accumulate(ddp, tensors, mb, cfg, acc)
                opt.step()
                opt.zero_grad(set_to_none=True)
        report.add(("update", f"{ph.s:.1f} s ({cfg.mini_batches} mini-batches x "
                              f"{cfg.grad_accum} micro-batches, gradient checkpointing)"),
                   ("update memory", ph.memory(e, "update")))
        model.gradient_checkpointing_disable()
        model.eval()

    # bf16 ------------------------------------------------------------------------------------
    if cfg.load_in_4bit and fits("bf16"):
        del model
        torch.cuda.empty_cache()
        model, tok = load_policy(cfg.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 load_in_4bit=False, device=device)
        model.eval()
        one = dataclasses.replace(cfg, rollout_questions=1, load_in_4bit=False)
        r = R.rollout(model, tok, questions[:1], tools, one, seed=2,
                      system_prompt=system_prompt, engine="forced")
        t = train.trajectory_tensors(r.trajectories, tok.pad_token_id, device)
        old = train.recompute_old_logp(model, t, cfg.mini_batches * cfg.grad_accum)
        report.add(("bf16 old log-prob gap", logp_gap(t, old)))
    report.write([f"peak_gib={max(PEAKS):.2f}"])


if __name__ == "__main__":
    main()
