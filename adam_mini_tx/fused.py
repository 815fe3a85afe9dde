"""The fused step: the same :func:`adam_mini` chain, compiled over lists of parameters that share
a block layout, writing parameters and state in place.

Parameters of one param group are bucketed by everything the compiled code depends on (block
layout, decay label, dtypes, device, step count) and cut into lists of at most ``bucket_size``
tensors, which run in rounds (see ``FusedStep._rounds``). With a non-finite check, a step has two
passes, each one compiled call per round shape (``torch.compile(fullgraph=True, dynamic=False)``):

1. :meth:`FusedStep.prepare` reads ``g`` once for every parameter's row sums of squares
   (:meth:`BlockLayout.row_sums_of_squares`, into small persistent buffers) and returns whether
   they are all finite: the optimizer's non-finite check costs no read of its own;
2. :meth:`FusedStep.apply` runs the chain, whose blockwise statistic takes those row sums
   (``GivenRowSums``) instead of reading ``g`` again, in kernels that read ``p, g, m`` and write
   ``p, m`` in one pass, with ``v`` (one value per block) small; nothing full-size is allocated.

Without a check (``nonfinite="apply"``), :meth:`FusedStep.apply` alone reads ``g`` for the
statistics too, in the same kernel as the update.

``lr`` and ``weight_decay`` reach the kernel as 0-d tensors refreshed from the param group before
every step, so schedulers never trigger a recompile.
"""
from __future__ import annotations

import time
import types
from typing import Any, Callable, Mapping, Sequence

import torch

from .alias import adam_mini_slots, adam_mini_state_from_slots
from .base import GradientTransformation, to_dtype
from .blocks import BlockLayout, GivenRowSums
from .guards import all_finite

ChainFactory = Callable[[torch.Tensor, torch.Tensor, Mapping[str, BlockLayout], str],
                        GradientTransformation]
"""``(lr, weight_decay, plan, decay_label) -> chain``: the group's :func:`adam_mini` chain for one
bucket (its tensors are named ``"0", "1", ...``; every one has ``decay_label``)."""


def chain_step(tx: GradientTransformation, params: Mapping[str, torch.Tensor],
               grads: Mapping[str, torch.Tensor], slots: Mapping[str, Mapping[str, torch.Tensor]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """One step of the :func:`adam_mini` chain ``tx`` for the parameters in ``params`` (which
    share one step count). Returns ``(updates, new_slots)``: ``p_new = p + updates[name]`` and the
    new ``{"step", "m", "v"}`` per name. Pure: mutates neither ``params`` nor ``slots``. The eager
    step runs it over chunks of parameters; the fused step compiles it over a bucket."""
    updates, state = tx.update(dict(grads), adam_mini_state_from_slots(dict(slots)), dict(params))
    return updates, {name: adam_mini_slots(state, name) for name in params}


def _write_step_in_place(tx: GradientTransformation, names: Sequence[str],
                         params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         moments: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
                         step: torch.Tensor) -> None:
    """:func:`chain_step` for a bucket, with ``p += u``, ``m <- m_new`` and ``v <- v_new`` written
    in place (the function that is compiled)."""
    slots = {name: {"step": step, "m": m, "v": v} for name, m, v in zip(names, moments, second)}
    updates, new = chain_step(tx, dict(zip(names, params)), dict(zip(names, grads)), slots)
    for name, param, m, v in zip(names, params, moments, second):
        param.add_(to_dtype(updates[name], param.dtype))
        m.copy_(new[name]["m"])
        v.copy_(new[name]["v"])


def _fresh_function(function: Callable) -> Callable:
    """A copy of ``function`` with its own code object: torch.compile keeps one cache (and one
    recompile limit) per code object, so every bucket shape gets its own."""
    return types.FunctionType(function.__code__.replace(), function.__globals__,
                              function.__name__, function.__defaults__, function.__closure__)


def _write_round_in_place(txs: Sequence[GradientTransformation],
                          given: Sequence[Sequence[GivenRowSums]],
                          buckets: Sequence[tuple], row_sums: Sequence[Sequence[torch.Tensor]]
                          ) -> None:
    """:func:`_write_step_in_place` for every bucket of a round, its statistics taken from
    ``row_sums`` (one compiled function per round shape: one Python call per step instead of one
    per bucket)."""
    for tx, layouts, args, sums in zip(txs, given, buckets, row_sums):
        for layout, rows in zip(layouts, sums):
            layout.row_sums = rows
        _write_step_in_place(tx, *args)


def _row_sums_in_place(layouts: Sequence[Sequence[BlockLayout]],
                       grads: Sequence[Sequence[torch.Tensor]],
                       row_sums: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The statistics pass of a round: ``row_sums <- layout.row_sums_of_squares(g)`` (in the
    buffer's dtype, as the chain casts ``g`` to ``v``'s) for every parameter. Returns a 0-d bool:
    every sum is finite (so is every gradient element; a finite gradient whose squares overflow
    also reads as non-finite, and the caller checks the gradients themselves then)."""
    for bucket_layouts, bucket_grads, bucket_sums in zip(layouts, grads, row_sums):
        for layout, g, sums in zip(bucket_layouts, bucket_grads, bucket_sums):
            sums.copy_(layout.row_sums_of_squares(to_dtype(g, sums.dtype)))
    every = [sums for bucket_sums in row_sums for sums in bucket_sums]
    return all_finite({str(i): sums for i, sums in enumerate(every)})


class FusedStep:
    """One param group's fused step. ``make_chain`` builds the group's chain for a bucket. A step
    is :meth:`prepare` (the statistics pass, over ``(name, param, state)`` triples whose state
    exists), then the caller's non-finite decision, then :meth:`apply` (the update pass).

    Buckets run in *rounds* (see :meth:`_rounds`), and each round shape compiles once into one
    function per pass. Every compiled call costs ~0.4 ms of Python (guards, wrappers) once the
    previous kernel has flushed the caches: a 6-layer Llama makes 3 calls per pass instead of 11,
    a 24-layer one 17 instead of 30, compiling the same buckets.
    ``compile_seconds`` is the time spent in the first call of every round shape (compiling)."""

    def __init__(self, make_chain: ChainFactory, layouts: Mapping[str, BlockLayout],
                 decay_label: Callable[[str, torch.Tensor], str], bucket_size: int = 8):
        self._make_chain = make_chain
        self._layouts = layouts
        self._decay_label = decay_label
        self._bucket_size = bucket_size
        self._scalars: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._compiled: dict[tuple, Callable] = {}
        self._compiled_statistics: dict[tuple, Callable] = {}
        self._row_sums: dict[str, torch.Tensor] = {}  # name -> its row sums of squares
        # the last prepare's rounds, and per round its buckets' row sums (None: not computed)
        self._prepared: tuple[list, list | None] | None = None
        self.compile_seconds = 0.0

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the per-row statistics buffers, kept from step to step."""
        return sum(sums.numel() * sums.element_size() for sums in self._row_sums.values())

    def prepare(self, members: Sequence[tuple[str, torch.Tensor, dict[str, torch.Tensor]]],
                statistics: bool = True) -> list[torch.Tensor]:
        """The statistics pass: every member's row sums of squares, for :meth:`apply` to use.
        Returns one 0-d bool per round: its gradients' sums were all finite (no host sync).
        With ``statistics=False`` (no non-finite check wanted) nothing runs, and :meth:`apply`
        reads ``g`` for the statistics in its own kernels: a read in the same kernel as the
        update, while part of ``g`` is still in the cache, costs ~0.1x AdamW's step less than a
        separate pass, and one compiled call less per round."""
        rounds = self._rounds(members)
        flags: list[torch.Tensor] = []
        if not statistics:
            self._prepared = (rounds, None)
            return flags
        round_sums = []
        for _, signature, buckets in rounds:
            grads = [[param.grad for _, param, _ in bucket] for bucket in buckets]
            sums = [[self._row_sums_of(name, param, state) for name, param, state in bucket]
                    for bucket in buckets]
            round_sums.append(sums)
            compiled = self._compiled_statistics.get(signature)
            if compiled is None:
                layouts = [[self._layouts[name] for name, _, _ in bucket] for bucket in buckets]
                step = self._compiled_function(_row_sums_in_place)
                compiled = self._compiled_statistics[signature] = (
                    lambda grads, sums, layouts=layouts: step(layouts, grads, sums))
                flags.append(self._timed(compiled, grads, sums))
            else:
                flags.append(compiled(grads, sums))
        self._prepared = (rounds, round_sums)
        return flags

    def apply(self, group: Mapping[str, Any]) -> None:
        """The update pass over the members of the last :meth:`prepare`, with its statistics."""
        if self._prepared is None:
            raise RuntimeError("FusedStep.apply needs the statistics of this step: call prepare "
                               "first")
        (rounds, round_sums), self._prepared = self._prepared, None
        given = round_sums is not None
        # lr and weight decay are filled, and the step counts bumped, once per step rather than
        # per round: each small op costs 20-50 us once a kernel has flushed the caches
        filled: set[torch.device] = set()
        stepped: list[torch.Tensor] = []
        try:
            for index, (device, signature, buckets) in enumerate(rounds):
                lr, weight_decay = self._scalars_on(device)
                if device not in filled:
                    lr.fill_(group["lr"])
                    weight_decay.fill_(group["weight_decay"])
                    filled.add(device)
                args = [_bucket_args(bucket) for bucket in buckets]
                sums = round_sums[index] if given else [[] for _ in buckets]
                compiled = self._compiled.get((signature, given))
                if compiled is None:
                    compiled = self._compile(signature, given, lr, weight_decay)
                    self._timed(compiled, args, sums)
                else:
                    compiled(args, sums)
                stepped.extend(state["step"] for bucket in buckets for _, _, state in bucket)
        finally:  # a round that was written always has its steps counted, even if a later fails
            if stepped:
                torch._foreach_add_(stepped, 1)

    def _timed(self, compiled: Callable, *args: Any) -> Any:
        """``compiled(*args)``, its time added to ``compile_seconds`` (a first call compiles)."""
        start = time.perf_counter()
        result = compiled(*args)
        self.compile_seconds += time.perf_counter() - start
        return result

    def _row_sums_of(self, name: str, param: torch.Tensor, state: dict) -> torch.Tensor:
        """The persistent buffer of ``name``'s row sums (the layout's row shape, ``v``'s dtype)."""
        sums = self._row_sums.get(name)
        if sums is None or sums.dtype != state["v"].dtype or sums.device != param.device:
            sums = self._row_sums[name] = torch.empty(
                self._layouts[name].row_shape, dtype=state["v"].dtype, device=param.device)
        return sums

    def _scalars_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0-d ``lr`` and ``weight_decay`` tensors the kernels read (one pair per device)."""
        if device not in self._scalars:
            self._scalars[device] = (torch.zeros((), dtype=torch.float64, device=device),
                                     torch.zeros((), dtype=torch.float64, device=device))
        return self._scalars[device]

    @staticmethod
    def _compiled_function(function: Callable) -> Callable:
        """``function`` compiled with only tensor and global-context guards: each compiled
        function is private to one round signature (layouts, labels, dtypes, device, sizes),
        which the caller already matched, so the other guards (on the chains' closures) could
        never fail; they cost ~0.4 ms per call."""
        return torch.compile(_fresh_function(function), fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})

    def _compile(self, signature: tuple, given: bool, lr: torch.Tensor,
                 weight_decay: torch.Tensor) -> Callable:
        """The update pass of a round: ``signature`` holds its buckets' signatures; ``given``:
        the statistics come from the row sums of :meth:`prepare` (else from ``g``)."""
        # without given sums (``sums`` empty) the wrappers keep row_sums None and read ``g``
        layouts = [[GivenRowSums(layout) for _ in range(size)]
                   for layout, label, *_, size in signature]
        txs = [self._make_chain(lr, weight_decay, {str(i): x for i, x in enumerate(bucket)},
                                label)
               for (_, label, *_), bucket in zip(signature, layouts)]
        step = self._compiled_function(_write_round_in_place)
        compiled = lambda args, sums: step(txs, layouts, args, sums)  # noqa: E731
        self._compiled[(signature, given)] = compiled
        return compiled

    def _rounds(self, members) -> list[tuple[torch.device, tuple, list[list]]]:
        """``(device, signature, buckets)`` per round. Members that share everything the
        compiled code depends on (and one step count) form a group, cut into near-equal buckets
        of at most ``bucket_size`` (12 layers give 6 + 6, not 8 + 4: every length is one more
        compile). Round ``(n, r)`` holds the ``r``-th bucket of every group cut into ``n``: the
        ``n`` rounds of a kind repeat one signature, so no bucket compiles twice."""
        grouped: dict[tuple, list] = {}
        for name, param, state in members:
            key = (self._layouts[name], self._decay_label(name, param), param.dtype,
                   param.grad.dtype, state["m"].dtype, state["v"].dtype, param.device)
            grouped.setdefault((key, int(state["step"])), []).append((name, param, state))
        rounds: dict[tuple[torch.device, int, int], list[tuple[tuple, list]]] = {}
        for (key, _), items in grouped.items():
            buckets = _near_equal_split(items, self._bucket_size)
            for index, bucket in enumerate(buckets):
                rounds.setdefault((key[-1], len(buckets), index), []).append(
                    ((*key, len(bucket)), bucket))
        return [(device, tuple(signature for signature, _ in entries),
                 [bucket for _, bucket in entries])
                for (device, _, _), entries in rounds.items()]


def _bucket_args(bucket: list) -> tuple:
    """The arguments of :func:`_write_step_in_place` (after ``tx``) for one bucket."""
    params = [param for _, param, _ in bucket]
    states = [state for _, _, state in bucket]
    return ([str(i) for i in range(len(bucket))], params, [p.grad for p in params],
            [s["m"] for s in states], [s["v"] for s in states], states[0]["step"])


def _near_equal_split(items: list, most: int) -> list[list]:
    """``items`` in order, in ``ceil(len / most)`` lists whose lengths differ by at most one."""
    count = -(-len(items) // most)
    base, extra = divmod(len(items), count)
    lists, start = [], 0
    for index in range(count):
        length = base + (index < extra)
        lists.append(items[start:start + length])
        start += length
    return lists
