"""The members of a step: every parameter that has a gradient, with its state, checked once.

:func:`collect` reads the param groups and the optimizer's state; it creates the state of a
parameter's first step as a *pending* entry that the step installs only once it is sure to go
on, so a step that raises leaves ``optimizer.state`` as it was. :func:`check_members` is the one
check of everything a backend will read; after it, a step can no longer fail on its inputs.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..core.base import check_gradients
from ..core.blocks import BlockLayout
from .state import Slots, new_slots


class Member(NamedTuple):
    """One parameter of a step: its name (unique in the optimizer), the tensor, its gradient
    and its ``{"step", "m", "v"}`` state."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    state: Slots


def collect(param_groups: Sequence[Mapping[str, Any]], state: Mapping[torch.Tensor, Slots],
            layouts: Mapping[str, BlockLayout], state_dtype: torch.dtype | None
            ) -> tuple[list[list[Member]], dict[torch.Tensor, Slots]]:
    """Per group, the members with a gradient; and the state created for those that had none
    (``param -> slots``, not yet in ``state``)."""
    pending: dict[torch.Tensor, Slots] = {}
    groups = []
    for index, group in enumerate(param_groups):
        names, params = group["param_names"], group["params"]
        if len(names) != len(params):
            raise ValueError(f"param group {index} has {len(params)} parameters but "
                             f"{len(names)} param_names: add parameters with "
                             f"optimizer.add_param_group({{'params': [(name, param)]}}), not by "
                             f"appending to group['params']")
        members = []
        for name, param in zip(names, params):
            if param.grad is None:
                continue
            slots = state.get(param)
            if not slots:
                slots = pending[param] = new_slots(name, param, layouts[name], state_dtype,
                                                   group.get("momentum_format"))
            members.append(Member(name, param, param.grad, slots))
        groups.append(members)
    return groups, pending


def check_members(groups: Sequence[Sequence[Member]]) -> None:
    """Every gradient is a dense real floating tensor (a ValueError/TypeError naming the
    parameter; torch itself keeps a gradient to its parameter's shape and device)."""
    check_gradients({member.name: member.grad for group in groups for member in group})


__all__ = ["Member", "collect", "check_members"]
