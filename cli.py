"""The command lines of train.py and eval.py, checked before anything slow is imported.

    $ python train.py --k 0
    error: --k 0: must be at least 1 ([k] trajectories per question (group size))

train.py and eval.py call `train_config(argv)` / `eval_config(argv)` before they import torch
(seconds of start-up), so a bad flag, a missing path or a malformed dataset stops in about a second
with one line on stderr, exit status 1, no traceback, and nothing written. What is checked:
- every flag and value: unknown flags, types, choices, ranges, finite numbers (parse_config);
- the recipe (resolve): --preset, else the model family's; then --algo; explicit flags win;
- paths: --output_dir is not a file; --resume finds something to continue; --model, --init_from,
  --adapter, --judge_model and --search_corpus exist when they name local paths;
- data: every dataset the run will read is loaded once here, so a bad row stops the run before SFT;
  so is the --search_cache file;
- the Python tool: a run that uses it (RL, evaluation) stops here, with the cause, where the sandbox
  would refuse every call (sandbox.check_python_tool), not when RL first calls it after the SFT.
A hub model id (owner/name) must have its config.json in the cache or on the hub (a few KB, no
torch): a bogus id stops here, before the run folder is written.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import data
import loaders
import sandbox
import tools
import world
from checkpoint import checkpoints
from aepo import ALGOS, PRESETS, Config

# --------------------------------------------------------------------------------------------------
# Config's flags: parse, check every value, pick the recipe


def parse_config(argv: list[str] | None = None) -> Config:
    """CLI -> Config. Precedence: dataclass defaults < --preset < --algo < flags given explicitly.
    A bad flag or value stops with one line on stderr (no usage block, no traceback)."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    parser = one_line_errors(HfArgumentParser(Config, allow_abbrev=False))
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise SystemExit(f"error: unknown arguments {' '.join(unknown)} "
                         f"(python {parser.prog} --help lists the flags)")
    return resolve(cfg, explicit=explicit_flags(argv))


def one_line_errors(parser):
    """argparse answers a bad flag with a usage block and exit status 2; make it one line naming
    the fix."""
    def error(message: str):
        raise SystemExit(f"error: {message} (python {parser.prog} --help lists the flags)")
    parser.error = error
    return parser


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The fields a command line names (--k 4 and --k=4 both give k, and --no_branching names
    branching); resolve leaves them alone."""
    argv = sys.argv[1:] if argv is None else argv
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    fields = set(Config.__dataclass_fields__)
    return {n[3:] if n.startswith("no_") and n not in fields and n[3:] in fields else n
            for n in names}


# What a field may hold; checked in resolve, so a bad value stops before any work. Every number must
# also be finite; a field named nowhere here may hold any finite value.
CHOICES = {"stage": ("sft", "rl", "all"), "report_to": ("none", "tensorboard", "wandb"),
           "step_entropy": ("after_result", "before_result"), "search": ("bm25", "web"), "system_prompt": ("short", "paper"),
           "adv_estimator": ("grpo", "reinforce_pp"), "clip_mode": ("ppo", "gppo", "cispo", "aepo")}
AT_LEAST = {name: 1 for name in (
    "k", "global_rollouts", "branch_z", "entropy_window", "max_prompt_tokens",
    "max_response_tokens", "segment_tokens", "max_rounds", "steps", "questions_per_step",
    "mini_batches", "epochs", "grad_accum", "sft_steps", "sft_batch", "sft_demos", "save_every",
    "sample_every", "eval_runs", "top_k", "snippet_chars", "lora_alpha")}
AT_LEAST |= {name: 0 for name in (
    "threads", "token_budget", "lora_r", "call_limit", "eval_limit", "weight_decay", "kl_coef",
    "entropy_adv_alpha", "penalty", "eps_low", "eps_high", "tau", "sft_bad_fraction")}
AT_LEAST["dual_clip"] = 1
AT_MOST = {"tau": 1, "eps_low": 1, "sft_bad_fraction": 1, "eval_top_p": 1}
POSITIVE = ("lr", "sft_lr", "temperature", "eval_temperature", "eval_top_p", "grad_clip",
            "python_timeout_s")


def config_errors(cfg: Config) -> list[str]:
    """What is wrong with a configuration's values, one short line per field (empty: nothing)."""
    errors = []
    for f in dataclasses.fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number"
        elif name in CHOICES and value not in CHOICES[name]:
            problem = f"must be one of {' | '.join(CHOICES[name])}"
        elif name in AT_LEAST and value < AT_LEAST[name]:
            problem = f"must be at least {AT_LEAST[name]}"
        elif name in AT_MOST and value > AT_MOST[name]:
            problem = f"must be at most {AT_MOST[name]}"
        elif name in POSITIVE and value <= 0:
            problem = "must be above 0"
        else:
            continue
        meaning = "" if name in CHOICES else f" ({f.metadata.get('help', '').rstrip('.')})"
        errors.append(f"--{name} {value}: {problem}{meaning}")
    return errors


# The recipe a model gets when no --preset is given: model name prefix (lower case, hub owner
# dropped) -> preset. Everything else keeps the default, the tiny CPU recipe.
MODEL_PRESETS: dict[str, str] = {"qwen3-": "qwen3-1.7b"}


def pick_preset(cfg: Config, explicit: set[str]) -> tuple[str, str]:
    """(preset, why): the explicit --preset, else the recipe of the model's family, else
    cfg.preset."""
    if "preset" in explicit or cfg.preset != Config.preset:
        return cfg.preset, "--preset given"
    name = cfg.model.split("/")[-1].lower()
    for prefix, preset in MODEL_PRESETS.items():
        if name.startswith(prefix):
            family = cfg.model.split("/")[-1][:len(prefix) - 1]
            return preset, f"--model {cfg.model} is a {family} model and no --preset was given"
    return cfg.preset, (f"the default for --model {cfg.model}; Qwen3 models get qwen3-1.7b "
                        "(one CUDA GPU)")


def resolve(cfg: Config, explicit: set[str] = frozenset(), device_check: bool = True) -> Config:
    """Pick the recipe (pick_preset; one line says which and why), then apply the preset and the
    algorithm's switches, leaving explicitly given fields alone. A 4-bit recipe without CUDA stops
    (device_check=False: for tools that only read the config, like memory.py)."""
    preset, why = pick_preset(cfg, explicit)
    if preset not in PRESETS:
        raise SystemExit(f"--preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    if cfg.algo not in ALGOS:
        raise SystemExit(f"--algo {cfg.algo!r} is unknown; choose one of {sorted(ALGOS)}")
    overrides = {**PRESETS[preset], **ALGOS[cfg.algo]}
    cfg = dataclasses.replace(cfg, preset=preset,
                              **{k: v for k, v in overrides.items() if k not in explicit})
    if errors := config_errors(cfg):
        raise SystemExit(f"error: {'; '.join(errors)}")
    print(f"recipe: {preset} ({why})")
    if device_check and cfg.load_in_4bit and not _cuda():
        raise SystemExit(f"recipe {preset} needs a CUDA GPU (it loads {cfg.model} in 4-bit; "
                         f"memory: python memory.py --preset {preset}) and this machine has none: "
                         "on CPU run python train.py --preset tiny (the built-in world) or "
                         "--model smollm2-135m (a real 135M LM)")
    if not cfg.output_dir:
        import time

        cfg.output_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.algo}"
    return cfg


def _cuda() -> bool:
    import torch  # here, not at the top: a bad flag must stop before torch's seconds of start-up

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Paths and data


def fail(message) -> None:
    """Stop with one line on stderr and exit status 1."""
    raise SystemExit("error: " + " ".join(str(message).split()))


def _load(flag: str, load, *args):
    """A loader's result; its error (a bad row, a missing file, the hub unreachable) becomes the one
    line."""
    try:
        return load(*args)
    except (ValueError, TypeError, OSError) as e:     # OSError: missing, a folder, ConnectionError
        fail(f"{flag}: {e}")


def check_model(name: str, flag: str) -> None:
    """A name that can only be a local path (./x, /x, ~/x, a/b/c, x/) must be an existing folder."""
    if not name or name == "tiny" or Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        fail(f"{flag} {name}: no such folder")
    if name.count("/") == 1:  # a hub id: its config.json must be cached or come (a few KB)
        from huggingface_hub import hf_hub_download  # no torch: a fraction of a second

        try:
            hf_hub_download(name, "config.json")
        except (OSError, ValueError) as error:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                fail(f"{flag} {name}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                     "unset it on a machine with internet (the model downloads once), or use "
                     "--model tiny")
            fail(f"{flag} {name}: not a model the Hugging Face hub serves here "
                 f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")


def check_run_folder(folder: str, resume: bool) -> None:
    run = Path(folder)
    if run.exists() and not run.is_dir():
        fail(f"--output_dir {folder} is a file; "
             "give a folder name (the run writes its files there)")
    done = bool(checkpoints(run)) or (run / "sft").is_dir()
    if resume and not done:
        fail(f"--resume: {folder} holds no checkpoint-<step>/ or sft/ to continue from; drop "
             "--resume to start a new run")
    # a new run would mix its log with this one
    if not resume and (run / "metrics.jsonl").exists():
        fail(f"--output_dir {folder} already holds an RL run (metrics.jsonl); pass --resume to "
             "continue it, or give a new --output_dir")


# --------------------------------------------------------------------------------------------------
# train.py


def train_config(argv: list[str] | None = None) -> Config:
    """train.py's flags as a Config, after checking everything the run will read."""
    cfg = parse_config(argv)
    check_run_folder(cfg.output_dir, cfg.resume)
    check_model(cfg.model, "--model")
    check_model(cfg.init_from, "--init_from")
    if cfg.init_from == "cached-sft" and cfg.model != "tiny":
        fail(f"--init_from cached-sft is the tiny policy's SFT start; --model {cfg.model} needs "
             "its own SFT (drop --init_from) or a folder of it (--init_from runs/x/sft)")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        fail(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed "
             f"(pip install {cfg.report_to})"
             f"{'; --report_to tensorboard works offline' if cfg.report_to == 'wandb' else ''}")
    if cfg.search_corpus and not Path(cfg.search_corpus).is_file():
        fail(f"--search_corpus {cfg.search_corpus}: no such file")
    if cfg.stage in ("rl", "all"):
        _load("--dataset", world.load_examples, cfg.dataset)
    if cfg.stage == "all" and cfg.eval_dataset:
        _load("--eval_dataset", world.load_examples, cfg.eval_dataset, cfg.eval_limit or None)
    if cfg.stage in ("sft", "all") and cfg.sft_dataset not in ("", "world"):
        _load("--sft_dataset", loaders.load_demos, cfg.sft_dataset)
    if cfg.stage in ("rl", "all"):
        check_tools(cfg)
    return cfg


def check_tools(cfg: Config) -> None:
    """The search cache file reads (a file, valid JSON, text values) and the Python tool will run
    model-written code."""
    if cfg.search_cache:
        _load("--search_cache", tools.CachedSearch, None, cfg.search_cache)
    try:
        sandbox.check_python_tool(cfg.unsafe_python)
    except SystemExit as refused:
        fail(str(refused.code).removeprefix("error: "))


# --------------------------------------------------------------------------------------------------
# eval.py


@dataclass
class EvalArgs:
    """Eval-only flags; the rest (model, search, budgets, seed) are Config's."""

    dataset: list[str] = field(default_factory=list, metadata={
        "help": "jsonl | parquet | world:heldout | hub id; repeat the flag for several.",
        "action": "extend"})
    adapter: str = field(default="",
                         metadata={"help": "A PEFT adapter folder (runs/x/checkpoint-40)."})
    runs: int = field(default=5,
                      metadata={"help": "Independent samples per question (the k of Pass@k)."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (paper: 0.6)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling (paper: 0.95)."})
    limit: int = field(default=0, metadata={"help": "First N questions of each dataset (0: all)."})
    batch_questions: int = field(default=16, metadata={"help": "Questions per rollout call."})
    judge_model: str = field(default="",
                             metadata={"help": "Local HF causal LM as a judge ('' = off)."})
    output_dir: str = field(default="",
                            metadata={"help": "Results folder; default runs/eval-<timestamp>."})


def parse_eval_args(argv: list[str] | None = None) -> tuple[EvalArgs, Config]:
    """EvalArgs flags first; the remaining flags are Config's (preset < algo < explicit flags)."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    parser = one_line_errors(HfArgumentParser(
        EvalArgs, allow_abbrev=False, epilog="Every Config flag (python aepo.py --help) also "
        "applies: --preset, --search, --top_k, --call_limit, ..."))
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    cfg, unknown = (one_line_errors(HfArgumentParser(Config, allow_abbrev=False))
                    .parse_args_into_dataclasses(args=rest, return_remaining_strings=True))
    if unknown:
        fail(f"unknown arguments {' '.join(unknown)}: "
             "see python eval.py --help and python aepo.py --help")
    problems = [f"--{name} {getattr(args, name)}: must be at least {least}"
                for name, least in (("runs", 1), ("limit", 0), ("batch_questions", 1))
                if getattr(args, name) < least]
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.append(f"--temperature {args.temperature}: must be a finite number above 0")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p {args.top_p}: must be above 0 and at most 1")
    if not args.dataset:
        problems.append("give at least one --dataset "
                        "(a .jsonl or .parquet file, world:heldout, or a hub id)")
    if problems:
        fail("; ".join(problems))
    explicit = explicit_flags(rest)
    return args, resolve(cfg, explicit)      # the recipe, prompt included, train.py would pick


def eval_config(argv: list[str] | None = None) -> tuple[EvalArgs, Config, list[data.Example]]:
    """eval.py's flags and the questions they name, after checking every path."""
    args, cfg = parse_eval_args(argv)
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file; "
             "give a folder name (results are written there)")
    if args.adapter and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        where = ("is not a PEFT adapter folder (no adapter_config.json)"
                 if Path(args.adapter).is_dir() else "no such folder")
        fail(f"--adapter {args.adapter}: {where}")
    check_model(cfg.model, "--model")
    check_model(args.judge_model, "--judge_model")
    examples = [ex for spec in args.dataset
                for ex in _load("--dataset", world.load_examples, spec, args.limit or None)]
    check_tools(cfg)
    return args, cfg, examples
