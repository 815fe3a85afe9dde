"""adam_mini_tx: Adam-mini as composable, pure PyTorch transforms (plus a torch.optim wrapper)."""
from .alias import adam_mini, adamw, decay_matrices_only, elementwise_plan
from .base import GradientTransformation, apply_updates, chain, identity
from .blocks import BlockLayout, elementwise, fused_rows, per_head, per_row, single_block
from .compat import Adam_mini
from .donation import donated_update
from .guards import nonfinite_guard
from .optim import AdamMini
from .plan import BlockPlan, ParamBlocks, plan_blocks, warn_fallbacks
from .transforms import (blockwise_mean_square, clip_by_global_norm, decoupled_decay, momentum,
                         partition, safe_sqrt, scale_by_lr)

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
