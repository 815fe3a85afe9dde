"""The planner: which block layout every parameter gets, from a model's structure and config or
from names and shapes (plan), the architecture knowledge it reads (registry), and the printable
plan it returns (blockplan). It imports only the core's layouts."""
from .blockplan import BlockPlan, ParamBlocks, check_coverage, warn_fallbacks
from .plan import plan_blocks

__all__ = ["BlockPlan", "ParamBlocks", "check_coverage", "plan_blocks", "warn_fallbacks"]
