"""The optimizer's per-parameter state and how the functional chain sees it.

``optimizer.state[p]`` holds three stable keys (:data:`STATE_KEYS`):

* ``"step"``: a 0-d int64 tensor, the steps this parameter has taken (its own tensor: the
  optimizer bumps every stepped parameter's count once, at the end of a step);
* ``"m"``: the first moment, the parameter's shape;
* ``"v"``: the blockwise second moment, one value per block (``layout.v_shape``);
* ``"m_scale"`` (``momentum_format="int8"`` only): ``m``'s fp32 scales, one per group of at most
  256 elements along the last axis; ``m`` then holds int8 codes.

:func:`chain_step` is the bridge to the pure :func:`~adam_mini_tx.adam_mini` chain: it turns the
slots of parameters that share a step count into the chain's state and back. Every backend runs
the math through it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..functional.alias import adam_mini, adam_mini_slots, adam_mini_state_from_slots
from ..core.base import GradientTransformation
from ..core.blocks import BlockLayout

STATE_KEYS = ("step", "m", "v")
"""The keys of ``optimizer.state[p]`` (see the module docstring)."""

Slots = dict[str, torch.Tensor]


def new_slots(name: str, param: torch.Tensor, layout: BlockLayout,
              state_dtype: torch.dtype | None, momentum_format: str | None = None) -> Slots:
    """Fresh ``{"step": 0, "m": 0, "v": 0}`` (and ``"m_scale"`` for int8) for one parameter,
    made by the chain's ``init``."""
    tx = adam_mini(plan={name: layout}, state_dtype=state_dtype, momentum_format=momentum_format)
    return adam_mini_slots(tx.init({name: param}), name)


def new_flat_slots(partition: torch.Tensor, v_shape: tuple[int, ...],
                   state_dtype: torch.dtype | None) -> Slots:
    """Fresh state of a flat partition (DeepSpeed ZeRO): ``m`` like the partition, ``v`` one
    value per block of its pieces (:class:`~adam_mini_tx.distributed.FlatPartition`)."""
    dtype = state_dtype or partition.dtype
    return {"step": torch.zeros((), dtype=torch.int64),
            "m": torch.zeros_like(partition, dtype=dtype),
            "v": torch.zeros(v_shape, dtype=dtype, device=partition.device)}


def slot_keys(momentum_format: str | None) -> tuple[str, ...]:
    """The state keys of a parameter whose ``m`` is stored in ``momentum_format``."""
    return ("step", "m", "m_scale", "v") if momentum_format == "int8" else STATE_KEYS


def chain_step(tx: GradientTransformation, params: Mapping[str, torch.Tensor],
               grads: Mapping[str, torch.Tensor], slots: Mapping[str, Mapping[str, torch.Tensor]],
               row_sums: Mapping[str, torch.Tensor] | None = None, seed: int | None = None,
               salts: Mapping[str, int | torch.Tensor] | None = None,
               offsets: Mapping[str, int] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Slots]]:
    """One step of the chain ``tx`` for ``params`` (which share one step count). Returns
    ``(updates, new_slots)``: ``p_new = p + updates[name]`` and the new ``{"step", "m", "v"}``.
    ``row_sums`` (name -> row sums of squares) are the statistics of a pass made earlier;
    ``seed`` (None: ``m`` is not low-precision), ``salts`` (by name; default: each name's) and
    ``offsets`` (by name, the flat index of a piece's first element in its parameter; default
    0), those of a low-precision ``m``'s stochastic rounding. Pure unless run with donated
    buffers (:func:`~adam_mini_tx.core.donation.donating`)."""
    state = adam_mini_state_from_slots(dict(slots), None if seed is None else torch.tensor(seed))
    updates, state = tx.update(dict(grads), state, dict(params), row_sums=row_sums, salts=salts,
                              offsets=offsets)
    return updates, {name: adam_mini_slots(state, name) for name in params}


def bump_steps(steps: Sequence[torch.Tensor]) -> None:
    """``step += 1`` for every given step count (distinct tensors), in one call."""
    if steps:
        torch._foreach_add_(list(steps), 1)


def own_copy(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A state value loaded from a checkpoint as a tensor with its own storage on ``device``
    (a Python-int step becomes a 0-d int64 tensor)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(value, dtype=torch.int64)
    return value.to(device=device, dtype=dtype or value.dtype, copy=True)


__all__ = ["STATE_KEYS", "Slots", "new_slots", "new_flat_slots", "slot_keys", "chain_step",
           "bump_steps", "own_copy"]
