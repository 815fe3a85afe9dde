"""The step's non-finite decision: apply, skip, or raise, read from the statistics pass.

A row sum of squares is finite exactly when its gradient row is, unless a finite gradient's
squares overflow the sum's dtype (an fp32 element above ~1.8e19). So the check reads the
statistics (one host sync per step) and looks at the gradients themselves only when a sum is
not finite: then either a gradient holds NaN/Inf (the policy decides), or the sums overflowed
and are computed again in float64 (:attr:`Decision.widened`), so that ``v`` stays finite
wherever ``(1 - b2) g**2`` is. A flat partition's sums (DeepSpeed ZeRO) are summed over the
ranks: when they are not finite, every rank skips (or raises) alike, whichever rank's gradient
it was; an overflow there is not widened but skipped too.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..core.blocks import BlockLayout
from ..core.guards import all_finite, nonfinite_names
from .members import Member


class Decision(NamedTuple):
    apply: bool  # False: the step is skipped
    widened: dict[str, torch.Tensor]  # float64 row sums replacing ones that overflowed
    bad: list[str]  # the parameters whose gradient holds NaN or Inf


def decide(policy: str, members: Sequence[Member], sums: Mapping[str, torch.Tensor],
           flags: Sequence[torch.Tensor], layouts: Mapping[str, BlockLayout]) -> Decision:
    """The decision for ``members`` given the statistics pass's ``sums`` and ``flags`` (members
    it left out are checked on their gradients). ``"raise"`` raises FloatingPointError."""
    rest = {m.name: m.grad for m in members if m.name not in sums}
    flags = [*flags, all_finite(rest)] if rest else list(flags)
    flags = [flag for flag in flags if flag.device.type != "meta"]  # no values to check
    if not flags or bool(torch.stack([flag.to(flags[0].device) for flag in flags]).all()):
        return Decision(True, {}, [])
    names = nonfinite_names({m.name: m.grad for m in members if m.grad.device.type != "meta"})
    names += [m.name for m in members  # summed over ranks: another rank's gradient, or overflow
              if m.partition is not None and m.name not in names and not _finite(sums[m.name])]
    if names and policy == "raise":
        raise FloatingPointError(f"non-finite gradient in {names}; the step was not applied")
    if names:
        return Decision(False, {}, names)
    widened = {m.name: layouts[m.name].row_sums_of_squares(m.grad, torch.float64)
               for m in members if m.name in sums and not _finite(sums[m.name])}
    return Decision(True, widened, [])


def _finite(sums: torch.Tensor) -> bool:
    return bool(torch.isfinite(sums).all())


def record_skip(param_groups: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Count a skipped step in every group and warn, naming the parameters."""
    for group in param_groups:
        group["nonfinite_skipped"] += 1
    warnings.warn(f"AdamMini skipped a step: non-finite gradient in {names[:5]} "
                  f"({param_groups[0]['nonfinite_skipped']} skipped so far)",
                  RuntimeWarning, stacklevel=4)


__all__ = ["Decision", "decide", "record_skip"]
