"""The members of a step: every parameter that has a gradient, with its state, checked once.

:func:`collect` reads the param groups and the optimizer's state; it creates the state of a
parameter's first step as a *pending* entry that the step installs only once it is sure to go
on, so a step that raises leaves ``optimizer.state`` as it was. :func:`check_members` is the one
check of everything a backend will read; after it, a step can no longer fail on its inputs.
:func:`group_entries` is the one place that sees a group's tensors replaced by flat partitions
(DeepSpeed ZeRO): such a member carries its :class:`~adam_mini_tx.distributed.FlatPartition`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..core.base import check_gradients
from ..core.blocks import BlockLayout
from ..distributed import FlatPartition, deepspeed_partitions
from ..functional.moments import LOW_PRECISION
from .state import Slots, new_flat_slots, new_slots


class Member(NamedTuple):
    """One parameter of a step: its name (unique in the optimizer), the tensor, its gradient
    and its ``{"step", "m", "v"}`` state."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    state: Slots
    partition: FlatPartition | None = None  # a flat partition's pieces (``param`` is 1-D)


class Entry(NamedTuple):
    """One tensor of a param group: a parameter, or a flat partition of several."""

    name: str
    param: torch.Tensor
    v_shape: tuple[int, ...]
    partition: FlatPartition | None


def group_entries(group: Mapping[str, Any], index: int, originals: Mapping[str, torch.Tensor],
                  layouts: Mapping[str, BlockLayout]) -> list[Entry]:
    """The tensors of param group ``index``: its parameters, or the flat partitions DeepSpeed
    put in their place (``originals``: name -> the parameter the optimizer was given)."""
    names, params = group["param_names"], group["params"]
    partitions = deepspeed_partitions(params, names, originals, layouts)
    if partitions is not None:
        if group.get("momentum_format") in LOW_PRECISION:
            raise ValueError(f"param group {index}: momentum_format="
                             f"{group['momentum_format']!r} is not supported under DeepSpeed ZeRO "
                             f"stages 1-3 yet (its flat partitions cut rows); use "
                             f"momentum_format='float32' or None")
        return [Entry(p.name, flat, (p.v_numel,), p) for flat, p in partitions]
    if len(names) != len(params):
        raise ValueError(f"param group {index} has {len(params)} parameters but "
                         f"{len(names)} param_names: add parameters with "
                         f"optimizer.add_param_group({{'params': [(name, param)]}}), not by "
                         f"appending to group['params']")
    return [Entry(name, param, layouts[name].v_shape, None) for name, param in zip(names, params)]


def collect(param_groups: Sequence[Mapping[str, Any]], state: Mapping[torch.Tensor, Slots],
            layouts: Mapping[str, BlockLayout], state_dtype: torch.dtype | None,
            originals: Mapping[str, torch.Tensor]
            ) -> tuple[list[list[Member]], dict[torch.Tensor, Slots]]:
    """Per group, the members with a gradient; and the state created for those that had none
    (``param -> slots``, not yet in ``state``)."""
    pending: dict[torch.Tensor, Slots] = {}
    groups = []
    for index, group in enumerate(param_groups):
        members = []
        for entry in group_entries(group, index, originals, layouts):
            param = entry.param
            if param.grad is None:
                continue
            slots = state.get(param)
            if not slots:
                slots = pending[param] = (
                    new_slots(entry.name, param, layouts[entry.name], state_dtype,
                              group.get("momentum_format"))
                    if entry.partition is None else new_flat_slots(param, entry.v_shape,
                                                                   state_dtype))
            members.append(Member(entry.name, param, param.grad, slots, entry.partition))
        groups.append(members)
    return groups, pending


def check_members(groups: Sequence[Sequence[Member]]) -> None:
    """Every gradient is a dense real floating tensor (a ValueError/TypeError naming the
    parameter; torch itself keeps a gradient to its parameter's shape and device)."""
    check_gradients({member.name: member.grad for group in groups for member in group})


__all__ = ["Member", "Entry", "group_entries", "collect", "check_members"]
