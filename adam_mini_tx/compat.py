"""``Adam_mini``: a drop-in for the official ``adam_mini.Adam_mini`` (version 1.1.1).

Same signature, and the same numbers on the models the official package handles (Llama-style
names: ``embed_tokens``, ``q_proj`` ... ``lm_head``; grouped-query attention included).

Kept from the official package, for fidelity:

* the update: ``m = b1 m + (1-b1) g``, ``v_b = b2 v_b + (1-b2) mean_b(g*g)``,
  ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat_b) + eps)``;
* its weight-decay rule, substring quirk included: no decay where the lower-cased name contains
  ``norm``, ``ln`` or ``bias`` (``decay_mask="official"``), so a 2-D ``relative_attention_bias``
  is not decayed either (:class:`~adam_mini_tx.AdamMini`'s default decays every tensor with >= 2 dims);
* frozen parameters (``requires_grad=False``) are left out; ``model_sharding`` is accepted.

Fixed:

* blocks come from the planner. q/k get one block per head from ``n_heads`` / ``n_kv_heads``
  (the official cuts ``view(-1, dim * dim / n_heads)``: it crashes when ``dim`` is left at its
  default on a model of another width, and cuts heads in pieces when ``head_dim * n_heads != dim``;
  ``dim`` is accepted and unused). Names are matched by whole components, and architectures the
  official crashes on (BERT, ViT, T5, GPT-NeoX, 3-D experts) are planned from their shapes;
* it logs the block table (``logging.getLogger("adam_mini_tx")``) instead of printing;
* one param group for all tensors instead of one per tensor (``betas`` instead of ``beta1`` /
  ``beta2`` keys), state keys ``step`` / ``m`` / ``v`` with a 0-d tensor step, checkpoints checked
  on load. Official checkpoints (``vmean``, ``head_per_gpu``...) cannot be loaded.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Mapping

import torch

from .optim import AdamMini

logger = logging.getLogger("adam_mini_tx")


class Adam_mini(AdamMini):  # noqa: N801 - the official package's name
    """Drop-in replacement for ``adam_mini.Adam_mini`` with the official signature (see the module
    docstring for what is kept and what is fixed). ``named_parameters``: ``(name, param)`` pairs,
    usually ``model.named_parameters()``, or named param groups."""

    def __init__(self, named_parameters: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, model_sharding: bool | None = None,
                 dim: int = 2048, n_heads: int = 32, n_kv_heads: int | None = None,
                 verbose: bool = True):
        if model_sharding is not None:
            warnings.warn("Adam_mini: model_sharding is deprecated (as in the official package) and "
                          "ignored: sharding is read from each DTensor parameter",
                          DeprecationWarning, stacklevel=2)
        super().__init__(_trainable(named_parameters), lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, dim=dim, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, decay_mask="official")
        if verbose:
            logger.info("Adam-mini block plan:\n%s", self.plan)
            if self.plan.fallbacks:
                logger.warning("Adam-mini: no structural match for %s; they get one block per "
                               "output row (>= 2 dims) or one block. Check the plan or use "
                               "AdamMini(..., plan=amx.plan_blocks(model, rules=...)).",
                               ", ".join(self.plan.fallbacks))


def _trainable(named_parameters: Iterable[Any]) -> list[Any]:
    """The official package skips parameters with ``requires_grad=False``; so do we."""
    items = list(named_parameters)
    if items and all(isinstance(item, Mapping) for item in items):
        return [{**group, "params": _trainable(group["params"])} for group in items]
    return [item for item in items
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[1], torch.Tensor) and not item[1].requires_grad)]


__all__ = ["Adam_mini"]
