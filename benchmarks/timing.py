"""Interleaved timing: every call once per round, in turn, in one process; medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                        ) -> dict[str, float]:
    """Seconds per call of each of ``calls`` (the median of ``rounds``), run in turn round by
    round after ``warmup`` rounds, under ``torch.no_grad()``."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
