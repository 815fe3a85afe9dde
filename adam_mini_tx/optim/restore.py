"""Loading a checkpoint into an AdamMini: every check first, then one swap of state and groups.

:func:`restored` reads a state dict (torch.optim's format plus ``"plan"``) against the
optimizer's groups and plan and returns the new ``(param_groups, state)``, or raises a
ValueError naming what is wrong; nothing is changed until the caller installs the result.
Checked: group sizes, parameter names (when saved), each group's hyperparameters, the block
plan (when saved; torch.distributed.checkpoint hands back none), and every state value's keys,
shape, dtype and values (an integer step >= 0; ``m`` and ``v`` floating and free of NaN; ``v``
non-negative; an infinite ``v`` is what an overflowing statistic leaves and loads as it is). A
low-precision ``m`` of a DTensor parameter must be a DTensor on its mesh, and is placed as the
step reads it (:func:`adam_mini_tx.functional.shards.placed`).
Names saved through a wrapper (``_orig_mod.`` from ``torch.compile``, ``module.`` from DDP, or
both) are recognised: every saved name is one dotted prefix away from this optimizer's.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.blocks import is_dtensor
from ..functional.moments import LOW_PRECISION
from ..planning import BlockPlan
from .hyperparams import HYPERPARAMETERS, read_hyperparameters
from ..core.lowbits import group_count
from .members import group_entries
from .state import own_copy, slot_keys

logger = logging.getLogger("adam_mini_tx")

_LAYOUT_FIELDS = ("shape", "perm", "row_dims", "runs")  # what a plan entry means for the state


def restored(state_dict: Any, groups: Sequence[Mapping[str, Any]], plan: BlockPlan,
             state_dtype: torch.dtype | None, originals: Mapping[str, torch.Tensor]
             ) -> tuple[list[dict[str, Any]], dict]:
    """The param groups and state that loading ``state_dict`` gives (see the module
    docstring). State keeps its saved dtype unless ``state_dtype`` was given explicitly (it then
    applies to ``v``, and to ``m`` when no ``momentum_format`` sets ``m``'s).
    ``originals``: name -> the parameter the optimizer was given (a group whose tensors
    DeepSpeed replaced by flat partitions is checked against those partitions)."""
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict \
            or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("not an optimizer state dict: expected a mapping with 'state' (a "
                         "mapping) and 'param_groups' (pass optimizer.state_dict())")
    saved_groups = state_dict["param_groups"]
    _check_groups(saved_groups, groups)
    rename = _renaming(saved_groups, groups)
    if "plan" in state_dict:
        _check_plan(state_dict["plan"], plan, rename)
    known = set()
    state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    layouts = plan.layouts()
    for number, (saved, group) in enumerate(zip(saved_groups, groups)):
        known.update(saved["params"])
        for index, entry in zip(saved["params"], group_entries(group, number, originals, layouts)):
            slots = state_dict["state"].get(index)
            if slots is not None:
                _check_slots(entry.name, entry.param, slots, entry.v_shape,
                             group.get("momentum_format"))
                follows = ("v", "m") if group.get("momentum_format") is None else ("v",)
                state[entry.param] = {key: own_copy(value, _device(key, value, entry.param),
                                                    state_dtype if key in follows else None)
                                      for key, value in slots.items()}
                if group.get("momentum_format") in LOW_PRECISION and is_dtensor(entry.param):
                    from ..functional import shards  # a DTensor: torch.distributed is loaded
                    state[entry.param] = {
                        key: shards.placed(entry.name, key, value, entry.param)
                        if key in ("m", "m_scale") else value
                        for key, value in state[entry.param].items()}
    unknown = [index for index in state_dict["state"] if index not in known]
    if unknown:
        raise ValueError(f"checkpoint has state for parameter ids {unknown[:5]} that no param "
                         f"group lists: the checkpoint is damaged or from another optimizer")
    new_groups = []
    for saved, group in zip(saved_groups, groups):  # the saved keys in their order, as torch
        new_group = dict(saved)
        new_group["params"], new_group["param_names"] = group["params"], group["param_names"]
        new_group.setdefault("nonfinite_skipped", 0)  # checkpoints from before the count
        new_groups.append(new_group)
    return new_groups, state


def _device(key: str, value: Any, param: torch.Tensor) -> torch.device:
    """Where a loaded state value goes: ``m`` and ``v`` to the parameter, the step stays."""
    return value.device if key == "step" and isinstance(value, torch.Tensor) else param.device


def _check_groups(saved_groups: Any, groups: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
        count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
        official = isinstance(saved_groups, (list, tuple)) and bool(saved_groups) and all(
            isinstance(g, Mapping) and "beta1" in g for g in saved_groups)
        raise ValueError(f"checkpoint has {count} param groups but this optimizer has "
                         f"{len(groups)}: " + (
                             "it was saved by the official adam-mini package (one group per "
                             "tensor, beta1/beta2): load it with adam_mini_tx.Adam_mini, which "
                             "converts it (see docs/migration.md)" if official else
                             "build the optimizer with the same groups"))
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        where = f"checkpoint param group {index}"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{where} is not a mapping with a 'params' list: the checkpoint is "
                             f"damaged; use an earlier one")
        missing = [key for key in HYPERPARAMETERS if key not in saved]
        if missing or not isinstance(saved.get("param_names", []), (list, tuple)):
            raise ValueError(f"{where} lacks {missing or 'a param_names list'}: the checkpoint is "
                             f"damaged or was not saved by AdamMini")
        try:
            read_hyperparameters(saved, f"{where}: ")
        except (ValueError, TypeError) as error:
            raise ValueError(f"{error}; the checkpoint is damaged") from None
        if saved.get("momentum_format") != group.get("momentum_format"):
            raise ValueError(f"{where} was saved with momentum_format="
                             f"{saved.get('momentum_format')!r} but this optimizer's is "
                             f"{group.get('momentum_format')!r}: build it with the same format")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} has {len(saved['params'])} parameters but this "
                             f"optimizer's has {len(group['params'])}")


def _renaming(saved_groups: Sequence[Mapping[str, Any]],
              groups: Sequence[Mapping[str, Any]]) -> Callable[[str], str]:
    """Saved name -> this optimizer's name: the identity, or one dotted prefix stripped or added
    for every name alike. A ValueError names the first parameter that differs otherwise."""
    pairs = [(theirs, mine, index, position)
             for index, (saved, group) in enumerate(zip(saved_groups, groups))
             if saved.get("param_names") is not None
             for position, (theirs, mine) in enumerate(zip(saved["param_names"],
                                                           group["param_names"]))]
    different = [pair for pair in pairs if pair[0] != pair[1]]
    if not different:
        return lambda name: name
    theirs, mine, index, position = different[0]
    if theirs.endswith("." + mine):
        prefix = theirs[:-len(mine)]
        if all(t == prefix + m for t, m, _, _ in pairs):
            logger.info("AdamMini: checkpoint names carry the prefix %r; loading them without it",
                        prefix)
            return lambda name: name[len(prefix):] if name.startswith(prefix) else name
    if mine.endswith("." + theirs):
        prefix = mine[:-len(theirs)]
        if all(prefix + t == m for t, m, _, _ in pairs):
            logger.info("AdamMini: this model's names carry the prefix %r that the checkpoint's "
                        "lack; loading them with it", prefix)
            return lambda name: prefix + name
    raise ValueError(f"checkpoint param group {index} holds {theirs!r} at position {position} "
                     f"where this optimizer has {mine!r}: give the parameters in the same order "
                     f"as when it was saved{_prefix_hint(theirs, mine)}")


def _prefix_hint(theirs: str, mine: str) -> str:
    if theirs.endswith("." + mine):
        return (f" (names differ by the prefix {theirs[:-len(mine)]!r}, but not all of them "
                f"alike: strip it from the checkpoint's param_names and plan)")
    if mine.endswith("." + theirs):
        return (f" (this model's names carry the prefix {mine[:-len(theirs)]!r}, but not all "
                f"alike: build the optimizer from the unwrapped model)")
    return ""


def _check_plan(saved: Any, plan: BlockPlan, rename: Callable[[str], str]) -> None:
    if not isinstance(saved, Mapping):
        raise ValueError("checkpoint 'plan' is not a mapping: the checkpoint is damaged")
    saved = {rename(name): entry for name, entry in saved.items()}
    mine = plan.to_dict()
    for name in [*mine, *(n for n in saved if n not in mine)]:
        if _layout_of(mine.get(name)) != _layout_of(saved.get(name)):
            raise ValueError(f"checkpoint was saved with another block plan: parameter {name!r} "
                             f"is {_describe(saved.get(name))} in the checkpoint but "
                             f"{_describe(mine.get(name))} here; load it into the same model "
                             f"with the same plan")


def _check_slots(name: str, param: torch.Tensor, slots: Any, v_shape: tuple[int, ...],
                 momentum_format: str | None) -> None:
    keys = slot_keys(momentum_format)
    if not isinstance(slots, Mapping) or set(slots) != set(keys):
        got = sorted(slots) if isinstance(slots, Mapping) else type(slots).__name__
        raise ValueError(f"checkpoint state of parameter {name!r} has keys {got}, expected "
                         f"{list(keys)}: it was not saved by AdamMini with this momentum_format")
    step = slots["step"]
    if isinstance(step, int) and not isinstance(step, bool):  # torch's optimizers accept it
        step = torch.tensor(step)
    expected = {"step": (), "m": tuple(param.shape), "v": v_shape,
                "m_scale": (*param.shape[:-1], group_count(tuple(param.shape)))
                if param.dim() else (1,)}
    for key in keys:
        value = step if key == "step" else slots[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[key]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"checkpoint state {key!r} of parameter {name!r} has shape {got}, "
                             f"expected {expected[key]}: the checkpoint is from another model or "
                             f"plan")
        local = value.to_local() if hasattr(value, "to_local") else value
        if key == "step":
            valid = not (local.is_floating_point() or local.is_complex()
                         or local.dtype == torch.bool) and int(local) >= 0
            wanted = "a non-negative integer count"
        elif key == "m" and momentum_format == "int8":
            valid, wanted = local.dtype == torch.int8, "int8 codes"
        else:
            valid = local.is_floating_point() and not bool(torch.isnan(local).any())
            valid = valid and (key == "m" or bool((local >= 0).all()))
            wanted = ("floating-point values free of NaN" if key == "m" else
                      "non-negative floating-point values (a mean of squares, or scales)")
        if not valid:
            raise ValueError(f"checkpoint state {key!r} of parameter {name!r} ({local.dtype}) "
                             f"does not hold {wanted}: the checkpoint is corrupt; use an "
                             f"earlier one")


def _layout_of(entry: Any) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    return tuple(_as_tuple(entry.get(key)) for key in _LAYOUT_FIELDS)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _describe(entry: Any) -> str:
    if not isinstance(entry, Mapping):
        return "absent" if entry is None else repr(entry)
    return f"shape {entry.get('shape')} blocked {entry.get('pattern')!r}"


__all__ = ["restored"]
