"""The single-pass Adam-mini step as a Triton kernel (GPU; on CPU tensors under
``TRITON_INTERPRET=1``). It computes exactly what :mod:`.spec` states, one launch per parameter,
one program per tile of whole blocks (:mod:`.tiles`):

    S_b = sum_{i in b} g_i**2;  v_b = b2 v_b + (1 - b2) S_b / |b|
    d_b = sqrt(v_b + eps_root c2) / sqrt(c2) + eps
    m_i = m_i + (1 - b1)(g_i - m_i);  p_i = p_i - lr (m_i / c1 / d_b (+ wd p_i))

A program reads its tile's gradient for the statistic, then again for the update while the tile
(at most :data:`~.tiles.TARGET` elements, or one block) is still in the L2 cache: the gradient is
read from memory once (see :mod:`._triton_kernel`). Triton is imported on the first step only.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Sequence

import torch

from ..core.lowbits import group_count
from .spec import KernelMember, StepScalars
from .tiles import tiling_on

_FLOATS = (torch.float32, torch.bfloat16)
_ROUNDED = (torch.bfloat16, torch.int8)  # m formats that can be rounded stochastically
_M = _FLOATS + (torch.int8,)
CHUNK = 4096
"""Elements one loop iteration of a program loads at most (when a tile has that many)."""


def unavailable_reason() -> str | None:
    """Why :func:`step_` cannot run here, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors, slowly)"
    return None


def available() -> bool:
    """Whether :func:`step_` can run here."""
    return unavailable_reason() is None


@functools.cache
def _kernel():
    from ._triton_kernel import step_kernel
    return step_kernel


def step_(members: Sequence[KernelMember], scalars: StepScalars) -> None:
    """One Adam-mini step of every member, written in place into ``param``, ``m`` (and
    ``m_scale``) and ``v``."""
    for member in members:
        _check(member)
    s = scalars
    for member in members:
        if member.param.numel():
            _launch(member, s.lr, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.eps, s.eps_root,
                    s.bias_correction1, s.bias_correction2, s.weight_decay)


def _launch(member: KernelMember, lr: float, one_minus_beta1: float, beta2: float,
            one_minus_beta2: float, eps: float, eps_root: float, c1: float, c2: float,
            weight_decay: float) -> None:
    p, int8 = member.param, member.m.dtype == torch.int8
    key = (tuple(p.shape), member.runs, member.row_numel, member.columns, int8)
    tiling = tiling_on(key, p.device)
    seg = tiling.segments
    num_rows = _num_rows(member)
    rows = (p.new_empty(num_rows, dtype=torch.float32) if member.row_sums is None
            else member.row_sums.reshape(-1).to(torch.float32))
    denom = p.new_empty(num_rows, dtype=torch.float32)
    stochastic = member.noise_key is not None and member.m.dtype in _ROUNDED
    if member.columns:
        rb = min(_pow2(tiling.max_rows), 64)
        eb = min(_pow2(member.row_numel), max(1, CHUNK // rb))
    else:
        eb = min(_pow2(member.row_numel), 1024)
        rb = min(_pow2(tiling.max_rows), max(1, CHUNK // eb))
    sp = _pow2(seg.size)
    _kernel()[(tiling.tiles.shape[0],)](
        p, member.grad, member.m, member.m_scale if int8 else member.v, member.v, rows, denom,
        tiling.tiles, tiling.block_rows, member.row_numel, seg.last, seg.count, seg.size,
        one_minus_beta1, beta2, one_minus_beta2, eps, eps_root, c1, c2, math.sqrt(c2), -lr,
        weight_decay, member.noise_key if stochastic else 0,
        COLUMNS=member.columns, INT8=int8, STOCHASTIC=stochastic, DECAY=member.decay,
        GIVEN_SUMS=member.row_sums is not None, RB=rb, EB=eb,
        NB=min(_pow2(tiling.max_blocks), 1024),
        NG=min(_pow2(tiling.max_segments), max(1, CHUNK // sp)), SP=sp)


def _num_rows(member: KernelMember) -> int:
    return sum(length * count for length, count in member.runs)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check(member: KernelMember) -> None:
    """A ValueError for any member the kernel would not compute exactly (it reads raw memory)."""
    p, rows = member.param, _num_rows(member)
    problems = []
    tensors = [p, member.grad, member.m, member.v] + [
        t for t in (member.m_scale, member.row_sums) if t is not None]
    if any(not t.is_contiguous() or t.device != p.device for t in tensors):
        problems.append("every tensor must be contiguous and on the parameter's device")
    if member.grad.shape != p.shape or member.m.shape != p.shape:
        problems.append("grad and m must have the parameter's shape")
    if p.dtype not in _FLOATS or member.v.dtype != torch.float32 or member.m.dtype not in _M:
        problems.append(f"param must be fp32 or bf16, v fp32 (a bf16 state's per-operation "
                        f"rounding is the native CPU kernel's alone), m fp32, bf16 or int8 (got "
                        f"{p.dtype}, {member.v.dtype}, {member.m.dtype})")
    if rows * member.row_numel != p.numel() or member.v.numel() != sum(c for _, c in member.runs):
        problems.append(f"runs {member.runs} x row_numel {member.row_numel} do not cover shape "
                        f"{tuple(p.shape)} with v of {member.v.numel()} blocks")
    if member.columns and (p.dim() != 2 or member.row_numel != p.shape[0]):
        problems.append("columns=True needs a 2-D (in, out) tensor whose rows are its columns")
    if (member.m.dtype == torch.int8) != (member.m_scale is not None):
        problems.append("m_scale goes with int8 m, and only with it")
    elif member.m_scale is not None and (
            member.m_scale.dtype != torch.float32
            or member.m_scale.numel() != p.numel() // max(1, p.shape[-1] if p.dim() else 1)
            * group_count(tuple(p.shape))):
        problems.append("m_scale must be fp32 with one scale per group of <= 256 (lowbits)")
    if member.row_sums is not None and member.row_sums.numel() != rows:
        problems.append(f"row_sums must have one value per row ({rows})")
    if problems:
        raise ValueError(f"triton step of a {tuple(p.shape)} {p.dtype} parameter: "
                         + "; ".join(problems))


__all__ = ["available", "unavailable_reason", "step_"]
