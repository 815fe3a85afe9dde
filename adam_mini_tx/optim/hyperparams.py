"""A param group's hyperparameters, validated and normalised once at the step's boundary.

``read_hyperparameters(group)`` is the one check of a group's values, whether they are Python
numbers or one-element tensors (a scheduler's, a checkpoint's, or the user's): construction,
``add_param_group``, ``load_state_dict`` and every step call it. What it returns holds plain
floats; a backend that compiles turns them into 0-d tensor *arguments* of its compiled
function (:func:`scalar_arguments`), so no value a scheduler or a checkpoint writes ever
recompiles. Only ``eps_root``, ``decay_mask`` and how ``m`` is stored (``momentum_format``,
``stochastic_rounding``, ``momentum_seed``) shape the compiled code.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch

from ..functional.alias import adam_mini, check_decay_mask
from ..functional.moments import LOW_PRECISION, check_format
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
    momentum_format: str | None = None
    stochastic_rounding: bool = True
    seed: int = 0

    @property
    def rounding_seed(self) -> int | None:
        """The seed of a low-precision ``m``'s rounding; None for a float ``m``."""
        return self.seed if self.momentum_format in LOW_PRECISION else None

    def static(self) -> Hyper:
        """What shapes the code (the float values zeroed): a compiled bucket's key."""
        return self._replace(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0)


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
        check_format(group.get("momentum_format"))
        rounding = group.get("stochastic_rounding", True)
        if not isinstance(rounding, bool):
            raise TypeError(f"stochastic_rounding={rounding!r} must be True or False")
        for key in ("nonfinite_skipped", "momentum_seed"):
            count = group.get(key, 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{key}={count!r} must be an integer >= 0")
        return Hyper(_float(group["lr"]), _float(beta1), _float(beta2), _float(group["eps"]),
                     _float(group["weight_decay"]), _float(group["eps_root"]),
                     group["decay_mask"], group.get("momentum_format"), rounding,
                     group.get("momentum_seed", 0))
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


def from_scalar_arguments(scalars: torch.Tensor, static: Hyper) -> Hyper:
    """The inverse of :func:`scalar_arguments` over ``static`` (:meth:`Hyper.static`), inside a
    compiled function (0-d views)."""
    return static._replace(lr=scalars[0], beta1=scalars[1], beta2=scalars[2], eps=scalars[3],
                           weight_decay=scalars[4])


def chain_for(hyper: Hyper, layouts: Mapping[str, BlockLayout],
              decay_label: Callable[[str, torch.Tensor], str] | None = None
              ) -> GradientTransformation:
    """The group's :func:`~adam_mini_tx.adam_mini` chain for this step's ``hyper``, over
    ``layouts`` (``name -> BlockLayout``); ``decay_label`` overrides the group's mask (a
    compiled bucket whose tensors all have one label)."""
    return adam_mini(hyper.lr, (hyper.beta1, hyper.beta2), hyper.eps, hyper.weight_decay,
                     plan=layouts, eps_root=hyper.eps_root,
                     decay_mask=decay_label or hyper.decay_mask,
                     momentum_format=hyper.momentum_format,
                     stochastic_rounding=hyper.stochastic_rounding, seed=hyper.seed)


__all__ = ["HYPERPARAMETERS", "Hyper", "read_hyperparameters", "scalar_arguments",
           "from_scalar_arguments", "chain_for"]
