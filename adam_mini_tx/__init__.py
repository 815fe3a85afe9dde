"""adam_mini_tx: Adam-mini as composable, pure PyTorch transforms (plus a torch.optim wrapper).

Layers, bottom up: ``core`` (the transform protocol, ``chain``, block layouts, donation, the
non-finite guard), ``planning`` (which blocks each parameter gets), ``functional`` (the
transforms and optimizer aliases), ``optim`` (``AdamMini``: the step, its backends, state and
checkpoints), and the faces (``compat``, ``checkpoint``, ``cli``, ``demo``, ``integrations``).
"""
from .compat import Adam_mini
from .core import blocks  # noqa: F401  (amx.blocks: the layout constructors)
from .core.base import GradientTransformation, apply_updates, chain, identity
from .core.blocks import BlockLayout, elementwise, fused_rows, per_head, per_row, single_block
from .core.donation import donated_update
from .core.guards import nonfinite_guard
from .functional.alias import adam_mini, adamw, decay_matrices_only, elementwise_plan
from .functional.transforms import (blockwise_mean_square, clip_by_global_norm, decoupled_decay,
                                    momentum, partition, safe_sqrt, scale_by_lr)
from .optim import AdamMini
from .planning import BlockPlan, ParamBlocks, plan_blocks, warn_fallbacks

__version__ = "0.1.0"

__all__ = [
    # optimizers
    "AdamMini", "Adam_mini", "adam_mini", "adamw",
    # transforms and combinators
    "momentum", "blockwise_mean_square", "decoupled_decay", "scale_by_lr", "partition",
    "clip_by_global_norm", "nonfinite_guard", "chain", "identity", "apply_updates",
    "donated_update",
    "GradientTransformation", "safe_sqrt", "decay_matrices_only", "elementwise_plan",
    # block layouts and plans
    "plan_blocks", "BlockPlan", "ParamBlocks", "warn_fallbacks",
    "BlockLayout", "elementwise", "single_block", "per_row", "per_head", "fused_rows",
]
