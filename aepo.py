"""The shared vocabulary of the project: the configuration, the trajectory type, and the pure
entropy and branching rules of AEPO (arXiv 2510.14545: "Entropy Pre-Monitoring" and
"Entropy-Balanced Adaptive Rollout") and of ARPO (arXiv 2507.19849: entropy-based adaptive rollout).
Imports nothing of the project. Each Config field declares its type (Literal[...] for a choice),
default, help and bounds ({"min": 1}, {"max": 1}, {"positive": True}); support/cli.py builds the
command line from them, checks them, and applies the recipe (`python -m support.cli --preset tiny`
prints the resolved configuration).

    from aepo import Config, global_budget
    cfg = Config(model="tiny")
    global_budget(cfg.k, h_root=0.3, h_tool=0.1, beta=cfg.beta)     # AEPO's m

Deviations from the released AEPO code (each also listed in the README):
  1. Token entropy is exact over the full vocabulary; the released code estimated it from the top-10
     log-probs.
  2. The entropy pre-monitoring probe is an ordinary global sample, counted as the first of the m
     global rollouts; the released code ran a separate probe and threw it away.
  3. All entropy state (H_init, the consecutive-branch streak l) is reset at the start of each
     rollout call; the released code carried it across batches by accident.
  4. LoRA adapters (optionally on a 4-bit NF4 base) instead of a full fine-tune, so the learning
     rate is larger than the released 1e-6.
  5. The step entropy of a branch decision is taken on the first w tokens sampled after the tool
     result, as the paper defines it (Config.step_entropy); the released code used the segment that
     made the call. The streak l is per path (the paper's wording), not per question.
  6. The budget m keeps the released rounding, floor(k sigmoid(.)) + 1 (the paper: k sigmoid(.)).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """Every hyperparameter of a run. Paper symbols in brackets; defaults are the `tiny` CPU
    demo."""

    # --- run ---
    preset: str = field(default="tiny", metadata={
        "help": "Named overrides: tiny | class | smoke | smollm2-135m | qwen3-1.7b."})
    algo: str = field(default="aepo", metadata={
        "help": "Algorithm preset (README table): " + " | ".join(
            ["grpo", "dapo", "reinforce_pp", "gppo", "cispo", "arpo", "aepo",
             "aepo_no_pre_monitor", "aepo_no_penalty", "aepo_ppo_clip", "aepo_no_entropy_adv",
             "aepo_no_dynamic_rollout", "aepo_no_balanced_update"])})
    output_dir: str = field(default="", metadata={
        "help": "Run folder; default runs/<timestamp>-<algo>."})
    seed: int = field(default=0, metadata={
        "help": "Seed of everything; per-step seeds derive from it."})
    stage: Literal["sft", "rl", "all"] = field(default="all", metadata={
        "help": "sft, then rl, then eval (all) or one of them."})
    resume: bool = field(default=False, metadata={
        "help": "Continue from output_dir's last checkpoint."})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: all cores).", "min": 0})

    # --- policy ---
    model: str = field(default="tiny", metadata={
        "help": "tiny | hub id | alias (Qwen3-1.7B) | local folder."})
    init_from: str = field(default="", metadata={
        "help": "RL start: a model folder or adapter, or cached-sft (the tiny policy after the "
                "default SFT, built once per machine); default output_dir/sft."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "bitsandbytes NF4 base (QLoRA); CUDA only."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on all linear layers.", "min": 0})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator.", "min": 1})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Trade compute for memory."})

    # --- data and tools ---
    dataset: str = field(default="world:train", metadata={
        "help": "RL questions: world:train | file | hub id."})
    eval_dataset: str = field(default="world:heldout", metadata={
        "help": "Held-out questions for eval."})
    sft_dataset: str = field(default="world", metadata={
        "help": "Demonstrations: world (built-in) | jsonl."})
    system_prompt: Literal["short", "paper"] = field(default="short", metadata={
        "help": "short (the tiny model's) | paper (the released prompt)."})
    search: Literal["bm25", "web"] = field(default="bm25", metadata={
        "help": "bm25 (a local corpus) | web (ddgs)."})
    search_corpus: str = field(default="", metadata={
        "help": "jsonl corpus for bm25; default the world's docs."})
    search_cache: str = field(default="", metadata={
        "help": "JSON query cache file ('' = no cache)."})
    top_k: int = field(default=2, metadata={
        "help": "Search results per query (released: 10).", "min": 1})
    snippet_chars: int = field(default=1000, metadata={
        "help": "Characters per search snippet.", "min": 1})
    python_timeout_s: float = field(default=5.0, metadata={
        "help": "Python sandbox wall-clock limit.", "positive": True})
    unsafe_python: bool = field(default=False, metadata={
        "help": "UNSAFE: run model-written Python even where no sandbox isolation is available "
                "(it then runs as you, with your files)."})
    search_timeout_s: float = field(default=20.0, metadata={
        "help": "Bound on one web query's wall time, every engine and retry included; past it "
                "the model reads 'Search failed'."})

    # --- rollout (arXiv 2510.14545: dynamic entropy-balanced rollout) ---
    k: int = field(default=8, metadata={
        "help": "[k] trajectories per question (group size).", "min": 1})
    global_rollouts: int = field(default=4, metadata={
        "help": "[m] global rollouts when not pre-monitored.", "min": 1})
    branching: bool = field(default=True, metadata={
        "help": "ARPO entropy-guided branching at tool results."})
    pre_monitor: bool = field(default=True, metadata={
        "help": "AEPO (a): entropy pre-monitoring sets m."})
    branch_penalty: bool = field(default=True, metadata={
        "help": "AEPO (b): consecutive-branch penalty."})
    branch_z: int = field(default=2, metadata={
        "help": "[Z] paths per branch point (Z-1 children).", "min": 1})
    step_entropy: Literal["after_result", "before_result"] = field(
        default="after_result", metadata={
            "help": "Where the step entropy H_t of a branch decision is taken: after_result (the "
                    "paper, ARPO sec. 3.1: the first w tokens sampled after tool result t; "
                    "children sample again from right after it) | before_result (the released "
                    "code: the segment that made the call, so Delta H is 0 at every first call)."})
    tau: float = field(default=0.5, metadata={
        "help": "[tau] branch threshold.", "min": 0, "max": 1})
    gamma: float = field(default=0.2, metadata={"help": "[gamma] weight of the entropy change."})
    beta: float = field(default=0.5, metadata={"help": "[beta] pre-monitoring sigmoid slope."})
    branch_penalty_rate: float = field(default=0.05, metadata={
        "help": "[penalty] of the consecutive-branch penalty: c = max(0, 1 - penalty * l), l the "
                "path's streak of branching steps.", "min": 0})
    entropy_window: int = field(default=20, metadata={
        "help": "[w] tokens in a segment entropy.", "min": 1})
    call_limit: int = field(default=3, metadata={
        "help": "Tool calls per trajectory (then forced EOS).", "min": 0})
    max_prompt_tokens: int = field(default=256, metadata={
        "help": "Longer prompts are cut from the left.", "min": 1})
    max_response_tokens: int = field(default=256, metadata={
        "help": "Response budget incl. tool results.", "min": 1})
    segment_tokens: int = field(default=64, metadata={
        "help": "Max new tokens per generate call.", "min": 1})
    max_rounds: int = field(default=12, metadata={
        "help": "Generate rounds per trajectory (a branch counts its parent's); then it is cut.",
        "min": 1})
    rollout_questions: int = field(default=0, metadata={
        "help": "Questions rolled out together in one batch (0: all, or on a GPU as many as "
                "memory.py's upper bound fits in the free memory); bounds the rollout's KV cache."})
    temperature: float = field(default=1.0, metadata={
        "help": "Rollout sampling temperature.", "positive": True})

    # --- update (arXiv 2510.14545: entropy-balanced policy optimization) ---
    adv_estimator: Literal["grpo", "reinforce_pp"] = field(default="grpo", metadata={
        "help": "Group baseline (grpo) or batch baseline (reinforce_pp)."})
    entropy_adv_alpha: float = field(default=0.2, metadata={
        "help": "[alpha] entropy-aware advantage (0: off).", "min": 0})
    clip_mode: Literal["ppo", "gppo", "cispo", "aepo"] = field(default="aepo", metadata={
        "help": "The surrogate's clip (loss.py: policy_loss)."})
    eps_low: float = field(default=0.2, metadata={
        "help": "[eps_low] lower clip.", "min": 0, "max": 1})
    eps_high: float = field(default=0.2, metadata={
        "help": "[eps_high] upper clip (DAPO: 0.28).", "min": 0})
    dual_clip: float = field(default=3.0, metadata={"help": "[c] dual clip for A < 0.", "min": 1})
    kl_coef: float = field(default=0.0, metadata={
        "help": "k3 KL to the adapter-free reference (0: off).", "min": 0})
    recompute_old_logp: bool = field(default=False, metadata={
        "help": "Recompute old log-probs with a forward pass instead of reusing the rollout's."})
    steps: int = field(default=40, metadata={
        "help": "RL steps (rollout batch + one update epoch).", "min": 1})
    token_budget: int = field(default=0, metadata={
        "help": "Stop RL after the step whose rollouts bring the sampled tokens to this many "
                "(0: run --steps).", "min": 0})
    questions_per_step: int = field(default=8, metadata={
        "help": "Prompts per rollout batch.", "min": 1})
    mini_batches: int = field(default=2, metadata={
        "help": "Mini-batches per step and epoch.", "min": 1})
    epochs: int = field(default=1, metadata={
        "help": "Passes over each rollout batch (released: 1); later mini-batches and epochs are "
                "off-policy, which is where clipping acts.", "min": 1})
    grad_accum: int = field(default=1, metadata={
        "help": "Micro-batches per mini-batch (memory).", "min": 1})
    lr: float = field(default=1e-3, metadata={
        "help": "AdamW learning rate on LoRA parameters.", "positive": True})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay.", "min": 0})
    grad_clip: float = field(default=1.0, metadata={
        "help": "Global gradient-norm clip.", "positive": True})

    # --- cold-start SFT ---
    sft_steps: int = field(default=1000, metadata={"help": "SFT optimizer steps.", "min": 1})
    sft_batch: int = field(default=16, metadata={"help": "Demonstrations per SFT step.", "min": 1})
    sft_lr: float = field(default=3e-3, metadata={
        "help": "SFT learning rate (full fine-tune for tiny).", "positive": True})
    sft_demos: int = field(default=4000, metadata={
        "help": "Built-in demonstrations to generate.", "min": 1})
    sft_bad_fraction: float = field(default=0.4, metadata={
        "help": "Share of imperfect demonstrations.", "min": 0, "max": 1})

    # --- logging, checkpoints, evaluation ---
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N RL steps.", "min": 1})
    sample_every: int = field(default=10, metadata={
        "help": "Dump sample trajectories every N steps.", "min": 1})
    eval_runs: int = field(default=4, metadata={
        "help": "Runs per held-out question (Pass@k).", "min": 1})
    eval_limit: int = field(default=0, metadata={
        "help": "First N held-out questions (0: all).", "min": 0})
    eval_temperature: float = field(default=1.0, metadata={
        "help": "Eval sampling temperature.", "positive": True})
    eval_top_p: float = field(default=1.0, metadata={
        "help": "Eval nucleus sampling.", "max": 1, "positive": True})
    report_to: Literal["none", "tensorboard", "wandb"] = field(default="none", metadata={
        "help": "Live curves besides curves.png (tensorboard offline: tensorboard --logdir runs)."})


PRESETS: dict[str, dict] = {
    "tiny": {},
    # A lab session: RL only, from the cached SFT start, 7-10 minutes on 2 CPU cores (README: the
    # class)
    # Off-policy updates where clipping acts: 8 mini-batches (the paper's ratio) x 3 epochs per
    # rollout batch at half the demo's lr. One epoch clips about 0.2% of the tokens here, 3 epochs
    # about 1-2%; 16 x 2 at lr 1e-3 clipped more and collapsed GRPO within 12 steps.
    "class": dict(init_from="cached-sft", sft_dataset="", steps=40, token_budget=60_000,
                  save_every=40, sample_every=5, mini_batches=8, epochs=3, lr=5e-4),
    # A real pretrained LM on a CPU (benchmarks/smollm2.py; README: a real LM): SmolLM2-135M-Instruct,
    # a short LoRA SFT, then RL at a rate that keeps its format (1e-3 broke it within 2 steps);
    # 46-47 min a seed, two seeds at once on 2 cores (cores partly shared); one search
    # page per call keeps responses under 384 tokens
    "smollm2-135m": dict(model="smollm2-135m", system_prompt="short", top_k=1, sft_demos=400,
                         sft_steps=32, sft_batch=4, sft_lr=3e-3, steps=12, questions_per_step=4,
                         k=4, global_rollouts=2, max_response_tokens=384, segment_tokens=64,
                         lr=3e-4, eval_limit=64, eval_runs=4, save_every=4, sample_every=2),
    "smoke": dict(sft_steps=30, sft_demos=200, steps=2, questions_per_step=2, k=4,
                  global_rollouts=2, save_every=1, sample_every=1, eval_limit=8, eval_runs=2,
                  max_response_tokens=128),
    "qwen3-1.7b": dict(model="Qwen3-1.7B", load_in_4bit=True, system_prompt="paper", search="web",
                       search_cache="search_cache.json",
                       dataset="dongguanting/ARPO-RL-DeepSearch-1K",
                       eval_dataset="", sft_dataset="", stage="rl", top_k=10, k=8,
                       global_rollouts=4, call_limit=6, max_prompt_tokens=2000,
                       max_response_tokens=4096, segment_tokens=512, max_rounds=16,
                       questions_per_step=4, mini_batches=4, grad_accum=4,
                       gradient_checkpointing=True, lr=1e-5, lora_r=32, lora_alpha=64,
                       steps=200, eval_temperature=0.6, eval_top_p=0.95, eval_runs=5,
                       # memory (python -m support.memory): rollout_questions 0 rolls out as many
                       # questions together as the upper bound fits in the free GPU memory (1 on
                       # 24-39 GB); old log-probs recomputed (bf16 gap: README)
                       rollout_questions=0, recompute_old_logp=True),
}

# Each algorithm is a handful of switches; each switch gates one code site (rollout.py or loss.py).
ALGOS: dict[str, dict] = {
    "grpo": dict(branching=False, pre_monitor=False, branch_penalty=False, adv_estimator="grpo",
                 entropy_adv_alpha=0.0, clip_mode="ppo", eps_high=0.2),
    "dapo": dict(branching=False, pre_monitor=False, branch_penalty=False, adv_estimator="grpo",
                 entropy_adv_alpha=0.0, clip_mode="ppo", eps_high=0.28),
    "reinforce_pp": dict(branching=False, pre_monitor=False, branch_penalty=False,
                         adv_estimator="reinforce_pp", entropy_adv_alpha=0.0, clip_mode="ppo"),
    "gppo": dict(branching=False, pre_monitor=False, branch_penalty=False, adv_estimator="grpo",
                 entropy_adv_alpha=0.0, clip_mode="gppo"),
    "cispo": dict(branching=False, pre_monitor=False, branch_penalty=False, adv_estimator="grpo",
                  entropy_adv_alpha=0.0, clip_mode="cispo"),
    "arpo": dict(branching=True, pre_monitor=False, branch_penalty=False, adv_estimator="grpo",
                 entropy_adv_alpha=0.0, clip_mode="ppo"),
    "aepo": dict(branching=True, pre_monitor=True, branch_penalty=True, adv_estimator="grpo",
                 entropy_adv_alpha=0.2, clip_mode="aepo"),
    "aepo_no_dynamic_rollout": dict(branching=True, pre_monitor=False, branch_penalty=False,
                                    adv_estimator="grpo", entropy_adv_alpha=0.2, clip_mode="aepo"),
    "aepo_no_balanced_update": dict(branching=True, pre_monitor=True, branch_penalty=True,
                                    adv_estimator="grpo", entropy_adv_alpha=0.0, clip_mode="ppo"),
}
# AEPO with one mechanism removed at a time (benchmarks/reproduce.py)
ALGOS |= {name: {**ALGOS["aepo"], **change} for name, change in {
    "aepo_no_pre_monitor": dict(pre_monitor=False), "aepo_no_penalty": dict(branch_penalty=False),
    "aepo_ppo_clip": dict(clip_mode="ppo"), "aepo_no_entropy_adv": dict(entropy_adv_alpha=0.0),
}.items()}


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# The trajectory type: everything the loss and the logs need, token ids carried end to end


@dataclass
class Trajectory:
    question_idx: int                 # which question of the rollout batch (the advantage group)
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)   # sampled tokens and tool-result tokens
    loss_mask: list[int] = field(default_factory=list)      # 1 iff the policy sampled the token
    logp: list[float] = field(default_factory=list)     # log pi_old(token), T = 1; 0 on tool tokens
    # exact token entropy (nats); 0 on tool tokens
    entropy: list[float] = field(default_factory=list)
    text: str = ""                    # decoded response, tool results included
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)  # (tool, input, result)
    traj_id: int = 0                  # unique within the rollout call
    parent_id: int | None = None      # the trajectory it branched from
    is_global: bool = True            # started from the question (not a branch)
    is_duplicate: bool = False        # a copy that pads a question short of k trajectories
    finish: str = ""                  # eos | call_limit | length | rounds | malformed
    seg_entropy: list[float] = field(default_factory=list)  # segment entropies, in order
    rounds: int = 0  # generate rounds that produced its tokens (a branch counts its parent's)


# --------------------------------------------------------------------------------------------------
# Pure rules. No model, no config: numbers in, numbers out.


def segment_entropy(token_entropies, w: int, vocab_size: int) -> float:
    """Step entropy of a segment (ARPO and AEPO, released convention: the first w sampled tokens of
    the segment, each token entropy normalised by log|V|): sum_{t < w} H_t / log|V|."""
    # >>> solution A1
    head = [float(h) for h in list(token_entropies)[:w]]
    return sum(head) / math.log(vocab_size)
    # <<< solution


def arpo_branch_probability(delta_h: float, tau: float, gamma: float) -> float:
    """ARPO's entropy-based branching (arXiv 2507.19849, sec. 3.1): the probability that one draw
    of `arpo_should_branch` branches, P = clip(tau + gamma * delta_h, 0, 1) for 0 <= tau < 1 (the
    clip inside the rule makes it 0 for tau < 0 and 1 for tau >= 1)."""
    # >>> solution A1
    if tau < 0 or tau >= 1:
        return float(tau >= 1)
    return min(1.0, max(0.0, tau + gamma * delta_h))
    # <<< solution


def arpo_should_branch(u: float, delta_h: float, tau: float, gamma: float) -> bool:
    """One draw of the ARPO rule: branch iff clip(u - gamma * delta_h, 0, 1) <= tau, u ~ U(0, 1)."""
    # >>> solution A1
    return min(1.0, max(0.0, u - gamma * delta_h)) <= tau
    # <<< solution


def aepo_branch_probability(delta_h: float, tau: float, gamma: float, l: int,
                            penalty: float = 0.05) -> float:
    """AEPO's consecutive-branch penalty (arXiv 2510.14545, Entropy-Balanced Adaptive Rollout): the
    probability that one draw of `aepo_should_branch` branches. With c = max(0, 1 - penalty * l):
    P = clip(1 + gamma * delta_h - tau / c, 0, 1) for 0 < tau <= 1; 1 for tau <= 0; 0 for
    tau > 1; and 0 when c = 0 (after 1 / penalty consecutive branch steps, none)."""
    # >>> solution A1
    c = max(0.0, 1.0 - penalty * l)
    if c == 0.0 or tau > 1:
        return 0.0
    if tau <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 + gamma * delta_h - tau / c))
    # <<< solution


def aepo_should_branch(u: float, delta_h: float, tau: float, gamma: float, l: int,
                       penalty: float = 0.05) -> bool:
    """One draw of the AEPO rule: branch iff clip((u + gamma * delta_h) * c, 0, 1) >= tau, and never
    when the penalty has taken c to 0."""
    # >>> solution A1
    c = max(0.0, 1.0 - penalty * l)
    return c > 0 and min(1.0, max(0.0, (u + gamma * delta_h) * c)) >= tau
    # <<< solution


def global_budget(k: int, h_root: float, h_tool: float, beta: float) -> int:
    """AEPO's Entropy Pre-Monitoring (arXiv 2510.14545; the released formula):
    m = clamp(floor(k * sigmoid(beta * (h_root - h_tool))) + 1, 1, k). More uncertainty at the root
    than after tools -> more global samples."""
    # >>> solution A1
    m = math.floor(k / (1.0 + math.exp(-beta * (h_root - h_tool)))) + 1
    return max(1, min(k, m))
    # <<< solution


Tools = dict[str, Callable[[str], str]]   # tool name -> function(input text) -> result text
