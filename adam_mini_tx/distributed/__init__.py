"""Distributed adapters: parameters that a framework has cut into flat partitions.

* :mod:`.flat`: fragments of parameters in a flat 1-D partition, as pieces with block layouts,
  and their statistics summed over the ranks (framework-free);
* :mod:`.deepspeed`: DeepSpeed ZeRO's partitions recognised from what it sets on the parameters.

DTensor parameters (FSDP2, tensor parallel) need no adapter: the layouts reduce over the
DTensor's own mesh (:mod:`adam_mini_tx.core.blocks`).
"""
from .deepspeed import deepspeed_partitions
from .flat import FlatPartition, Fragment, Piece, flat_partition

__all__ = ["deepspeed_partitions", "FlatPartition", "Fragment", "Piece", "flat_partition"]
