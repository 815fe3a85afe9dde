"""The step's backends: interchangeable ways to run the same chain, with one signature.

A backend is an object with three methods (:class:`Backend`), all taking what they need as
arguments and keeping between steps only caches (compiled functions, scratch memory):

* ``prepare(members, layouts, hyper) -> work``: how it will cut this step's members (chunks,
  row pieces, compiled rounds); pure;
* ``row_sums(work) -> (sums, flags)``: the statistics pass, every member's row sums of squares
  (``BlockLayout.row_sums_of_squares``, keyed by member name) and 0-d bool flags (all finite);
  members it leaves out (DTensors) are the caller's to check;
* ``apply(work, hyper, sums, written)``: ``p``, ``m`` and ``v`` written in place, the statistics
  taken from ``sums`` where given; it appends each member to ``written`` once its writes are
  done. It never touches the step counts: the optimizer bumps them.

:func:`assign` chooses the backend of every member, in one place.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import torch

from ...core.blocks import BlockLayout, is_dtensor
from ...kernels import native
from ..hyperparams import Hyper
from ..members import Member
from .compiled import CompiledBackend
from .eager import EagerBackend
from .flat import FlatBackend
from .kernel import KernelBackend, supports

RowSums = dict[str, torch.Tensor]


class Backend(Protocol):
    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> Any: ...

    def row_sums(self, work: Any) -> tuple[RowSums, list[torch.Tensor]]: ...

    def apply(self, work: Any, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None: ...


class Backends(NamedTuple):
    """An optimizer's backends (``native``: the kernel backend, None when it is off or did not
    load)."""

    eager: EagerBackend
    compiled: CompiledBackend
    flat: FlatBackend
    native: KernelBackend | None


def assign(members: Sequence[Member], fused: bool, backends: Backends,
           layouts: Mapping[str, BlockLayout], widened: frozenset[str] = frozenset()
           ) -> list[tuple[Backend, list[Member]]]:
    """``(backend, members)`` pairs for one group: flat partitions (DeepSpeed ZeRO) to the flat
    backend; plain tensors to the compiled backend when ``fused``, else to the native kernel
    where it can take them (:func:`~.kernel.supports`); the rest (DTensors, whose sharded
    statistics need collectives) to the eager one. Members whose statistics were widened to
    float64 this step (a rare repair) run eagerly too, in a backend of their own that keeps
    nothing."""
    partitions = [m for m in members if m.partition is not None]
    repaired = [m for m in members if m.name in widened]
    members = [m for m in members if m.name not in widened and m.partition is None]
    fast = [m for m in members if fused and not is_dtensor(m.param)]
    native = [m for m in members if not fused and backends.native is not None
              and supports(m, layouts[m.name])]
    taken = {m.name for m in fast + native}
    rest = [m for m in members if m.name not in taken]
    return [(backend, chosen) for backend, chosen in
            ((backends.flat, partitions), (backends.compiled, fast), (backends.native, native),
             (backends.eager, rest), (EagerBackend(), repaired)) if chosen]


def check_native(native: bool | None, fused: bool) -> None:
    """``native`` is None, True or False, and not True together with ``fused``."""
    if native is not None and not isinstance(native, bool):
        raise TypeError(f"native must be None, True or False, got {native!r}")
    if native and fused:
        raise ValueError("fused=True and native=True are two different steps: choose one "
                         "(native=None uses the native kernel unless fused=True)")


def backends_for(native_choice: bool | None, fused: bool,
                 named: Sequence[tuple[str, torch.Tensor]]) -> Backends:
    """An optimizer's backends; the native kernel is loaded (built on a machine's first use)
    unless ``native_choice`` is False, ``fused`` is set, or no parameter is on the CPU.
    ``native_choice=True`` raises a RuntimeError when it cannot load."""
    kernel = None
    on_cpu = any(param.device.type == "cpu" for _, param in named)
    if native_choice is not False and not fused and on_cpu:
        if native.load():
            kernel = KernelBackend(native.step_, native.row_sums_)
        elif native_choice:
            raise RuntimeError(f"native=True, but the native CPU step is {native.status()}: "
                               f"pass native=None to fall back to the eager step")
    step, sums = (None, None) if kernel is None else (kernel.step, kernel.sums)
    return Backends(EagerBackend(), CompiledBackend(), FlatBackend(step, sums), kernel)


def row_sums(work: Sequence[Sequence[tuple[Backend, Any]]]
             ) -> tuple[RowSums, list[torch.Tensor]]:
    """The statistics pass over every group's work: all row sums by name, and the flags."""
    sums: RowSums = {}
    flags: list[torch.Tensor] = []
    for backend, unit in (pair for units in work for pair in units):
        unit_sums, unit_flags = backend.row_sums(unit)
        sums.update(unit_sums)
        flags.extend(unit_flags)
    return sums, flags


__all__ = ["Backend", "Backends", "RowSums", "assign", "backends_for", "check_native", "row_sums",
           "EagerBackend", "CompiledBackend", "FlatBackend", "KernelBackend"]
