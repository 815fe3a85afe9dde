"""Hugging Face ``Trainer`` integration.

One line::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(create_optimizer(model, args), None))

The optimizer takes the Trainer's optimizer arguments (``learning_rate``, ``adam_beta1``,
``adam_beta2``, ``adam_epsilon``, ``weight_decay``); the blocks come from the model's config
(heads, KV heads, head_dim) and module types. The Trainer builds its usual scheduler around it.
``state_dtype=torch.float32`` keeps the optimizer state in fp32 for a bf16 model (by default the
state takes each parameter's dtype).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..optim import AdamMini
from ..planning import plan_blocks


def optimizer_kwargs(args: Any) -> dict[str, Any]:
    """AdamMini keyword arguments from ``transformers.TrainingArguments``."""
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon, weight_decay=args.weight_decay)


def create_optimizer(model: nn.Module, args: Any, *, state_dtype: torch.dtype | None = None,
                     **overrides: Any) -> AdamMini:
    """An :class:`AdamMini` for ``model`` configured from ``args`` (``TrainingArguments``), with
    its state in ``state_dtype`` (default: each parameter's dtype); other ``overrides`` (e.g.
    ``fused=True``) are passed on."""
    plan = overrides.pop("plan", None) or plan_blocks(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return AdamMini(named, plan=plan, state_dtype=state_dtype,
                    **{**optimizer_kwargs(args), **overrides})


def optimizer_cls_and_kwargs(model: nn.Module, args: Any, *,
                             state_dtype: torch.dtype | None = None,
                             **overrides: Any) -> tuple[type, dict[str, Any]]:
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: the class and its keyword arguments (the
    Trainer passes ``model.parameters()``, so the plan carries the names); ``state_dtype`` and
    ``overrides`` as for :func:`create_optimizer`."""
    return AdamMini, {**optimizer_kwargs(args), "plan": model, "state_dtype": state_dtype,
                      **overrides}


__all__ = ["create_optimizer", "optimizer_cls_and_kwargs", "optimizer_kwargs"]
