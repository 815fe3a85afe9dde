"""Opaque ops for compiled steps: what ``torch.compile`` must not inline into the element loop.

Inductor fuses everything it can into one loop over the elements, including scalar math on 0-d
tensors. The bias correction ``1 - beta**t`` is such a scalar: inlined, ``pow`` (in float64) runs
once per vector of elements and made a compiled Adam-mini step ~1.7x slower on CPU. Under
``torch.compile`` the transforms call :data:`bias_correction` instead, which the compiler treats
as an external call, computed once per step; eagerly they run the same math directly. The op has a
fake (meta) kernel and a vmap rule, so compiled steps still work under ``torch.func``.
"""
from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("adam_mini_tx", "FRAGMENT")
_LIBRARY.define("bias_correction(float beta, Tensor count) -> Tensor")


def one_minus_power(beta: float | torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``1 - beta**count`` in float64, elementwise over the integer ``count`` (so that early steps,
    1 - 0.999 = 1e-3, keep full precision). The one definition of the bias correction: the eager
    transforms call it directly, compiled ones through the opaque op below. A float ``beta`` is a
    scalar base (three small ops, not four: the op runs once per compiled bucket call)."""
    exponent = count.to(torch.float64)
    if isinstance(beta, torch.Tensor):
        return 1 - beta.to(torch.float64) ** exponent
    return 1 - torch.pow(beta, exponent)


_LIBRARY.impl("bias_correction", one_minus_power, "CompositeExplicitAutograd")
bias_correction = torch.ops.adam_mini_tx.bias_correction.default


@torch.library.register_fake("adam_mini_tx::bias_correction")
def _(beta: float, count: torch.Tensor) -> torch.Tensor:
    return count.new_empty(count.shape, dtype=torch.float64)


@torch.library.register_vmap("adam_mini_tx::bias_correction")
def _(info, in_dims, beta: float, count: torch.Tensor):
    return bias_correction(beta, count), in_dims[1]
