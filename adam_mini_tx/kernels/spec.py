"""What a single-pass step kernel computes, for one parameter (a :class:`KernelMember`).

The parameter is viewed as ``rows x row_numel`` features: rows are its leading ``row_dims`` axes
(a contiguous tensor: row ``r`` is elements ``[r*row_numel, (r+1)*row_numel)``), or, with
``columns=True``, the columns of a contiguous 2-D ``(in, out)`` tensor (HF ``Conv1D``). ``runs``
groups consecutive rows into blocks, as :class:`~adam_mini_tx.core.blocks.BlockLayout` does:
``((L, n), ...)`` is ``n`` blocks of ``L`` rows. ``v`` holds one value per block, in order.
In fp32, with ``t`` the step count of the call and ``c1 = 1 - b1**t``, ``c2 = 1 - b2**t``:

    S_b   = sum_{i in b} g_i**2            (or the sum over b's rows of ``row_sums``, if given)
    v_b   = b2 v_b + (1 - b2) S_b / |b|
    d_b   = sqrt(v_b + eps_root c2) / sqrt(c2) + eps
    m_i   = m_i + (1 - b1) (g_i - m_i)
    u_i   = (m_i / c1) / d_b  (+ wd p_i where ``decay``)
    p_i   = p_i - lr u_i

``m`` is stored in its own dtype, or as bf16 / int8 (see :mod:`adam_mini_tx.core.lowbits`):
rounded to nearest, or stochastically with ``u_i = ((i * 10368889 + noise_key) & 0xFFFFFF) /
2**24`` for flat element index ``i`` (:func:`~adam_mini_tx.core.lowbits.noise_key`); the update
uses the unrounded fp32 ``m_i`` (``reads_stored_m=False``); a state ``m`` (fp32, or bf16
state) is read back as stored. A bf16 parameter gets ``p_i + bf16(-lr u_i)`` rounded to bf16.
A bf16 ``v`` (bf16 state) follows the chain's bf16 arithmetic, one rounding per operation:
``d_b = bf16(bf16(bf16(sqrt(v_b)) / bf16(sqrt(c2))) + eps)`` and ``u_i = bf16(m_i / c1)``,
``bf16(u_i / d_b)``, ``bf16(u_i + wd p_i)``, ``bf16(-lr u_i)``, ``p_i + u_i`` (``c1`` in bf16 for a
bf16 state ``m``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.blocks import BlockLayout
from ..core.lowbits import noise_key, salt_of


class StepScalars(NamedTuple):
    """The scalars of one kernel call (its members share the step count ``t``)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    eps_root: float
    weight_decay: float
    bias_correction1: float  # 1 - beta1**t, computed in float64
    bias_correction2: float  # 1 - beta2**t, computed in float64


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, eps_root: float,
                 weight_decay: float, count: int) -> StepScalars:
    """The scalars of step ``count`` (1-based: the count after this step)."""
    return StepScalars(lr, beta1, beta2, eps, eps_root, weight_decay,
                       1.0 - beta1 ** count, 1.0 - beta2 ** count)


class KernelMember(NamedTuple):
    """One parameter's tensors and geometry for a kernel (written in place: p, m, m_scale, v)."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    m: torch.Tensor  # the parameter's shape: fp32, bf16, or int8 codes
    m_scale: torch.Tensor | None  # int8 only: fp32 scales, shape[:-1] + (groups of <= 256,)
    v: torch.Tensor  # one value per block
    row_sums: torch.Tensor | None  # per-row sums of squares from a statistics pass, or None
    runs: tuple[tuple[int, int], ...]
    row_numel: int
    columns: bool
    decay: bool
    noise_key: int | None  # None: round m to nearest (or m is not low-precision)
    reads_stored_m: bool = True  # m is a state tensor: the update reads it back as stored;
    # False: a low-precision format, whose update uses the unrounded fp32 m


def geometry(layout: BlockLayout) -> tuple[tuple[tuple[int, int], ...], int, bool] | None:
    """``(runs, row_numel, columns)`` of a layout a kernel can run, or None: identity layouts
    (rows, heads, fused QKV, 3-D experts, norms, elementwise) and transposed 2-D ones."""
    if layout.perm == tuple(range(len(layout.shape))):
        return layout.runs, layout.row_numel, False
    if layout.perm == (1, 0) and layout.row_dims == 1:
        return layout.runs, layout.row_numel, True
    return None


def member_noise_key(seed: int, count: int, name: str) -> int:
    """The stochastic-rounding key of parameter ``name`` at step ``count``."""
    return noise_key(seed, count, salt_of(name))


__all__ = ["StepScalars", "step_scalars", "KernelMember", "geometry", "member_noise_key"]
