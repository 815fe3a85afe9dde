"""The flat-partition backend: the chain over the pieces of DeepSpeed ZeRO's flat partitions.

A member with a :class:`~adam_mini_tx.distributed.FlatPartition` is a 1-D tensor holding
fragments of several parameters. Its statistics pass sums ``g*g`` per row of every parameter of
the partition's group over its pieces and all-reduces them over the ranks (one collective of
``O(rows)`` values per partition, made on every rank in the same order); ``apply`` runs the chain
on the pieces (views of the partition, its gradient, ``m`` and ``v``) with the row sums that make
every piece's block statistic the whole block's (``FlatPartition.piece_row_sums``), in place
(donated), in calls of at most ``PIECE_ELEMENTS`` elements (one chunk's temporaries), with each
piece's weight decay decided by its parameter's name and shape. Where the native kernel is
loaded and takes every piece (CPU tensors: ZeRO-Offload), one kernel call steps all of a
partition's pieces instead, with the same row sums. With ``nonfinite="apply"`` there is no
statistics pass; a partition then sums its own, unless it is
:attr:`~adam_mini_tx.distributed.FlatPartition.self_contained` (one rank, whole blocks): then
each piece's step sums its own ``g*g`` (the kernel's single pass).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch

from ...core.base import to_dtype
from ...core.blocks import BlockLayout, accumulation_dtype
from ...core.donation import Workspace, donating
from ...distributed.flat import PIECE_ELEMENTS
from ...functional.alias import DECAY_MASKS
from ..hyperparams import Hyper, chain_for
from ..members import Member
from ...kernels.spec import KernelMember, geometry
from ..state import chain_step
from .kernel import StepKernel, SumsKernel, scalars_for, takes


class PieceViews(NamedTuple):
    """A flat member's pieces (piece name -> view) of its partition, gradient, ``m`` and ``v``."""

    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]


class FlatWork(NamedTuple):
    members: list[Member]
    views: list[PieceViews]  # a member's pieces, cut once per step
    shapes: dict[str, tuple[int, ...]]  # parameter name -> its shape (for the decay mask)


class FlatBackend:
    """See the module docstring; keeps one :class:`Workspace` (one chunk's temporaries).
    ``kernel``: a single-pass step kernel (:mod:`adam_mini_tx.kernels`) that steps a partition's
    pieces in one call when it takes all of them, and ``sums`` its statistics pass; None: the
    chain and torch's row sums."""

    def __init__(self, kernel: StepKernel | None = None, sums: SumsKernel | None = None) -> None:
        self.workspace = Workspace()
        self.kernel, self.sums = kernel, sums

    @property
    def scratch_bytes(self) -> int:
        return self.workspace.nbytes

    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> FlatWork:
        views = [PieceViews(*(m.partition.views(t) for t in (m.param, m.grad, m.state["m"])),
                            m.partition.v_views(m.state["v"])) for m in members]
        return FlatWork(list(members), views, {name: layout.shape for member in members
                                               for name, layout in member.partition.params})

    def row_sums(self, work: FlatWork) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        sums = {member.name: self._member_sums(member, views)
                for member, views in zip(work.members, work.views)}
        return sums, [torch.isfinite(torch.cat(list(sums.values()))).all()] if sums else []

    def _member_sums(self, member: Member, views: PieceViews) -> torch.Tensor:
        return member.partition.row_sums(member.grad, member.state["v"].dtype,
                                         self._piece_sums if self._sums_in_kernel(member) else None,
                                         views.grads)

    def _given(self, member: Member, views: PieceViews,
               sums: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The pieces' row sums for the step: from the statistics pass (``sums``); made here
        where there was none (``nonfinite="apply"``), unless each piece's own ``g*g`` gives its
        blocks' statistics (then none: the step sums them)."""
        if sums is None and member.partition.self_contained:
            return {}
        return member.partition.piece_row_sums(
            self._member_sums(member, views) if sums is None else sums[member.name])

    def _sums_in_kernel(self, member: Member) -> bool:
        """Whether the kernel's statistics pass can sum this partition's pieces (fp32 sums)."""
        grad = member.grad
        return (self.sums is not None and grad.device.type == "cpu" and grad.is_contiguous()
                and grad.dtype in (torch.float32, torch.bfloat16)
                and accumulation_dtype(grad.dtype, member.state["v"].dtype) == torch.float32)

    def _piece_sums(self, pieces: Sequence[tuple[str, torch.Tensor, BlockLayout]]
                    ) -> list[torch.Tensor]:
        """The pieces' row sums from the kernel (only their gradients and geometry are read)."""
        return self.sums([KernelMember(name, view, view, view, None, view, None,
                                       *geometry(layout), False, None)
                          for name, view, layout in pieces])[0]

    def apply(self, work: FlatWork, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None:
        mask = DECAY_MASKS[hyper.decay_mask]
        for member, views in zip(work.members, work.views):
            partition = member.partition
            labels = {piece.name: mask(piece.param_name, torch.empty(
                work.shapes[piece.param_name], device="meta")) for piece in partition.pieces}
            params, grads, m, v = views
            given = self._given(member, views, sums)
            layouts = {piece.name: piece.layout for piece in partition.pieces}
            if self.kernel is not None and all(
                    takes(params[n], grads[n], m[n], v[n], layouts[n]) for n in params):
                count = int(member.state["step"]) + 1
                self.kernel([KernelMember(n, params[n], grads[n], m[n], None, v[n],
                                          given.get(n), *geometry(layouts[n]),
                                          hyper.weight_decay != 0 and labels[n] == "decay", None)
                             for n in params],
                            scalars_for(hyper, count))
                written.append(member)
                continue
            tx = chain_for(hyper, layouts, lambda name, tensor: labels[name])
            for chunk in _chunks(list(params), {n: p.numel() for n, p in params.items()}):
                slots = {name: {"step": member.state["step"], "m": m[name], "v": v[name]}
                         for name in chunk}
                with donating(self.workspace):
                    updates, _ = chain_step(tx, {n: params[n] for n in chunk},
                                            {n: grads[n] for n in chunk}, slots,
                                            {n: given[n] for n in chunk if n in given})
                for name in chunk:
                    params[name].add_(to_dtype(updates[name], params[name].dtype))
            written.append(member)


def _chunks(names: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """``names`` in order, packed into chain calls of at most ``PIECE_ELEMENTS`` elements."""
    packed: list[list[str]] = []
    filled = PIECE_ELEMENTS
    for name in names:
        if filled + sizes[name] > PIECE_ELEMENTS:
            packed.append([])
            filled = 0
        packed[-1].append(name)
        filled += sizes[name]
    return packed


__all__ = ["FlatBackend", "FlatWork"]
