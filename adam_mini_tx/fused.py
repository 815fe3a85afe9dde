"""The fused step: the same :func:`adam_mini` chain, compiled over lists of parameters that share
a block layout, writing parameters and state in place.

Parameters of one param group are bucketed by everything the compiled code depends on (block
layout, decay label, dtypes, device, step count) and cut into lists of at most ``bucket_size``
tensors. Each bucket shape compiles once (``torch.compile(fullgraph=True, dynamic=False)``) into
a kernel that reads ``g`` for the block statistics, then reads ``p, g, m`` and writes ``p, m`` in
one pass, with ``v`` (one value per block) small; nothing full-size is allocated.
``lr`` and ``weight_decay`` reach the kernel as 0-d tensors refreshed from the param group before
every step, so schedulers never trigger a recompile.
"""
from __future__ import annotations

import time
import types
from typing import Any, Callable, Mapping, Sequence

import torch

from .alias import adam_mini_slots, adam_mini_state_from_slots
from .base import GradientTransformation
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
        param.add_(updates[name].to(param.dtype))
        m.copy_(new[name]["m"])
        v.copy_(new[name]["v"])


def _fresh_function(function: Callable) -> Callable:
    """A copy of ``function`` with its own code object: torch.compile keeps one cache (and one
    recompile limit) per code object, so every bucket shape gets its own."""
    return types.FunctionType(function.__code__.replace(), function.__globals__,
                              function.__name__, function.__defaults__, function.__closure__)


class FusedStep:
    """One param group's fused step. ``make_chain`` builds the group's chain for a bucket;
    :meth:`__call__` runs a step over ``(name, param, state)`` triples whose state exists.
    ``compile_seconds`` is the time spent in the first call of every bucket shape (compiling)."""

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
        # per bucket: each small op costs 20-50 us once a bucket's kernel has flushed the caches
        filled: set[torch.device] = set()
        stepped: list[torch.Tensor] = []
        try:
            for signature, bucket in self._buckets(members):
                device = bucket[0][1].device
                lr, weight_decay = self._scalars_on(device)
                if device not in filled:
                    lr.fill_(group["lr"])
                    weight_decay.fill_(group["weight_decay"])
                    filled.add(device)
                params = [param for _, param, _ in bucket]
                states = [state for _, _, state in bucket]
                args = ([str(i) for i in range(len(bucket))], params, [p.grad for p in params],
                        [s["m"] for s in states], [s["v"] for s in states], states[0]["step"])
                compiled = self._compiled.get(signature)
                if compiled is None:
                    compiled = self._compile(signature, lr, weight_decay)
                    start = time.perf_counter()
                    compiled(*args)
                    self.compile_seconds += time.perf_counter() - start
                else:
                    compiled(*args)
                stepped.extend(state["step"] for state in states)
        finally:  # a bucket that was written always has its step counted, even if a later fails
            if stepped:
                torch._foreach_add_(stepped, 1)

    def _scalars_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0-d ``lr`` and ``weight_decay`` tensors the kernels read (one pair per device)."""
        if device not in self._scalars:
            self._scalars[device] = (torch.zeros((), dtype=torch.float64, device=device),
                                     torch.zeros((), dtype=torch.float64, device=device))
        return self._scalars[device]

    def _compile(self, signature: tuple, lr: torch.Tensor, weight_decay: torch.Tensor) -> Callable:
        layout, label, size = signature[0], signature[1], signature[-1]
        tx = self._make_chain(lr, weight_decay, {str(i): layout for i in range(size)}, label)
        # Only tensor and global-context guards: this function is private to one chain and one
        # bucket signature (layout, label, dtypes, device, size), which the caller already
        # matched, so the other guards (on the chain's closures) could never fail; they cost
        # ~0.4 ms per call.
        step = torch.compile(_fresh_function(_write_step_in_place), fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
        self._compiled[signature] = compiled = lambda *args: step(tx, *args)
        return compiled

    def _buckets(self, members) -> list[tuple[tuple, list]]:
        """``(signature, members)`` pairs: members that share everything the compiled code
        depends on (and one step count), split into near-equal lists of at most ``bucket_size``
        (12 layers give 6 + 6, not 8 + 4: every list length is one more compile)."""
        grouped: dict[tuple, list] = {}
        for name, param, state in members:
            key = (self._layouts[name], self._decay_label(name, param), param.dtype,
                   param.grad.dtype, state["m"].dtype, state["v"].dtype, param.device)
            grouped.setdefault((key, int(state["step"])), []).append((name, param, state))
        buckets = []
        for (key, _), items in grouped.items():
            for bucket in _near_equal_split(items, self._bucket_size):
                buckets.append(((*key, len(bucket)), bucket))
        return buckets


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
