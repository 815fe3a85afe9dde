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

from typing import Any, Mapping, Protocol, Sequence

import torch

from ...core.blocks import BlockLayout, is_dtensor
from ..hyperparams import Hyper
from ..members import Member
from .compiled import CompiledBackend
from .eager import EagerBackend
from .flat import FlatBackend

RowSums = dict[str, torch.Tensor]


class Backend(Protocol):
    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> Any: ...

    def row_sums(self, work: Any) -> tuple[RowSums, list[torch.Tensor]]: ...

    def apply(self, work: Any, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None: ...


def assign(members: Sequence[Member], fused: bool, eager: EagerBackend,
           compiled: CompiledBackend, flat: FlatBackend, widened: frozenset[str] = frozenset()
           ) -> list[tuple[Backend, list[Member]]]:
    """``(backend, members)`` pairs for one group: flat partitions (DeepSpeed ZeRO) to the flat
    backend; the compiled backend for plain tensors when ``fused``, else (and for DTensors,
    whose sharded statistics need collectives that compiled rounds do not make) the eager one.
    Members whose statistics were widened to float64 this step (a rare repair) run eagerly
    too, in a backend of their own that keeps nothing."""
    partitions = [m for m in members if m.partition is not None]
    repaired = [m for m in members if m.name in widened]
    members = [m for m in members if m.name not in widened and m.partition is None]
    rest = [m for m in members if not fused or is_dtensor(m.param)]
    fast = [m for m in members if fused and not is_dtensor(m.param)]
    return [(backend, chosen) for backend, chosen in
            ((flat, partitions), (compiled, fast), (eager, rest), (EagerBackend(), repaired))
            if chosen]


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


__all__ = ["Backend", "RowSums", "assign", "row_sums", "EagerBackend", "CompiledBackend",
           "FlatBackend"]
