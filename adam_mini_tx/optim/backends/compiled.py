"""The compiled backend (``fused=True``): the chain compiled over lists of parameters that share a
block layout, writing parameters and state in place.

Members of one group are bucketed by everything the compiled code depends on (block layout,
decay label, dtypes, device, step count) and cut into near-equal lists of at most
``BUCKET_SIZE`` tensors, which run in *rounds*: round ``(n, r)`` holds the ``r``-th bucket of
every kind cut into ``n``, so the ``n`` rounds of a kind repeat one signature and no bucket
compiles twice. Each round shape compiles once per pass (``torch.compile(fullgraph=True,
dynamic=False)``), one Python call per round:

* ``row_sums``: every member's row sums of squares into small persistent buffers, and whether
  they are all finite;
* ``apply``: the chain, its statistic taken from those sums when given (else read from ``g`` in
  the same kernel as the update), in kernels that read ``p, g, m`` and write ``p, m``.

The hyperparameters are one float64 tensor argument (:func:`scalar_arguments`) and the row
sums are arguments too: nothing a scheduler or a checkpoint changes recompiles.
"""
from __future__ import annotations

import time
import types
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ...functional.alias import DECAY_MASKS
from ...core.base import to_dtype
from ...core.blocks import BlockLayout, accumulation_dtype
from ...core.lowbits import salt_of
from ...core.guards import all_finite
from ..hyperparams import Hyper, chain_for, from_scalar_arguments, scalar_arguments
from ..members import Member
from ..state import chain_step

BUCKET_SIZE = 8
"""Most tensors per bucket."""


class Round(NamedTuple):
    device: torch.device
    signature: tuple  # per bucket: (layout, decay label, dtypes..., device, length)
    buckets: list[list[Member]]


class CompiledWork(NamedTuple):
    rounds: list[Round]
    layouts: Mapping[str, BlockLayout]


class CompiledBackend:
    """See the module docstring. Keeps the compiled functions (per round signature, shared by
    every group) and the row-sum buffers; ``compile_seconds`` is the time spent in the first
    call of every round shape (compiling)."""

    def __init__(self) -> None:
        self._apply_fns: dict[tuple, Callable] = {}
        self._sums_fns: dict[tuple, Callable] = {}
        self._sums: dict[str, torch.Tensor] = {}  # member name -> its row-sum buffer
        self.compile_seconds = 0.0

    @property
    def scratch_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._sums.values())

    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> CompiledWork:
        label = DECAY_MASKS[hyper.decay_mask]
        kinds: dict[tuple, list[Member]] = {}
        for m in members:
            kind = (layouts[m.name], label(m.name, m.param), m.param.dtype, m.grad.dtype,
                    m.state["m"].dtype, m.state["v"].dtype, hyper.static(), m.param.device)
            kinds.setdefault((kind, int(m.state["step"])), []).append(m)
        rounds: dict[tuple, list[tuple[tuple, list[Member]]]] = {}
        for (kind, _), items in kinds.items():
            buckets = near_equal_split(items, BUCKET_SIZE)
            for index, bucket in enumerate(buckets):
                rounds.setdefault((kind[-1], len(buckets), index), []).append(
                    ((*kind, len(bucket)), bucket))
        return CompiledWork([Round(device, tuple(s for s, _ in entries), [b for _, b in entries])
                             for (device, _, _), entries in rounds.items()], layouts)

    def row_sums(self, work: CompiledWork) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        sums: dict[str, torch.Tensor] = {}
        flags = []
        for round_ in work.rounds:
            grads = [[m.grad for m in bucket] for bucket in round_.buckets]
            buffers = [[self._buffer(m, work.layouts[m.name]) for m in bucket]
                       for bucket in round_.buckets]
            for bucket, bucket_buffers in zip(round_.buckets, buffers):
                sums.update((m.name, b) for m, b in zip(bucket, bucket_buffers))
            compiled = self._sums_fns.get(round_.signature)
            if compiled is None:
                layouts = [[work.layouts[m.name] for m in bucket] for bucket in round_.buckets]
                compiled = self._sums_fns[round_.signature] = _bound(
                    _compile(_row_sums_in_place), layouts)
                flags.append(self._timed(compiled, grads, buffers))
            else:
                flags.append(compiled(grads, buffers))
        return sums, flags

    def apply(self, work: CompiledWork, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None:
        scalars: dict[torch.device, torch.Tensor] = {}
        for round_ in work.rounds:
            if round_.device not in scalars:
                scalars[round_.device] = scalar_arguments(hyper, round_.device)
            args = [_bucket_args(bucket, hyper.rounding_seed is not None)
                    for bucket in round_.buckets]
            given = [[] if sums is None else [sums[m.name] for m in bucket]
                     for bucket in round_.buckets]
            key = (round_.signature, sums is not None)
            compiled = self._apply_fns.get(key)
            if compiled is None:
                statics = [(work.layouts[bucket[0].name], signature[1], hyper.static())
                           for bucket, signature in zip(round_.buckets, round_.signature)]
                compiled = self._apply_fns[key] = _bound(_compile(_write_round_in_place),
                                                         statics)
                self._timed(compiled, scalars[round_.device], args, given)
            else:
                compiled(scalars[round_.device], args, given)
            written.extend(m for bucket in round_.buckets for m in bucket)

    def _buffer(self, member: Member, layout: BlockLayout) -> torch.Tensor:
        """The persistent buffer of ``member``'s row sums (row shape, accumulation dtype)."""
        dtype = accumulation_dtype(member.grad.dtype, member.state["v"].dtype)
        sums = self._sums.get(member.name)
        if sums is None or sums.dtype != dtype or sums.device != member.param.device \
                or sums.shape != layout.row_shape:
            sums = self._sums[member.name] = torch.empty(layout.row_shape, dtype=dtype,
                                                         device=member.param.device)
        return sums

    def _timed(self, compiled: Callable, *args: Any) -> Any:
        """``compiled(*args)``, its time added to ``compile_seconds`` (a first call compiles)."""
        start = time.perf_counter()
        result = compiled(*args)
        self.compile_seconds += time.perf_counter() - start
        return result


def _bound(function: Callable, statics: Any) -> Callable:
    """``function`` with its static first argument (layouts, labels) bound."""
    return lambda *args: function(statics, *args)


def _compile(function: Callable) -> Callable:
    """A private copy of ``function`` (torch.compile keeps one cache and one recompile limit per
    code object), compiled with only tensor and global-context guards: each is private to one
    round signature, which the caller matched, so the other guards could never fail."""
    fresh = types.FunctionType(function.__code__.replace(), function.__globals__,
                               function.__name__, function.__defaults__, function.__closure__)
    return torch.compile(fresh, fullgraph=True, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})


def _row_sums_in_place(layouts: Sequence[Sequence[BlockLayout]],
                       grads: Sequence[Sequence[torch.Tensor]],
                       buffers: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The statistics pass of a round: ``buffer <- layout.row_sums_of_squares(g)`` (in the
    buffer's dtype); returns a 0-d bool, every sum finite."""
    for bucket_layouts, bucket_grads, bucket_buffers in zip(layouts, grads, buffers):
        for layout, g, buffer in zip(bucket_layouts, bucket_grads, bucket_buffers):
            buffer.copy_(layout.row_sums_of_squares(g, buffer.dtype))
    every = [buffer for bucket in buffers for buffer in bucket]
    return all_finite({str(i): buffer for i, buffer in enumerate(every)})


def _write_round_in_place(statics: Sequence[tuple[BlockLayout, str, Hyper]],
                          scalars: torch.Tensor, buckets: Sequence[tuple],
                          given: Sequence[Sequence[torch.Tensor]]) -> None:
    """One round of the update pass: per bucket (its layout, decay label and the static part
    of its hyperparameters), the chain with its float hyperparameters read from ``scalars``,
    and ``p += u`` and every state tensor but the step count written in place."""
    for (layout, label, static), (params, grads, slots, salts), sums in zip(statics, buckets,
                                                                            given):
        names = [str(i) for i in range(len(params))]
        tx = chain_for(from_scalar_arguments(scalars, static), {name: layout for name in names},
                       lambda name, t: label)
        updates, new = chain_step(tx, dict(zip(names, params)), dict(zip(names, grads)),
                                  dict(zip(names, slots)),
                                  dict(zip(names, sums)) if sums else None, static.rounding_seed,
                                  None if salts is None else dict(zip(names, salts.unbind())))
        for name, param, old in zip(names, params, slots):
            param.add_(to_dtype(updates[name], param.dtype))
            for key, value in old.items():
                if key != "step":
                    value.copy_(new[name][key])


def _bucket_args(bucket: Sequence[Member], rounded: bool = False) -> tuple:
    """``(params, grads, slots, salts)`` of one bucket (the slots share one step count; with a
    ``rounded`` low-precision ``m``, the salts of the members' names, else None)."""
    salts = torch.tensor([salt_of(m.name) for m in bucket]) if rounded else None
    return [m.param for m in bucket], [m.grad for m in bucket], [m.state for m in bucket], salts


def near_equal_split(items: list, most: int) -> list[list]:
    """``items`` in order, in ``ceil(len / most)`` lists whose lengths differ by at most one
    (12 layers give 6 + 6, not 8 + 4: every length is one more compile)."""
    count = -(-len(items) // most)
    base, extra = divmod(len(items), count)
    lists, start = [], 0
    for index in range(count):
        length = base + (index < extra)
        lists.append(items[start:start + length])
        start += length
    return lists


__all__ = ["BUCKET_SIZE", "CompiledBackend", "near_equal_split"]
