"""Optimizers as short chains of the public transforms."""
from __future__ import annotations

import torch

from . import blocks
from .base import GradientTransformation, ScalarOrSchedule, check_betas, check_number, chain, identity
from .transforms import (PlanLike, blockwise_mean_square, decoupled_decay, momentum, partition,
                         scale_by_lr)


def decay_matrices_only(name: str, tensor: torch.Tensor) -> str:
    """The official Adam-mini mask: decay tensors with >= 2 dims, not norms and biases."""
    return "decay" if tensor.dim() >= 2 else "no_decay"


def adam_mini(lr: ScalarOrSchedule = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: ScalarOrSchedule = 0.0, *, plan: PlanLike = None,
              dim: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None,
              eps_root: float = 0.0, state_dtype: torch.dtype | None = None,
              decay_mask=decay_matrices_only) -> GradientTransformation:
    """Adam-mini (Zhang et al. 2024, Algorithm 1): Adam with one second moment per block.

    ``m = b1 m + (1-b1) g``;  ``v_b = b2 v_b + (1-b2) mean_b(g*g)``;
    ``p -= lr (m_hat / (sqrt(v_hat_b) + eps) + wd p)`` with bias-corrected ``m_hat, v_hat``.
    Blocks come from ``plan`` (or are planned from names/shapes with ``n_heads``/``n_kv_heads``).
    Weight decay applies where ``decay_mask(name, tensor) == "decay"``: >= 2-D tensors by default.
    """
    beta1, beta2 = check_betas(betas)
    return chain(
        momentum(beta1, state_dtype=state_dtype),
        blockwise_mean_square(beta2, plan, eps=eps, eps_root=eps_root, state_dtype=state_dtype,
                              dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads),
        partition({"decay": decoupled_decay(weight_decay), "no_decay": identity()}, decay_mask),
        scale_by_lr(lr),
    )


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
