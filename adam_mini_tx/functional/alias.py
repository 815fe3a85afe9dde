"""Optimizers as short chains of the public transforms."""
from __future__ import annotations

import torch

from ..core import blocks
from ..core.lowbits import QuantizedMoment
from ..core.base import (EmptyState, GradientTransformation, ScalarOrSchedule, chain, check_betas,
                   check_number, identity)
from .transforms import (CountState, MomentumState, PartitionState, PlanLike,
                         RoundedMomentumState, SecondMomentState,
                         blockwise_mean_square, decoupled_decay, momentum, partition, scale_by_lr)


def decay_matrices_only(name: str, tensor: torch.Tensor) -> str:
    """The default decay mask: ``"decay"`` for tensors with >= 2 dims (matrices, embeddings),
    ``"no_decay"`` for norms, biases and other vectors."""
    return "decay" if tensor.dim() >= 2 else "no_decay"


def adam_mini(lr: ScalarOrSchedule = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: ScalarOrSchedule = 0.0, *, plan: PlanLike = None,
              dim: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None,
              eps_root: float = 0.0, state_dtype: torch.dtype | None = None,
              decay_mask="matrices", momentum_format: str | None = None,
              stochastic_rounding: bool = True, seed: int = 0) -> GradientTransformation:
    """Adam-mini (Zhang et al. 2024, Algorithm 1): Adam with one second moment per block.

    ``m = b1 m + (1-b1) g``;  ``v_b = b2 v_b + (1-b2) mean_b(g*g)``;
    ``p -= lr (m_hat / (sqrt(v_hat_b) + eps) + wd p)`` with bias-corrected ``m_hat, v_hat``.
    Blocks come from ``plan`` (or are planned from names/shapes with ``n_heads``/``n_kv_heads``).
    Weight decay applies where ``decay_mask(name, tensor) == "decay"``; a string names one of
    :data:`DECAY_MASKS` (default ``"matrices"``: tensors with >= 2 dims, like the official package).
    ``momentum_format`` / ``stochastic_rounding`` / ``seed``: how ``m`` is stored (see
    :func:`momentum`); ``v`` stays in ``state_dtype``.
    """
    if isinstance(decay_mask, str):
        decay_mask = DECAY_MASKS[check_decay_mask(decay_mask)]
    beta1, beta2 = check_betas(betas)
    return chain(
        momentum(beta1, state_dtype=state_dtype, momentum_format=momentum_format,
                 stochastic_rounding=stochastic_rounding, seed=seed),
        blockwise_mean_square(beta2, plan, eps=eps, eps_root=eps_root, state_dtype=state_dtype,
                              dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads),
        partition({"decay": decoupled_decay(weight_decay), "no_decay": identity()}, decay_mask),
        scale_by_lr(lr),
    )


def check_decay_mask(name: str) -> str:
    """``name`` if it is one of :data:`DECAY_MASKS`, else a ValueError listing them."""
    if name not in DECAY_MASKS:
        raise ValueError(f"invalid decay_mask={name!r}: use one of {sorted(DECAY_MASKS)} or a "
                         f"function (name, tensor) -> 'decay' | 'no_decay' (or weight_decay=0.0)")
    return name


def elementwise_plan(params: dict[str, torch.Tensor]) -> dict:
    """Every tensor gets elementwise blocks (one second moment per element), whatever its name."""
    return {name: blocks.elementwise(p.shape) for name, p in params.items()}


def adamw(lr: ScalarOrSchedule = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: ScalarOrSchedule = 1e-2, *, eps_root: float = 0.0,
          state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter) from the same pieces, with one block per element:
    ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)``; decays every parameter like
    ``torch.optim.AdamW``."""
    beta1, beta2 = check_betas(betas)
    check_number("weight_decay", weight_decay, 0.0)
    return chain(
        momentum(beta1, state_dtype=state_dtype),
        blockwise_mean_square(beta2, elementwise_plan, eps=eps, eps_root=eps_root,
                              state_dtype=state_dtype),
        decoupled_decay(weight_decay),
        scale_by_lr(lr),
    )


DECAY_MASKS = {
    "matrices": decay_matrices_only,
    "all": lambda name, tensor: "decay",
    "official": lambda name, tensor: "no_decay" if any(
        key in name.lower() for key in ("norm", "ln", "bias")) else "decay",
}
"""Named weight-decay masks: tensors with >= 2 dims (the default), every tensor (AdamW), or the
official package's rule (no decay where the lower-cased name contains norm, ln or bias)."""


def adam_mini_slots(state: tuple, name: str) -> dict[str, torch.Tensor]:
    """The per-parameter view of an :func:`adam_mini` state: ``{"step", "m", "v"}``, plus
    ``"m_scale"`` for an int8 ``m``.

    ``step`` is the shared 0-d step count, ``m`` the first moment (parameter shape; int8 codes
    whose per-group scales are ``m_scale``) and ``v`` the blockwise second moment (the layout's
    ``v_shape``). These are the stable, documented keys of :class:`~adam_mini_tx.AdamMini`'s
    ``state_dict``."""
    moment, second, _, _ = state
    m = moment.mu[name]
    if isinstance(m, QuantizedMoment):
        return {"step": moment.count, "m": m.codes, "m_scale": m.scales, "v": second.nu[name]}
    return {"step": moment.count, "m": m, "v": second.nu[name]}


def adam_mini_state_from_slots(slots: dict[str, dict[str, torch.Tensor]],
                               seed: torch.Tensor | None = None) -> tuple:
    """Inverse of :func:`adam_mini_slots`: the :func:`adam_mini` chain state of the parameters in
    ``slots`` (``name -> {"step", "m", "v"}``); with the rounding ``seed`` of a low-precision
    ``m``, a :class:`RoundedMomentumState`. They share one step count: the caller groups
    parameters by step."""
    step = next(iter(slots.values()))["step"]
    mu = {name: QuantizedMoment(s["m"], s["m_scale"]) if "m_scale" in s else s["m"]
          for name, s in slots.items()}
    return (MomentumState(step, mu) if seed is None else RoundedMomentumState(step, mu, seed),
            SecondMomentState(step, {name: s["v"] for name, s in slots.items()}),
            PartitionState({"decay": CountState(step), "no_decay": EmptyState()}),
            CountState(step))


OPTIMIZERS = {"adam_mini": adam_mini, "adamw": adamw}
"""Every optimizer alias the library exports, by name (the generic property tests run over all)."""
