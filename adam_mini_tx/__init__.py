"""adam_mini_tx: Adam-mini as composable, pure PyTorch transforms (plus a torch.optim wrapper)."""
from .alias import adam_mini, adamw, decay_matrices_only, elementwise_plan
from .base import GradientTransformation, apply_updates, chain, identity
from .compat import Adam_mini
from .guards import nonfinite_guard
from .optim import AdamMini
from .blocks import BlockLayout, elementwise, fused_rows, per_head, per_row, single_block
from .plan import BlockPlan, ParamBlocks, plan_blocks
from .transforms import (blockwise_mean_square, clip_by_global_norm, decoupled_decay, momentum,
                         partition, safe_sqrt, scale_by_lr)

__version__ = "0.1.0"

__all__ = [
    "AdamMini", "Adam_mini",
    "nonfinite_guard",
    "adam_mini", "adamw", "decay_matrices_only", "elementwise_plan",
    "GradientTransformation", "apply_updates", "chain", "identity",
    "BlockLayout", "elementwise", "fused_rows", "per_head", "per_row", "single_block",
    "BlockPlan", "ParamBlocks", "plan_blocks",
    "blockwise_mean_square", "clip_by_global_norm", "decoupled_decay", "momentum", "partition", "safe_sqrt", "scale_by_lr",
]
