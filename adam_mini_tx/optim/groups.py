"""Param groups: every accepted form of ``params`` made into named groups, checked once.

AdamMini needs a name for every tensor (the planner chooses blocks by name and structure), and
a name must mean one tensor: state, statistics and the plan are keyed by it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..functional.moments import LOW_PRECISION, check_sharded
from ..planning import BlockPlan, check_coverage, plan_blocks


def named_groups(params: Iterable[Any], names_by_id: Mapping[int, str]) -> list[dict[str, Any]]:
    """Normalise ``params`` (``(name, param)`` pairs, or groups of them; tensors are named
    through ``names_by_id``, from the module given as ``plan``) into named param groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of (name, parameter) pairs or of param groups, "
                        "not a single tensor; pass model.named_parameters()")
    items = list(params)
    if not items:
        raise ValueError("AdamMini got an empty parameter list")
    groups = items if all(isinstance(item, Mapping) for item in items) else [{"params": items}]
    return [named_group(dict(group), names_by_id) for group in groups]


def named_group(group: dict[str, Any], names_by_id: Mapping[int, str]) -> dict[str, Any]:
    """One group with ``"params"`` as ``(name, param)`` pairs (torch's ``param_names`` form
    accepted)."""
    if "params" not in group:
        raise ValueError("a param group needs a 'params' entry of (name, parameter) pairs")
    members = group["params"]
    members = [members] if isinstance(members, torch.Tensor) else list(members)
    if not members:
        raise ValueError("a param group has no parameters: give it at least one (name, parameter) "
                         "pair, or leave the group out")
    if "param_names" in group:  # torch's own named-group form: parallel lists
        members = list(zip(group.pop("param_names"), members))
    named = []
    for member in members:
        if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
            named.append(member)
        elif isinstance(member, torch.Tensor) and id(member) in names_by_id:
            named.append((names_by_id[id(member)], member))
        elif isinstance(member, torch.Tensor):
            raise ValueError(f"AdamMini needs parameter names to choose each tensor's blocks, but "
                             f"got an unnamed tensor of shape {tuple(member.shape)}: pass "
                             f"model.named_parameters() (or groups of (name, param) pairs), or "
                             f"plan=model to look the names up in the module")
        else:
            raise TypeError(f"AdamMini params must be (name, tensor) pairs, got "
                            f"{type(member).__name__}")
    group["params"] = named
    return group


def reject_duplicates(groups: Iterable[Mapping[str, Any]]) -> None:
    """Each tensor in one group once, and each name for one tensor (a ValueError naming both
    places)."""
    by_tensor: dict[int, str] = {}
    by_name: dict[str, tuple[int, torch.Tensor]] = {}
    for index, group in enumerate(groups):
        for name, param in group["params"]:
            if id(param) in by_tensor:
                raise ValueError(f"parameter {name!r} appears twice (also as "
                                 f"{by_tensor[id(param)]!r}), e.g. in two param groups; give "
                                 f"each parameter to one group")
            by_tensor[id(param)] = name
            if name in by_name:
                other_index, other = by_name[name]
                raise ValueError(
                    f"two different tensors are named {name!r}: one of shape "
                    f"{tuple(other.shape)} in param group {other_index} and one of shape "
                    f"{tuple(param.shape)} in param group {index}. Names key the blocks and the "
                    f"state, so each must be unique: prefix them per model, e.g. "
                    f"[('gen.' + n, p) for n, p in gen.named_parameters()], or pass plan= a "
                    f"module that holds both models")
            by_name[name] = (index, param)


def reject_sharded_low_precision(group: Mapping[str, Any], index: int) -> None:
    """A low-precision ``m`` of DTensor (FSDP2, TP) parameters needs Shard or Replicate
    placements: a ValueError naming the group and the parameter otherwise."""
    if group.get("momentum_format") not in LOW_PRECISION:
        return
    try:
        check_sharded(dict(zip(group["param_names"], group["params"])),
                      group["momentum_format"])
    except ValueError as error:
        raise ValueError(f"param group {index}: {error}") from None


def resolve_plan(plan: Any, named: list[tuple[str, torch.Tensor]], **plan_kwargs) -> BlockPlan:
    """The optimizer's plan. A module is planned from its structure; tensors it leaves out (frozen
    ones) are planned from their names. A given BlockPlan must cover every parameter."""
    if plan is None:
        return plan_blocks(named, **plan_kwargs)
    if isinstance(plan, nn.Module):
        plan = plan_blocks(plan, **plan_kwargs)
        missing = [(n, p) for n, p in named if n not in plan]
        if missing:
            plan = plan.merged(plan_blocks(missing, **plan_kwargs))
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan must be a BlockPlan, an nn.Module or None, got {type(plan).__name__}")
    check_coverage(plan, named)
    return plan


__all__ = ["named_groups", "named_group", "reject_duplicates", "resolve_plan"]
