"""The native CPU kernel (``csrc/adam_mini_step.cpp``): built once per machine, loaded on use.

:func:`load` builds the C++ source with torch's extension machinery (``torch.utils.cpp_extension``,
ninja and the system compiler; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and rebuilt only when the source changes) and registers
``torch.ops.adam_mini_tx.step_`` and ``row_sums_``. When it cannot be built or loaded, :func:`load` returns False
and :func:`status` says why, once, in the log. ``ADAM_MINI_TX_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .spec import KernelMember, StepScalars

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "adam_mini_step.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17"]
"""``-fopenmp``: ``at::parallel_for`` is OpenMP inlined from ATen's headers (libgomp, which torch
already loaded, by its soname); ``-ffp-contract=off``: the kernel writes out every fused
multiply-add it wants (see the source)."""
_MODES = {"rows": 0, "columns": 1, "elementwise": 2}
_state: dict[str, object] = {}  # "loaded": bool, "reason": str, "build_seconds": float


def load() -> bool:
    """Build (first use on a machine) or load the kernel; True when ``step_`` can run."""
    if "loaded" not in _state:
        _state.update(_load())
        if _state["loaded"]:
            log.info("adam_mini_tx: native CPU step loaded in %.1f s", _state["build_seconds"])
        else:
            log.warning("adam_mini_tx: the native CPU step is unavailable (%s); AdamMini runs "
                        "its eager step", _state["reason"])
    return bool(_state["loaded"])


def status() -> str:
    """One line: loaded (and the load/build time) or why not."""
    if "loaded" not in _state:
        return "not loaded yet"
    if _state["loaded"]:
        return f"loaded ({_state['build_seconds']:.1f} s to build or load)"
    return f"unavailable: {_state['reason']}"


def _load() -> dict[str, object]:
    if os.environ.get("ADAM_MINI_TX_NATIVE", "1") == "0":
        return {"loaded": False, "reason": "ADAM_MINI_TX_NATIVE=0"}
    if hasattr(torch.ops.adam_mini_tx, "row_sums_"):  # registered by an earlier load
        return {"loaded": True, "build_seconds": 0.0}
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension
        cpp_extension.load(name="adam_mini_tx_native", sources=[str(SOURCE)],
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the eager step runs
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines
                      else "")  # a compiler's first error says more than the command line
        return {"loaded": False, "reason": f"{type(error).__name__}: {reason[-300:]}"}
    return {"loaded": True, "build_seconds": time.perf_counter() - start}


def mode_of(columns: bool, runs: Sequence[tuple[int, int]], row_numel: int) -> str:
    """The kernel's loop for a geometry: ``"columns"``, ``"elementwise"`` (a block per
    element: v per element) or ``"rows"``."""
    if columns:
        return "columns"
    if row_numel == 1 and all(length == 1 for length, count in runs if count):
        return "elementwise"
    return "rows"


def _tables(members: Sequence[KernelMember]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's int64 ``meta`` (a row per member: mode, row_numel, last-axis length, decay,
    rounding key or -1, whether m is read back as stored, its runs' span) and ``runs`` (``(rows per block, blocks)`` pairs)."""
    meta, runs = [], []
    for member in members:
        last = member.param.shape[-1] if member.param.dim() else 1
        meta.append([_MODES[mode_of(member.columns, member.runs, member.row_numel)],
                     member.row_numel, last, int(member.decay),
                     -1 if member.noise_key is None else member.noise_key,
                     int(member.reads_stored_m), len(runs), len(runs) + len(member.runs)])
        runs.extend(member.runs)
    return torch.tensor(meta, dtype=torch.int64), torch.tensor(runs, dtype=torch.int64)


def row_sums_(members: Sequence[KernelMember]) -> tuple[list[torch.Tensor], bool]:
    """The statistics pass: each member's row sums of squares (fp32, accumulated in float64;
    one per row, flat) and whether all of them are finite."""
    if not members:
        return [], True
    meta, runs = _tables(members)
    counts = [sum(length * count for length, count in m.runs) for m in members]
    out = list(members[0].grad.new_empty(sum(counts), dtype=torch.float32).split(counts))
    finite = torch.ops.adam_mini_tx.row_sums_([m.grad for m in members], out, meta, runs)
    return out, finite


def step_(members: Sequence[KernelMember], scalars: StepScalars) -> None:
    """One step of ``members`` (sharing ``scalars``) in place; see :mod:`.spec`."""
    if not members:
        return
    meta, runs = _tables(members)
    empty = members[0].param.new_empty(0)
    torch.ops.adam_mini_tx.step_(
        [m.param for m in members], [m.grad for m in members], [m.m for m in members],
        [empty if m.m_scale is None else m.m_scale for m in members],
        [m.v for m in members], [empty if m.row_sums is None else m.row_sums for m in members],
        meta, runs,
        list(map(float, (scalars.lr, scalars.beta1, scalars.beta2, scalars.eps, scalars.eps_root,
                         scalars.weight_decay, scalars.bias_correction1,
                         scalars.bias_correction2))))


__all__ = ["load", "status", "mode_of", "row_sums_", "step_", "SOURCE"]
