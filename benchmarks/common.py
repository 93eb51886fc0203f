"""Helpers shared by the benchmark scripts: the machine line every result file carries, the wall
time during which at least one (parallel) tool call was running, and the run folders of train.py."""
import os
import platform
import shutil
from pathlib import Path


def machine() -> str:
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")),
               platform.processor())
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def busy_seconds(spans: list) -> float:
    """Length of the union of (start, end) intervals: wall time with at least one tool call
    running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total


def fresh_run(run: Path) -> Path:
    """An empty run folder: train.py refuses to log a new run into an old run's folder."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return run


def run_minutes(run: Path) -> float:
    """Wall time of a finished train.py run: from its config.json to its eval-rl/summary.json."""
    return ((run / "eval-rl" / "summary.json").stat().st_mtime
            - (run / "config.json").stat().st_mtime) / 60
