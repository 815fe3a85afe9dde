"""A param group's hyperparameters, validated and normalised once at the step's boundary.

``read_hyperparameters(group)`` is the one check of a group's values, whether they are Python
numbers or one-element tensors (a scheduler's, a checkpoint's, or the user's): construction,
``add_param_group``, ``load_state_dict`` and every step call it. What it returns holds plain
floats; a backend that compiles turns them into 0-d tensor *arguments* of its compiled
function (:func:`scalar_arguments`), so no value a scheduler or a checkpoint writes ever
recompiles. Only ``eps_root`` and ``decay_mask`` shape the compiled code.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch

from ..functional.alias import adam_mini, check_decay_mask
from ..core.base import GradientTransformation, check_betas, check_number
from ..core.blocks import BlockLayout

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "decay_mask", "eps_root")
"""The keys every AdamMini param group holds."""

Scalar = Union[float, torch.Tensor]


class Hyper(NamedTuple):
    """One group's hyperparameters for one step: floats, or 0-d tensors inside a compiled
    backend (see :func:`scalar_arguments`)."""

    lr: Scalar
    beta1: Scalar
    beta2: Scalar
    eps: Scalar
    weight_decay: Scalar
    eps_root: float
    decay_mask: str


def read_hyperparameters(group: Mapping[str, Any], where: str) -> Hyper:
    """``group``'s hyperparameters as floats, after checking every one (a ValueError or
    TypeError that starts with ``where``, e.g. ``"param group 1: "``)."""
    try:
        check_number("lr", group["lr"], 0.0)
        beta1, beta2 = check_betas(group["betas"])
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_number("eps_root", group["eps_root"], 0.0)
        check_decay_mask(group["decay_mask"])
        skipped = group.get("nonfinite_skipped", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"nonfinite_skipped={skipped!r} must be a count >= 0")
        return Hyper(_float(group["lr"]), _float(beta1), _float(beta2), _float(group["eps"]),
                     _float(group["weight_decay"]), _float(group["eps_root"]),
                     group["decay_mask"])
    except (ValueError, TypeError) as error:
        raise type(error)(where + str(error)) from None


def _float(value: Scalar) -> float:
    """A checked hyperparameter as a Python float (a tensor's one value; a meta tensor has
    none and is refused)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError("a hyperparameter on the meta device has no value: pass a float")
        return float(value.item())
    return float(value)


def scalar_arguments(hyper: Hyper, device: torch.device) -> torch.Tensor:
    """``(lr, beta1, beta2, eps, weight_decay)`` as one float64 tensor on ``device`` (one copy
    to the device per step): the compiled backend's argument."""
    return torch.tensor([hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay],
                        dtype=torch.float64, device=device)


def from_scalar_arguments(scalars: torch.Tensor, eps_root: float, decay_mask: str) -> Hyper:
    """The inverse of :func:`scalar_arguments`, inside a compiled function (0-d views)."""
    return Hyper(scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], eps_root, decay_mask)


def chain_for(hyper: Hyper, layouts: Mapping[str, BlockLayout],
              decay_label: Callable[[str, torch.Tensor], str] | None = None
              ) -> GradientTransformation:
    """The group's :func:`~adam_mini_tx.adam_mini` chain for this step's ``hyper``, over
    ``layouts`` (``name -> BlockLayout``); ``decay_label`` overrides the group's mask (a
    compiled bucket whose tensors all have one label)."""
    return adam_mini(hyper.lr, (hyper.beta1, hyper.beta2), hyper.eps, hyper.weight_decay,
                     plan=layouts, eps_root=hyper.eps_root,
                     decay_mask=decay_label or hyper.decay_mask)


__all__ = ["HYPERPARAMETERS", "Hyper", "read_hyperparameters", "scalar_arguments",
           "from_scalar_arguments", "chain_for"]
