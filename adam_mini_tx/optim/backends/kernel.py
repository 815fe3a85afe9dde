"""The kernel backend: a single-pass step kernel (:mod:`adam_mini_tx.kernels`) behind the
backend signature.

``apply`` hands every member to the kernel as a :class:`~adam_mini_tx.kernels.spec.KernelMember`
(its tensors, block geometry, decay label and rounding key), one kernel call per step count; the
kernel reads each gradient once, taking the block statistics from ``sums`` when the statistics
pass made them. :func:`supports` says which members a kernel can take; the others stay with
the eager backend (:func:`~adam_mini_tx.optim.backends.assign`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from ...core.blocks import BlockLayout, is_dtensor
from ...functional.alias import DECAY_MASKS
from ...functional.moments import LOW_PRECISION
from ...kernels.native import mode_of
from ...kernels.spec import KernelMember, StepScalars, geometry, member_noise_key, step_scalars
from ..hyperparams import Hyper
from ..members import Member
from .eager import member_row_sums

StepKernel = Callable[[Sequence[KernelMember], StepScalars], None]
SumsKernel = Callable[[Sequence[KernelMember]], tuple[list[torch.Tensor], bool]]
FLOATS = (torch.float32, torch.bfloat16)


class KernelWork(NamedTuple):
    by_count: dict[int, list[tuple[Member, KernelMember]]]  # the count after this step -> ...
    layouts: Mapping[str, BlockLayout]


def supports(member: Member, layout: BlockLayout, device_type: str = "cpu") -> bool:
    """Whether a kernel on ``device_type`` can step ``member``: tensors that :func:`takes`,
    plain or DTensors whose every rank holds all their values (a one-rank mesh, as FSDP2 on
    one GPU with its CPU offload; or replicated); flat partitions have their own backend."""
    tensors = [member.param, member.grad, member.state["m"], member.state["v"]]
    if member.partition is not None or any(is_dtensor(t) and not whole(t) for t in tensors):
        return False
    return takes(*map(local, tensors), layout, device_type)


def whole(x: torch.Tensor) -> bool:
    """Whether DTensor ``x`` holds all its values on this rank."""
    return x.device_mesh.size() == 1 or all(p.is_replicate() for p in x.placements)


def local(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x``'s values on this rank, written in place through it (``to_local`` of a DTensor)."""
    return x.to_local() if x is not None and is_dtensor(x) else x


def takes(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
          layout: BlockLayout, device_type: str = "cpu") -> bool:
    """Whether a kernel on ``device_type`` can step these tensors: contiguous there, ``param``
    fp32 or bf16 and ``grad`` alike, ``m`` in fp32, bf16 or int8, ``v`` in fp32 or bf16, and a
    layout :func:`~adam_mini_tx.kernels.spec.geometry` accepts (an int8 ``m`` also needs each
    block to hold whole rows of the last axis)."""
    found = geometry(layout)
    if found is None or any(t.device.type != device_type or not t.is_contiguous()
                            for t in (param, grad, m, v)):
        return False
    if param.dtype not in FLOATS or grad.dtype != param.dtype or v.dtype not in FLOATS:
        return False
    if m.dtype == torch.int8:
        runs, row_numel, columns = found
        last = param.shape[-1] if param.dim() else 1
        return mode_of(columns, runs, row_numel) != "rows" or row_numel % last == 0
    return m.dtype in FLOATS


class KernelBackend:
    """See the module docstring. ``step`` is a kernel like :func:`adam_mini_tx.kernels.native.step_`;
    ``row_sums``, its statistics pass like :func:`~adam_mini_tx.kernels.native.row_sums_` (None:
    torch's, :func:`~.eager.member_row_sums`). Keeps nothing between steps."""

    scratch_bytes = 0

    def __init__(self, step: StepKernel, row_sums: SumsKernel | None = None) -> None:
        self.step, self.sums = step, row_sums

    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> KernelWork:
        by_count: dict[int, list[tuple[Member, KernelMember]]] = defaultdict(list)
        for member in members:
            count = int(member.state["step"]) + 1
            by_count[count].append(
                (member, _kernel_member(member, layouts[member.name], hyper, count)))
        return KernelWork(dict(by_count), layouts)

    def row_sums(self, work: KernelWork) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        pairs = [pair for group in work.by_count.values() for pair in group]
        if self.sums is None:
            return member_row_sums([member for member, _ in pairs], work.layouts)
        sums, finite = self.sums([kernel_member for _, kernel_member in pairs])
        return ({m.name: row.view(work.layouts[m.name].row_shape)
                 for (m, _), row in zip(pairs, sums)}, [torch.tensor(finite)])

    def apply(self, work: KernelWork, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None:
        for count, pairs in work.by_count.items():
            kernel_members = [k if sums is None else k._replace(row_sums=sums.get(k.name))
                              for _, k in pairs]
            self.step(kernel_members, scalars_for(hyper, count))
            written.extend(member for member, _ in pairs)  # each call writes all or nothing


def scalars_for(hyper: Hyper, count: int) -> StepScalars:
    """A kernel call's scalars: ``hyper`` at step ``count`` (the count after the step)."""
    return step_scalars(hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.eps_root,
                        hyper.weight_decay, count)


def _kernel_member(member: Member, layout: BlockLayout, hyper: Hyper, count: int
                   ) -> KernelMember:
    runs, row_numel, columns = geometry(layout)
    low = hyper.momentum_format in LOW_PRECISION
    decay = (hyper.weight_decay != 0
             and DECAY_MASKS[hyper.decay_mask](member.name, member.param) == "decay")
    return KernelMember(
        member.name, local(member.param), local(member.grad), local(member.state["m"]),
        local(member.state.get("m_scale")), local(member.state["v"]), None, runs, row_numel,
        columns, decay,
        member_noise_key(hyper.seed, count, member.name) if low and hyper.stochastic_rounding
        else None, not low)


__all__ = ["KernelBackend", "KernelWork", "StepKernel", "SumsKernel", "scalars_for", "supports",
           "takes", "whole", "local"]
