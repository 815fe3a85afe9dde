"""Low-precision storage of a first moment: bfloat16 and blockwise int8, with deterministic
stochastic rounding.

* ``bfloat16``: ``x`` (fp32) rounded to bf16, to nearest or stochastically: the 16 bits that
  bf16 drops are compared with 16 random bits, so ``E[round(x)] = x``.
* ``int8``: along the last axis, groups of at most :data:`GROUP` elements share one fp32 scale
  ``s = max|x| / 127``; an element is stored as ``q = round(x / s)`` in ``[-127, 127]``
  (stochastically: ``floor(x / s + u)``, ``u`` uniform in ``[0, 1)``), read back as ``q s``.
  The error is at most ``s / 2`` to nearest, below ``s`` stochastically (unbiased).

The random bits are a function of ``(seed, step, salt, element index)`` (:func:`uniform_noise`):
pure integer tensor ops, the same on every call with the same inputs (a resumed run rounds exactly as
an uninterrupted one), traceable by ``torch.compile`` and free of global generator state under
``vmap``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

FORMATS = ("float32", "bfloat16", "int8")
"""The storage formats of :func:`~adam_mini_tx.momentum` (``momentum_format``)."""

GROUP = 256
"""Most elements per int8 scale, along the last axis."""

_MASK = 0x7FFFFFFF  # every intermediate stays below 2**31 * 2**17: no int64 overflow
_GOLDEN = 10368889  # 2**24 / golden ratio, odd: index * _GOLDEN < 2**55 for any tensor


class QuantizedMoment(NamedTuple):
    codes: torch.Tensor  # int8, the parameter's shape
    scales: torch.Tensor  # fp32, shape[:-1] + (groups,)


@functools.lru_cache(maxsize=65536)
def salt_of(name: str) -> int:
    """A stable 31-bit salt for a parameter name (FNV-1a: the same in every process, and
    traceable by ``torch.compile``)."""
    salt = 2166136261
    for byte in name.encode():
        salt = ((salt ^ byte) * 16777619) & _MASK
    return salt


def noise_key(seed: int | torch.Tensor, count: int | torch.Tensor,
              salt: int | torch.Tensor) -> int | torch.Tensor:
    """The offset ``k`` of :func:`uniform_noise`: a hash of ``(seed, count, salt)``
    (multiply-xorshift rounds on 31-bit integers), of Python ints or int64 tensors alike."""
    key = ((seed & _MASK) * 69069 + (count & _MASK)) & _MASK
    key = (key * 69069 + salt) & _MASK
    for multiplier, shift in ((48271, 16), (40503, 15), (69069, 13)):
        key = (key * multiplier + 12345) & _MASK
        key = key ^ (key >> shift)
    return key


def uniform_noise(seed: torch.Tensor, count: torch.Tensor, salt: int | torch.Tensor,
                  like: torch.Tensor, index: int | torch.Tensor = 0) -> torch.Tensor:
    """fp32 values in ``[0, 1)`` of ``like``'s shape, a function of ``(seed, count, salt,
    index)`` only: ``u_i = frac(i a + k)`` on 24 bits (a Weyl sequence, ``a`` the golden ratio),
    its offset ``k`` = :func:`noise_key` ``(seed, count, salt)``. For a fixed element, ``k``
    makes ``u`` uniform from step to step, which is what
    keeps stochastic rounding unbiased; within a step the values are evenly spread. Three
    elementwise integer ops per element. ``i`` is the element's flat index in its whole
    parameter: ``index`` is that of ``like``'s first element (``like`` holds elements
    ``[index, index + numel)``, e.g. a piece of rows), or an int64 tensor of every element's
    (:func:`flat_index`, a shard's), so that the bits do not depend on how the parameter is cut."""
    key = noise_key(seed.to(torch.int64), count.to(torch.int64), salt)
    if not isinstance(index, torch.Tensor):
        index = torch.arange(index, index + like.numel(), dtype=torch.int64,
                             device=like.device).reshape(like.shape)
    return ((index * _GOLDEN + key) & 0xFFFFFF).to(torch.float32) * (1.0 / 2**24)


def flat_index(shape: tuple[int, ...], origin: tuple[int, ...],
               full_shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """The flat indices (int64, ``shape``) in a contiguous tensor of ``full_shape`` of the block
    ``[origin_k, origin_k + shape_k)`` along every axis ``k``: ``sum_k (j_k + origin_k) s_k``,
    ``s`` the full tensor's strides."""
    index = torch.zeros((1,) * len(shape), dtype=torch.int64, device=device)
    stride = 1
    for axis in reversed(range(len(shape))):
        along = torch.arange(origin[axis], origin[axis] + shape[axis], dtype=torch.int64,
                             device=device) * stride
        index = index + along.reshape([-1 if k == axis else 1 for k in range(len(shape))])
        stride *= full_shape[axis]
    return index.expand(shape) if len(shape) else index.reshape(())


def to_bfloat16(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``x`` in bf16: to nearest, or stochastically with ``noise`` uniform in [0, 1)."""
    if noise is None:
        return x.to(torch.bfloat16)
    bits = x.view(torch.int32)
    dither = (noise * 65536).to(torch.int32)  # 16 random bits below bf16's last one
    rounded = ((bits + dither) & ~0xFFFF).view(torch.float32)
    # NaN and Inf keep their bits; a finite value rounded past the largest bf16 becomes Inf
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def group_count(shape: tuple[int, ...]) -> int:
    """Scales per row (along the last axis) of an int8 moment of ``shape``."""
    last = shape[-1] if shape else 1
    return max(1, math.ceil(last / GROUP))


def group_window(start: int, width: int, last: int) -> slice:
    """The groups (of a row of ``last`` elements) that its elements ``[start, start + width)``
    touch: groups of ``ceil(last / group_count)`` elements, the last one zero-padded."""
    groups = group_count((last,))
    size = math.ceil(last / groups)
    if width == 0:
        return slice(0, 0)
    stop = groups if start + width >= last else math.ceil((start + width) / size)
    return slice(start // size, stop)


def quantize_int8(x: torch.Tensor, noise: torch.Tensor | None = None) -> QuantizedMoment:
    """``x`` (fp32) as int8 codes and per-group scales; stochastic with ``noise``."""
    scales = group_absmax(x) / 127
    return QuantizedMoment(encode_int8(x, scales, noise), scales.reshape(_scales_shape(x.shape)))


def group_absmax(x: torch.Tensor, start: int = 0, last: int | None = None) -> torch.Tensor:
    """``max |x|`` over each group ``x`` touches, ``(..., groups)``: ``x`` holds the elements
    ``[start, start + x.shape[-1])`` of rows of ``last`` elements (default: whole rows)."""
    return _grouped(x, start, last).abs().amax(dim=-1)


def encode_int8(x: torch.Tensor, scales: torch.Tensor, noise: torch.Tensor | None = None,
                start: int = 0, last: int | None = None) -> torch.Tensor:
    """The int8 codes of ``x`` (elements ``[start, ...)`` of rows of ``last``, as in
    :func:`group_absmax`) for the ``scales`` of the groups it touches: ``round(x / s)``, or
    ``floor(x / s + noise)``, clamped to ``[-127, 127]``."""
    rows = _grouped(x, start, last)
    scales = scales.reshape(rows.shape[:-1])
    scaled = rows / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)
    if noise is None:
        scaled = scaled.round()
    else:
        scaled = (scaled + _grouped(noise, start, last)).floor()
    return _ungrouped(scaled.clamp(-127, 127), x.shape, start, last).to(torch.int8)


def dequantize_int8(moment: QuantizedMoment, start: int = 0,
                    last: int | None = None) -> torch.Tensor:
    """The fp32 values of an int8 moment (codes of elements ``[start, ...)`` of rows of
    ``last``, and the scales of the groups they touch)."""
    rows = _grouped(moment.codes.to(torch.float32), start, last)
    scales = moment.scales.reshape(rows.shape[:-1])
    return _ungrouped(rows * scales.unsqueeze(-1), moment.codes.shape, start, last)


def _scales_shape(shape: torch.Size) -> tuple[int, ...]:
    return (*shape[:-1], group_count(tuple(shape))) if len(shape) else (1,)


def _padding(width: int, start: int, last: int | None) -> tuple[int, int, int]:
    """``(size, before, after)``: the group size and the zeros that pad elements
    ``[start, start + width)`` of rows of ``last`` to the whole groups they touch."""
    last = width if last is None else last
    window = group_window(start, width, last)
    size = math.ceil(last / group_count((last,)))
    if window.start == window.stop:
        return size, 0, 0
    before = start - window.start * size
    return size, before, (window.stop - window.start) * size - before - width


def _grouped(x: torch.Tensor, start: int = 0, last: int | None = None) -> torch.Tensor:
    """``x`` as ``(..., groups, group)`` along its last axis, zero-padded to whole groups."""
    x = x.reshape(1) if x.dim() == 0 else x
    size, before, after = _padding(x.shape[-1], start, last)
    if before or after:
        x = F.pad(x, (before, after))
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _ungrouped(rows: torch.Tensor, shape: torch.Size, start: int = 0,
               last: int | None = None) -> torch.Tensor:
    """The inverse of :func:`_grouped`."""
    width = shape[-1] if len(shape) else 1
    before = _padding(width, start, last)[1]
    flat = rows.reshape(*rows.shape[:-2], rows.shape[-2] * rows.shape[-1])
    return flat[..., before:before + width].reshape(shape)


__all__ = ["FORMATS", "GROUP", "QuantizedMoment", "salt_of", "noise_key", "uniform_noise",
           "flat_index", "to_bfloat16", "group_count", "group_window", "quantize_int8",
           "group_absmax", "encode_int8", "dequantize_int8"]
