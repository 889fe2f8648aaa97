"""Timing helpers shared by every benchmark: medians over repeats, with min/max, and the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def summarize(samples: list[float], unit: str) -> dict[str, Any]:
    """Median, min and max of repeated measurements."""
    if not samples:
        raise ValueError("summarize: no samples")
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "unit": unit,
    }


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """Ratio of two summaries' medians."""
    return float(numerator["median"]) / float(denominator["median"])


def describe_machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch version and device, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
