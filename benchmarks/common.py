"""Helpers shared by the benchmark scripts: the machine line every result file carries, and the wall
time during which at least one (parallel) tool call was running."""
import os
import platform


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
