"""Non-finite gradients: a policy for the functional core.

``nonfinite_guard(inner, policy)`` wraps any transform:

The gradient checked is the raw one that entered the enclosing chain (``grads``), and the inner
transform receives it (and any ``extra_args``) as a chain member would.

* ``"skip"``: if any gradient element is NaN or Inf, the updates are zero and the inner state is
  left exactly as it was (step counts included); ``state.skipped`` counts such steps. Pure: the
  choice is a ``torch.where``, so it works under ``torch.compile`` and ``vmap``.
* ``"raise"``: raise ``FloatingPointError`` naming the parameters with non-finite gradients. This
  reads a flag on the host (one sync per step), so it does not trace under ``torch.compile``.
* ``"apply"``: run the inner transform as is, but still count the non-finite steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_map

from .base import GradientTransformation, Params, takes_extra_args

POLICIES = ("skip", "raise", "apply")


class NonFiniteState(NamedTuple):
    inner: Any  # the wrapped transform's state
    skipped: torch.Tensor  # () int64, steps whose gradient had a NaN or Inf


def all_finite(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """0-d bool: every element of every tensor is finite. One read of each tensor, no full-size
    temporary: NaN and Inf propagate into a tensor's sum (accumulated in at least fp32), so the sums
    are finite exactly when the elements are, unless a finite sum overflows fp32 (|sum| > 3e38),
    which is then treated as non-finite too. The sums are stacked (promoted to the widest dtype)
    and checked with one ``isfinite``."""
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors.values()]
    return torch.isfinite(torch.stack(sums)).all() if sums else torch.tensor(True)


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or Inf (host sync)."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else a ValueError listing them."""
    if policy not in POLICIES:
        raise ValueError(f"invalid nonfinite policy {policy!r}: use one of {list(POLICIES)}")
    return policy


def nonfinite_guard(inner: GradientTransformation, policy: str = "skip") -> GradientTransformation:
    """Apply a non-finite-gradient ``policy`` (``"skip"``, ``"raise"`` or ``"apply"``) around
    ``inner``; the state is ``NonFiniteState(inner, skipped)`` (see the module docstring)."""
    check_policy(policy)
    inner_takes_extra = takes_extra_args(inner)

    def init(params: Params) -> NonFiniteState:
        return NonFiniteState(inner.init(params), torch.zeros((), dtype=torch.int64))

    def update(updates, state, params=None, grads=None, **extra_args):
        gradient = updates if grads is None else grads
        finite = all_finite(gradient)
        if policy == "raise" and not bool(finite):
            raise FloatingPointError(f"non-finite gradient in {nonfinite_names(gradient)}; "
                                     f"the step was not applied")
        new_updates, new_inner = inner.update(updates, state.inner, params, grads,
                                              **(extra_args if inner_takes_extra else {}))
        skipped = state.skipped + (~finite).to(torch.int64)
        if policy == "skip":
            keep = lambda new, old: torch.where(finite, new, old)  # noqa: E731
            new_updates = {n: keep(u, torch.zeros_like(u)) for n, u in new_updates.items()}
            new_inner = tree_map(keep, new_inner, state.inner)
        return new_updates, NonFiniteState(new_inner, skipped)

    return GradientTransformation(init, update)
