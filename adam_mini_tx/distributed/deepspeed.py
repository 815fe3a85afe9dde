"""What DeepSpeed hands a client optimizer, read back as flat partitions of named parameters.

``deepspeed.initialize(model=..., optimizer=AdamMini(model.named_parameters()), config=...)``
replaces the tensors of the optimizer's param groups (the groups keep their ``param_names``):

* ZeRO stages 1 and 2 (and DeepSpeed's bf16 optimizer): one flat fp32 partition per group and
  rank; each model parameter's ``_hp_mapping`` says which of its elements lie where in it;
* ZeRO stage 3: one flat fp32 partition per sub-group (``ds_id`` ``"<first>_<last>"``), the
  concatenation of its parameters' ``ds_tensor`` slices (rank ``r`` holds elements
  ``[r*n, (r+1)*n)`` of each, ``n = partition_numel()``, the last one padded);
* stage 0 with bf16/fp16 weights: one flat fp32 copy of the whole group (no partitioning).

:func:`deepspeed_partitions` recognises these and returns each flat tensor with its
:class:`~adam_mini_tx.distributed.flat.FlatPartition`; it never imports deepspeed (only the
attributes DeepSpeed 0.19 sets on the parameters are read).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.blocks import BlockLayout
from .flat import FlatPartition, Fragment, flat_partition


def deepspeed_partitions(params: Sequence[torch.Tensor], names: Sequence[str],
                         originals: Mapping[str, torch.Tensor],
                         layouts: Mapping[str, BlockLayout]
                         ) -> list[tuple[torch.Tensor, FlatPartition]] | None:
    """``(flat tensor, partition)`` for every tensor of a group whose ``params`` DeepSpeed has
    replaced; None when they are the group's own tensors ``originals[name]`` (or not DeepSpeed's).
    A ValueError/NotImplementedError says what DeepSpeed set up that cannot be stepped exactly."""
    if len(params) == len(names) and all(originals.get(n) is p for n, p in zip(names, params)):
        return None
    trainable = [(name, originals[name]) for name in names
                 if name in originals and _optimized(originals[name])]
    if len(params) == len(trainable) != len(names) and all(
            p.shape == q.shape for p, (_, q) in zip(params, trainable)):
        raise NotImplementedError(
            "DeepSpeed's bf16/fp16 optimizer at ZeRO stage 0 keeps fp32 copies of the trainable "
            "parameters only, so the frozen ones lose their names: give AdamMini only the "
            "trainable parameters ((n, p) for n, p in model.named_parameters() if "
            "p.requires_grad), or use ZeRO stage 1")
    for name, param in trainable:
        numel = getattr(param, "ds_numel", param.numel())
        if layouts[name].num_rows * layouts[name].row_numel != numel:
            raise ValueError(f"parameter {name!r} has {numel} elements but its block plan entry "
                             f"has shape {layouts[name].shape}: plan the model before DeepSpeed "
                             f"partitions it (not under deepspeed.zero.Init), or pass plan=")
    found = []
    for flat in params:
        if isinstance(getattr(flat, "ds_id", None), str):
            found.append((flat, _stage3(flat, trainable, layouts)))
        elif trainable and all(hasattr(p, "_hp_mapping") for _, p in trainable):
            found.append((flat, _linked(flat, trainable, layouts)))
        elif flat.dim() == 1 and flat.numel() == sum(p.numel() for _, p in trainable):
            offsets = _cumulative([p.numel() for _, p in trainable])
            fragments = [Fragment(n, 0, o, p.numel()) for (n, p), o in zip(trainable, offsets)]
            found.append((flat, _partition(flat, trainable, fragments, layouts, None)))
        else:
            return None
    return found


def _optimized(param: torch.Tensor) -> bool:
    """DeepSpeed's rule: trainable and not empty (``ds_numel``: stage 3's full size)."""
    return param.requires_grad and getattr(param, "ds_numel", param.numel()) > 0


def _cumulative(sizes: Sequence[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


def _linked(flat: torch.Tensor, trainable: list[tuple[str, torch.Tensor]],
            layouts: Mapping[str, BlockLayout]) -> FlatPartition:
    """Stages 1/2 and the bf16 optimizer: fragments from each parameter's ``_hp_mapping``."""
    fragments = []
    for name, param in trainable:
        mapping = param._hp_mapping
        if mapping is None:
            continue
        if mapping.hp_fragment.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise ValueError(f"parameter {name!r} is mapped to another flat partition than its "
                             f"param group's: build the optimizer with the model's own param "
                             f"groups, one group per DeepSpeed group")
        fragments.append(Fragment(name, mapping.lp_fragment_address.start,
                                  mapping.hp_fragment_address.start,
                                  mapping.hp_fragment_address.numel))
    group = trainable[0][1]._dp_group
    return _partition(flat, trainable, fragments, layouts, group)


def _stage3(flat: torch.Tensor, trainable: list[tuple[str, torch.Tensor]],
            layouts: Mapping[str, BlockLayout]) -> FlatPartition:
    """Stage 3: the sub-group's parameters (``ds_id`` first to last), one slice of each."""
    ids = [getattr(p, "ds_id", None) for _, p in trainable]
    first, last = flat.ds_id.split("_")
    try:
        members = trainable[ids.index(int(first)): ids.index(int(last)) + 1]
    except ValueError:
        raise ValueError(f"DeepSpeed partition {flat.ds_id!r} holds parameters this param group "
                         f"does not list: build the optimizer from model.named_parameters() "
                         f"before deepspeed.initialize") from None
    group = getattr(members[0][1], "ds_process_group", None)
    rank = torch.distributed.get_rank(group)
    fragments, offset = [], 0
    for name, param in members:
        size = param.partition_numel()
        start = rank * size
        fragments.append(Fragment(name, start, offset, max(0, min(size, param.ds_numel - start))))
        offset += size
    if offset != flat.numel():
        raise ValueError(f"DeepSpeed partition {flat.ds_id!r} has {flat.numel()} elements but "
                         f"its parameters' slices {offset}: this DeepSpeed version partitions "
                         f"differently from 0.19; please report it")
    return _partition(flat, members, fragments, layouts, group)


def _partition(flat: torch.Tensor, members: list[tuple[str, torch.Tensor]],
               fragments: list[Fragment], layouts: Mapping[str, BlockLayout],
               group: Any) -> FlatPartition:
    """The partition, after checking its process group."""
    if group is not None and torch.distributed.get_world_size(group) != \
            torch.distributed.get_world_size():
        raise NotImplementedError(
            f"DeepSpeed partitions {members[0][0]!r} over {torch.distributed.get_world_size(group)}"
            f" of {torch.distributed.get_world_size()} ranks: AdamMini supports a data-parallel "
            f"group that is the whole world (no model, pipeline or hpZ/MiCS partition groups); "
            f"use FSDP2 with DTensor tensor parallelism for those")
    name = f"<DeepSpeed partition of {members[0][0]} .. {members[-1][0]}>"
    return flat_partition(name, fragments, [(n, layouts[n]) for n, _ in members], group)


__all__ = ["deepspeed_partitions"]
