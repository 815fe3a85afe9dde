"""Interleaved timing: every call once per round, in turn, in one process."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                      before: Callable[[], object] = lambda: None,
                      synchronize: Callable[[], object] = lambda: None
                      ) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` in each of ``rounds`` rounds, run in turn round by round
    after ``warmup`` rounds, under ``torch.no_grad()``; ``before`` runs ahead of every call,
    untimed, and ``synchronize`` around it (a device's queue)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            for name, call in calls.items():
                before()
                synchronize()
                start = time.perf_counter()
                call()
                synchronize()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                        ) -> dict[str, float]:
    """The median of :func:`interleaved_times` for each call."""
    return {name: statistics.median(samples)
            for name, samples in interleaved_times(calls, rounds, warmup).items()}
