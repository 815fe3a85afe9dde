"""A low-precision first moment of a DTensor parameter (FSDP2, tensor parallel), kept sharded and
rounded exactly as the whole parameter's would be.

* ``m`` (bf16, or int8 codes) is a DTensor with its parameter's placements.
* int8 scales (``shape[:-1] + (groups,)``, groups along the last axis) follow the rows: where
  the parameter is ``Shard(d)`` along an axis ``d`` before the last (FSDP2's ``Shard(0)`` of a
  matrix), the scales are ``Shard(d)`` too, every row whole on its rank. Where it is sharded
  along its last axis (a 1-D norm or bias under FSDP2, a row-parallel TP weight), a group of
  256 can straddle two shards: the scales are ``Replicate`` there; every rank takes the maxima
  of the groups its shard touches, and the maxima are combined over that mesh dimension
  (``Partial("max")`` to ``Replicate``: one all-reduce of ``rows x groups`` values per write).
* A shard's rounding noise uses its elements' flat indices in the whole parameter
  (:func:`~adam_mini_tx.core.lowbits.flat_index`).

So the stored ``m`` equals the single process's bit for bit on any mesh, with uneven shards
(FSDP2's padding is not part of the DTensor), and torch.distributed.checkpoint reshards it as
tensors of the parameter's and the scales' shapes: the groups are those of the whole parameter.
Placements other than ``Shard`` and ``Replicate`` (``_StridedShard``, ``Partial``) are refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor import zeros as dtensor_zeros
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..core.lowbits import (QuantizedMoment, dequantize_int8, encode_int8, flat_index,
                            group_absmax, group_count, group_window, to_bfloat16, uniform_noise)


def check_sharding(name: str, param: torch.Tensor, momentum_format: str) -> None:
    """A ValueError naming ``name`` unless every placement of the DTensor ``param`` is
    ``Shard`` or ``Replicate`` (the shards of a low-precision ``m`` are then rectangles)."""
    odd = [p for p in param.placements if type(p) not in (Shard, Replicate)]
    if odd:
        raise ValueError(f"parameter {name!r}: momentum_format={momentum_format!r} needs a "
                         f"DTensor placed with Shard or Replicate, got {param.placements}; use "
                         f"momentum_format='float32' for it")


def scale_placements(placements: Sequence[Any], ndim: int) -> tuple[Any, ...]:
    """The placements of int8 scales of a parameter with ``placements`` and ``ndim`` axes:
    ``Shard(d)`` for ``d`` before the last axis, else ``Replicate``."""
    return tuple(p if isinstance(p, Shard) and p.dim < ndim - 1 else Replicate()
                 for p in placements)


def new_moment(param: DTensor, momentum_format: str) -> Any:
    """A zero bf16 or int8 first moment of ``param``, sharded as the module docstring says."""
    shape, mesh, placements = tuple(param.shape), param.device_mesh, param.placements
    if momentum_format == "bfloat16":
        return dtensor_zeros(shape, dtype=torch.bfloat16, device_mesh=mesh, placements=placements)
    scales = (*shape[:-1], group_count(shape)) if shape else (1,)
    return QuantizedMoment(
        dtensor_zeros(shape, dtype=torch.int8, device_mesh=mesh, placements=placements),
        dtensor_zeros(scales, dtype=torch.float32, device_mesh=mesh,
                      placements=scale_placements(placements, len(shape))))


def placed(name: str, key: str, value: Any, param: DTensor) -> DTensor:
    """A loaded ``m`` or ``m_scale`` of ``param`` placed as the step reads it (redistributed if
    saved otherwise); a ValueError naming ``name`` unless it is a DTensor on ``param``'s mesh."""
    if not isinstance(value, DTensor) or value.device_mesh != param.device_mesh:
        raise ValueError(f"checkpoint state {key!r} of parameter {name!r} is not a DTensor on "
                         f"the parameter's device mesh: load a low-precision momentum of a "
                         f"DTensor parameter with torch.distributed.checkpoint (see "
                         f"docs/distributed.md)")
    placements = (scale_placements(param.placements, param.dim()) if key == "m_scale"
                  else tuple(param.placements))
    return value if tuple(value.placements) == placements else value.redistribute(
        param.device_mesh, placements)


def read(moment: Any) -> DTensor:
    """A sharded low-precision moment's values as a new fp32 DTensor placed like it."""
    if not isinstance(moment, QuantizedMoment):
        return moment.to(torch.float32)
    codes = moment.codes
    start, last, window = _columns(codes)
    local = dequantize_int8(QuantizedMoment(codes.to_local(), _scales(moment)[..., window]),
                            start, last)
    return _like(codes, local)


def write(values: DTensor, moment: Any, in_place: bool, noise_args: tuple | None) -> Any:
    """``values`` (fp32) stored in the sharded ``moment``'s format, each shard locally (see
    :func:`adam_mini_tx.functional.moments.write` for ``in_place`` and ``noise_args``)."""
    stored = moment.codes if isinstance(moment, QuantizedMoment) else moment
    shape = tuple(stored.shape)
    local_shape, origin = compute_local_shape_and_global_offset(shape, stored.device_mesh,
                                                                 stored.placements)
    local = values.redistribute(stored.device_mesh, stored.placements).to_local()
    noise = None
    if noise_args is not None:
        seed, count, salt, index = noise_args
        index = index + flat_index(local_shape, origin, shape, local.device)
        noise = uniform_noise(seed, count, salt, local, index)
    if not isinstance(moment, QuantizedMoment):
        return _put(stored, to_bfloat16(local, noise), in_place)
    start, last, window = _columns(stored)
    maxima = local.new_zeros(_scales(moment).shape)
    maxima[..., window] = group_absmax(local, start, last)
    if any(isinstance(p, Shard) and p.dim == len(shape) - 1 for p in stored.placements):
        partial = [Partial("max") if isinstance(p, Shard) and p.dim == len(shape) - 1 else q
                   for p, q in zip(stored.placements, moment.scales.placements)]
        maxima = DTensor.from_local(maxima, stored.device_mesh, partial,
                                    shape=moment.scales.shape, stride=moment.scales.stride()
                                    ).redistribute(stored.device_mesh,
                                                   moment.scales.placements).to_local()
    scales = maxima / 127
    codes = encode_int8(local, scales[..., window], noise, start, last)
    return QuantizedMoment(_put(stored, codes, in_place), _put(moment.scales, scales, in_place))


def _columns(codes: DTensor) -> tuple[int, int | None, slice]:
    """``(start, last, window)``: the first of the last-axis elements the local shard holds, the
    row length (None for a 0-d parameter) and the groups the shard touches."""
    if codes.dim() == 0:
        return 0, None, slice(0, 1)
    local_shape, origin = compute_local_shape_and_global_offset(
        tuple(codes.shape), codes.device_mesh, codes.placements)
    last = codes.shape[-1]
    return origin[-1], last, group_window(origin[-1], local_shape[-1], last)


def _scales(moment: QuantizedMoment) -> torch.Tensor:
    """The local scales, after checking they are placed as :func:`scale_placements` says."""
    expected = scale_placements(moment.codes.placements, moment.codes.dim())
    if tuple(moment.scales.placements) != expected:
        raise ValueError(f"int8 momentum scales placed {moment.scales.placements} where their "
                         f"codes' placements {moment.codes.placements} need {expected}")
    return moment.scales.to_local()


def _put(target: DTensor, local: torch.Tensor, in_place: bool) -> DTensor:
    """``local`` as the local shard of ``target``: written into it, or a new DTensor."""
    if in_place:
        target.to_local().copy_(local)
        return target
    return _like(target, local)


def _like(target: DTensor, local: torch.Tensor) -> DTensor:
    """A DTensor with ``target``'s mesh, placements and global shape, holding ``local``."""
    return DTensor.from_local(local, target.device_mesh, target.placements,
                              shape=target.shape, stride=target.stride())


__all__ = ["check_sharding", "scale_placements", "new_moment", "placed", "read", "write"]
