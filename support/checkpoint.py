"""Checkpoints that a kill cannot break: every folder is written under a temporary name and renamed
once complete, so `--resume` always finds whole checkpoints, and the log lines of steps after the
newest checkpoint are dropped before those steps are redone. Torch is imported only to save and
load, so cli.py can look for checkpoints before anything slow is imported.

    save_checkpoint(run, step, model, opt)      # run/checkpoint-<step>/: adapter, optimizer, RNG
    step = resume(run, model, opt)              # --resume: the next step; later log lines dropped
    print(interrupted(run))                     # Ctrl-C: one line, what was kept and how to go on
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def atomic_save(folder: Path, write) -> None:
    """Call write(tmp) on a fresh temporary folder, then rename it to `folder` (replacing an older
    one): a reader sees the old folder or the new one, never half of one."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run: Path, step: int, model, opt, keep: int = 2) -> None:
    """run/checkpoint-<step>: the adapter (or model), the optimizer and the torch RNG; keeps the
    newest `keep` checkpoints."""
    import torch

    def write(tmp: Path):
        model.save_pretrained(tmp)
        state = {"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
        torch.save(state, tmp / "state.pt")
    atomic_save(run / f"checkpoint-{step}", write)
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once fully written)."""
    done = [p for p in Path(run).glob("checkpoint-*") if (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(ckpt: Path, model, opt) -> int:
    """Restore a save_checkpoint folder into the model's adapter and the optimizer; returns the next
    step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / "state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"] + 1


def truncate_logs(run: Path, next_step: int) -> None:
    """Drop log lines of steps after the checkpoint: they are about to be redone."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run / name
        if path.exists():
            keep = [line for line in open(path) if json.loads(line)["step"] < next_step]
            path.write_text("".join(keep))


def resume(run: Path, model, opt, truncate: bool = True) -> int:
    """--resume: restore the newest complete checkpoint, if any, and (truncate: in the one process
    that writes the logs) drop the log lines of every step after it, all of them when there is none:
    a run killed before its first checkpoint starts its log again, never appends to it. Returns the
    next step."""
    found = checkpoints(run)
    start = load_checkpoint(found[-1], model, opt) if found else 0
    if truncate:
        truncate_logs(run, start)
    return start


def interrupted(run: Path) -> str:
    """The one line for a run stopped by Ctrl-C: what its folder keeps, and how to continue."""
    run, found = Path(run), checkpoints(run)
    if found:
        kept = f"{found[-1].name} (RL goes on at step {int(found[-1].name.split('-')[1]) + 2})"
    elif (run / "sft").is_dir():
        kept = "the SFT (sft/); RL starts again at step 1"
    else:
        return (f"interrupted: {run} holds no checkpoint and no SFT to continue from; delete it or "
                "give a new --output_dir")
    return f"interrupted: {run} keeps {kept}; rerun the same command with --resume to continue"
