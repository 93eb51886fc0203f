"""The command lines of train.py and eval.py, checked before anything slow is imported.

    $ python train.py --k 0
    error: --k 0: must be at least 1 ([k] trajectories per question (group size))

train.py and eval.py call `train_config(argv)` / `eval_config(argv)` before they import torch
(seconds of start-up), so a bad flag, a missing path or a malformed dataset stops in about a second
with one line on stderr, exit status 1, no traceback, and nothing written. What is checked:
- every flag and value: unknown flags, types, choices, ranges, finite numbers (aepo.parse_config);
- paths: --output_dir is not a file; --resume finds something to continue; --model, --init_from,
  --adapter, --judge_model and --search_corpus exist when they name local paths;
- data: every dataset the run will read is loaded once here, so a bad row stops the run before SFT.
Not checked here: a hub model id, which policy.load_policy checks (fast, offline) when it loads it.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import data
import loaders
import world
from aepo import Config, _explicit_fields, one_line_errors, parse_config, resolve


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


def check_run_folder(folder: str, resume: bool) -> None:
    run = Path(folder)
    if run.exists() and not run.is_dir():
        fail(f"--output_dir {folder} is a file; "
             "give a folder name (the run writes its files there)")
    done = (any((c / "state.pt").is_file() for c in run.glob("checkpoint-*"))
            or (run / "sft").is_dir())
    if resume and not done:
        fail(f"--resume: {folder} holds no checkpoint-<step>/ or sft/ to continue from; drop "
             "--resume to start a new run")


# --------------------------------------------------------------------------------------------------
# train.py


def train_config(argv: list[str] | None = None) -> Config:
    """train.py's flags as a Config, after checking everything the run will read."""
    cfg = parse_config(argv)
    check_run_folder(cfg.output_dir, cfg.resume)
    check_model(cfg.model, "--model")
    check_model(cfg.init_from, "--init_from")
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
    return cfg


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
    explicit = _explicit_fields(rest)
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
    return args, cfg, examples
