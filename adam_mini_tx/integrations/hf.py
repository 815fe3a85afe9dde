"""Hugging Face ``Trainer`` integration.

One line::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(create_optimizer(model, args), None))

The optimizer takes the Trainer's optimizer arguments (``learning_rate``, ``adam_beta1``,
``adam_beta2``, ``adam_epsilon``, ``weight_decay``); the blocks come from the model's config
(heads, KV heads, head_dim) and module types. The Trainer builds its usual scheduler around it.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..optim import AdamMini
from ..planning import plan_blocks


def optimizer_kwargs(args: Any) -> dict[str, Any]:
    """AdamMini keyword arguments from ``transformers.TrainingArguments``."""
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon, weight_decay=args.weight_decay)


def create_optimizer(model: nn.Module, args: Any, **overrides: Any) -> AdamMini:
    """An :class:`AdamMini` for ``model`` configured from ``args`` (``TrainingArguments``);
    ``overrides`` (e.g. ``state_dtype=torch.float32``) are passed on."""
    plan = overrides.pop("plan", None) or plan_blocks(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return AdamMini(named, plan=plan, **{**optimizer_kwargs(args), **overrides})


def optimizer_cls_and_kwargs(model: nn.Module, args: Any) -> tuple[type, dict[str, Any]]:
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: the class and its keyword arguments (the
    Trainer passes ``model.parameters()``, so the plan carries the names)."""
    return AdamMini, {**optimizer_kwargs(args), "plan": model}


__all__ = ["create_optimizer", "optimizer_cls_and_kwargs", "optimizer_kwargs"]
