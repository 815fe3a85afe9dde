"""How :func:`~adam_mini_tx.momentum` stores ``m``: in a float dtype (the default), or in a
low-precision format (:data:`~adam_mini_tx.core.lowbits.FORMATS`) that is read into fp32, updated
there, and written back rounded, so that no full-size float copy of ``m`` outlives a step. The
moment of a DTensor parameter is sharded with it (:mod:`adam_mini_tx.functional.shards`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..core.blocks import is_dtensor
from ..core.lowbits import (FORMATS, QuantizedMoment, dequantize_int8, quantize_int8,
                            to_bfloat16, uniform_noise)

LOW_PRECISION = ("bfloat16", "int8")


def check_format(momentum_format: str | None) -> str | None:
    """``momentum_format`` if it is None or one of :data:`FORMATS`, else a ValueError."""
    if momentum_format is not None and momentum_format not in FORMATS:
        raise ValueError(f"invalid momentum_format={momentum_format!r}: use one of "
                         f"{list(FORMATS)} (or None: the state dtype)")
    return momentum_format


def check_sharded(params: Mapping[str, torch.Tensor], momentum_format: str) -> None:
    """A ValueError naming the first DTensor parameter whose placements a low-precision ``m``
    cannot follow (:func:`adam_mini_tx.functional.shards.check_sharding`)."""
    for name, param in params.items():
        if is_dtensor(param):
            from . import shards
            shards.check_sharding(name, param, momentum_format)


def new_moment(param: torch.Tensor, momentum_format: str | None,
               state_dtype: torch.dtype | None) -> Any:
    """A zero first moment for ``param`` in ``momentum_format`` (None: ``state_dtype`` or the
    parameter's dtype)."""
    if momentum_format in LOW_PRECISION and is_dtensor(param):
        from . import shards  # torch.distributed.tensor is loaded: param is a DTensor
        return shards.new_moment(param, momentum_format)
    if momentum_format == "int8":
        return quantize_int8(param.new_zeros(param.shape, dtype=torch.float32))
    dtype = {None: state_dtype or param.dtype, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[momentum_format]
    return param.new_zeros(param.shape, dtype=dtype)


def read(moment: Any) -> torch.Tensor:
    """A low-precision moment's values as a new fp32 tensor."""
    if is_dtensor(getattr(moment, "codes", moment)):
        from . import shards
        return shards.read(moment)
    if isinstance(moment, QuantizedMoment):
        return dequantize_int8(moment)
    return moment.to(torch.float32)


def write(values: torch.Tensor, moment: Any, in_place: bool, noise_args: tuple | None) -> Any:
    """``values`` (fp32) stored in ``moment``'s format: into ``moment`` itself when
    ``in_place`` (its state was donated), else as a new moment. ``noise_args``: ``(seed,
    count, salt, index)`` for stochastic rounding (``salt``: the parameter's, :func:`salt_of`
    its name; ``index``: the flat index of ``values``' first element in the parameter), None to
    round to nearest."""
    if is_dtensor(values):
        from . import shards
        return shards.write(values, moment, in_place, noise_args)
    noise = None
    if noise_args is not None:
        seed, count, salt, index = noise_args
        noise = uniform_noise(seed, count, salt, values, index)
    if isinstance(moment, QuantizedMoment):
        stored = quantize_int8(values, noise)
        if in_place:
            moment.codes.copy_(stored.codes)
            moment.scales.copy_(stored.scales)
            return moment
        return stored
    stored = to_bfloat16(values, noise)
    return moment.copy_(stored) if in_place else stored


__all__ = ["LOW_PRECISION", "check_format", "check_sharded", "new_moment", "read", "write"]
