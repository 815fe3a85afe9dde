"""The fused step: the same :func:`adam_mini` chain, compiled over lists of parameters that share
a block layout, writing parameters and state in place.

Parameters of one param group are bucketed by everything the compiled code depends on (block
layout, decay label, dtypes, device, step count) and cut into lists of at most ``bucket_size``
tensors, which run in rounds (see ``FusedStep._rounds``). Each round shape compiles once
(``torch.compile(fullgraph=True, dynamic=False)``) into kernels that read ``g`` for the block
statistics, then read ``p, g, m`` and write ``p, m`` in one pass, with ``v`` (one value per
block) small; nothing full-size is allocated.
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
from .blocks import BlockLayout

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
                          buckets: Sequence[tuple]) -> None:
    """:func:`_write_step_in_place` for every bucket of a round (one compiled function per round
    shape: one Python call per step instead of one per bucket)."""
    for tx, args in zip(txs, buckets):
        _write_step_in_place(tx, *args)


class FusedStep:
    """One param group's fused step. ``make_chain`` builds the group's chain for a bucket;
    :meth:`__call__` runs a step over ``(name, param, state)`` triples whose state exists.

    Buckets run in *rounds* (see :meth:`_rounds`), and each round shape compiles once into one
    function. Every compiled call costs ~0.4 ms of Python (guards, wrappers) once the previous
    kernel has flushed the caches: a 6-layer Llama makes 3 calls per step instead of 11, a
    24-layer one 17 instead of 30, compiling the same buckets.
    ``compile_seconds`` is the time spent in the first call of every round shape (compiling)."""

    def __init__(self, make_chain: ChainFactory, layouts: Mapping[str, BlockLayout],
                 decay_label: Callable[[str, torch.Tensor], str], bucket_size: int = 8):
        self._make_chain = make_chain
        self._layouts = layouts
        self._decay_label = decay_label
        self._bucket_size = bucket_size
        self._scalars: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def __call__(self, group: Mapping[str, Any],
                 members: Sequence[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]) -> None:
        # lr and weight decay are filled, and the step counts bumped, once per step rather than
        # per round: each small op costs 20-50 us once a kernel has flushed the caches
        filled: set[torch.device] = set()
        stepped: list[torch.Tensor] = []
        try:
            for device, signature, buckets in self._rounds(members):
                lr, weight_decay = self._scalars_on(device)
                if device not in filled:
                    lr.fill_(group["lr"])
                    weight_decay.fill_(group["weight_decay"])
                    filled.add(device)
                args = [_bucket_args(bucket) for bucket in buckets]
                compiled = self._compiled.get(signature)
                if compiled is None:
                    compiled = self._compile(signature, lr, weight_decay)
                    start = time.perf_counter()
                    compiled(args)
                    self.compile_seconds += time.perf_counter() - start
                else:
                    compiled(args)
                stepped.extend(state["step"] for bucket in buckets for _, _, state in bucket)
        finally:  # a round that was written always has its steps counted, even if a later fails
            if stepped:
                torch._foreach_add_(stepped, 1)

    def _scalars_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0-d ``lr`` and ``weight_decay`` tensors the kernels read (one pair per device)."""
        if device not in self._scalars:
            self._scalars[device] = (torch.zeros((), dtype=torch.float64, device=device),
                                     torch.zeros((), dtype=torch.float64, device=device))
        return self._scalars[device]

    def _compile(self, signature: tuple, lr: torch.Tensor, weight_decay: torch.Tensor) -> Callable:
        """One compiled function for a round: ``signature`` holds its buckets' signatures."""
        txs = [self._make_chain(lr, weight_decay, {str(i): layout for i in range(size)}, label)
               for layout, label, *_, size in signature]
        # Only tensor and global-context guards: this function is private to one chain and one
        # round signature (layouts, labels, dtypes, device, sizes), which the caller already
        # matched, so the other guards (on the chains' closures) could never fail; they cost
        # ~0.4 ms per call.
        step = torch.compile(_fresh_function(_write_round_in_place), fullgraph=True,
                             dynamic=False,
                             options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
        self._compiled[signature] = compiled = lambda args: step(txs, args)
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
