"""``Adam_mini``: a drop-in for the official ``adam_mini.Adam_mini`` (version 1.1.1).

Same signature and the same numbers on models the official package handles (Llama-style names),
with three deliberate differences:

* blocks come from the planner: q/k are cut per head from ``n_heads`` / ``n_kv_heads`` (the official
  reshapes by ``dim * dim / n_heads``, which crashes or mis-blocks when ``head_dim * n_heads != dim``);
  names are matched by whole components (``network`` is not ``wo``);
* it logs (``logging.getLogger("adam_mini_tx")``) instead of printing;
* one param group for all tensors instead of one per tensor, so schedulers and per-group settings
  behave as in any torch optimizer.

Weight decay follows the official rule: none where the lower-cased name contains ``norm``, ``ln`` or
``bias`` (``decay_mask="official"``).
"""
from __future__ import annotations

import logging
import warnings
from typing import Iterable

import torch

from .optim import AdamMini

logger = logging.getLogger("adam_mini_tx")


class Adam_mini(AdamMini):  # noqa: N801 - the official package's name
    """Drop-in replacement for ``adam_mini.Adam_mini`` with the official signature."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                 lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, model_sharding: bool | None = None,
                 dim: int = 2048, n_heads: int = 32, n_kv_heads: int | None = None,
                 verbose: bool = True):
        if model_sharding is not None:
            warnings.warn("model_sharding is ignored: sharding is read from each DTensor parameter",
                          DeprecationWarning, stacklevel=2)
        trainable = [(name, p) for name, p in named_parameters if p.requires_grad]
        super().__init__(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, decay_mask="official")
        if verbose:
            logger.info("Adam-mini block plan:\n%s", self.plan)
            if self.plan.fallbacks:
                logger.warning("Adam-mini: no structural match for %s; they get one block per "
                               "output row. Check the plan or pass a plan with rules.",
                               ", ".join(self.plan.fallbacks))
