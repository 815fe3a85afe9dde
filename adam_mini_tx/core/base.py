"""Core types of the functional API: transforms over ``dict[str, Tensor]``, ``chain`` and
``apply_updates``.

A :class:`GradientTransformation` is a pair of pure functions::

    state = init(params)
    updates, state = update(updates, state, params=None, grads=None, **extra_args)

``update`` receives the updates produced so far in a chain and, as ``grads``, the raw gradient that
entered the chain. Transforms that need the raw gradient (the blockwise second moment of
Adam-mini, which must see ``g`` and not the momentum) read ``grads``; the others ignore it.
``extra_args`` are per-step side inputs that a chain hands to every member that takes ``**``
keyword arguments (``row_sums``: precomputed statistics, see
:func:`~adam_mini_tx.blockwise_mean_square`); a transform without them is called without them.
States are NamedTuples of tensors (and dicts of tensors); step counts are 0-d tensors.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Union

import torch

from .donation import forget, in_place_safe, run_update

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
State = Any
Schedule = Callable[[torch.Tensor], Union[float, torch.Tensor]]
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]


class InitFn(Protocol):
    def __call__(self, params: Params) -> State: ...


class UpdateFn(Protocol):
    def __call__(self, updates: Updates, state: State, params: Params | None = None,
                 grads: Updates | None = None, **extra_args: Any) -> tuple[Updates, State]: ...


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params, grads) -> (updates, state)``."""

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def identity() -> GradientTransformation:
    """Leaves updates unchanged: ``u -> u``."""

    def init(params: Params) -> EmptyState:
        return EmptyState()

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        return updates, state

    return GradientTransformation(init, update)


def takes_extra_args(transform: GradientTransformation) -> bool:
    """Whether ``transform.update`` accepts ``**extra_args`` (read once, when a combinator is
    built; from the code object when it has one, which ``torch.compile`` can trace)."""
    code = getattr(transform.update, "__code__", None)
    if code is not None:
        return bool(code.co_flags & inspect.CO_VARKEYWORDS)
    parameters = inspect.signature(transform.update).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; each sees the previous output as ``updates`` and the
    chain's own input as ``grads``: ``u_k = T_k(u_{k-1}; grads=u_0)``.

    A nested chain hands on *its* input, so ``chain(clip_by_global_norm(1.0), adam_mini())``
    gives Adam-mini the clipped gradient for both moments. ``extra_args`` reach every member that
    takes them. In
    :func:`~adam_mini_tx.donated_update` the input is never written (every member may read it as
    ``grads``), and members not marked ``in_place_safe`` run as pure functions."""

    takes_extra = tuple(takes_extra_args(t) for t in transforms)

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        if len(state) != len(transforms):
            raise ValueError(f"chain state has {len(state)} entries but the chain has "
                             f"{len(transforms)} transforms: was it made by this chain's init?")
        check_gradients(updates)
        if params is not None:
            check_same_keys(updates, params, "params", "updates")
        forget(updates.values())
        grads = updates
        new_states = []
        for transform, inner, takes in zip(transforms, state, takes_extra):
            updates, inner = run_update(transform, updates, inner, params, grads,
                                        extra_args if takes else None)
            new_states.append(inner)
        return updates, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``p_new = p + u`` for every name, cast back to the parameter's dtype (bf16 params stay
    bf16 even when the updates were computed in fp32). Returns a new dict; inputs are untouched."""
    check_same_structure(params, updates, "updates", "params")
    return {name: (p + to_dtype(updates[name], p.dtype)) for name, p in params.items()}


def to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, with no dispatch when it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


# ----- validation shared by the transforms ---------------------------------------------------
def check_same_structure(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                         other_name: str, reference_name: str) -> None:
    """Raise a ValueError naming the parameter if ``other`` lacks a key or has another shape."""
    check_same_keys(reference, other, other_name, reference_name)
    for name, ref in reference.items():
        if tuple(other[name].shape) != tuple(ref.shape):
            raise ValueError(f"parameter {name!r}: {other_name} has shape {tuple(other[name].shape)} "
                             f"but {reference_name} has {tuple(ref.shape)}")


def check_same_keys(reference: Mapping[str, Any], other: Mapping[str, Any], other_name: str,
                    reference_name: str) -> None:
    """Raise a ValueError listing the names that only one of the two mappings has."""
    if other.keys() == reference.keys():
        return
    missing = [name for name in reference if name not in other]
    extra = [name for name in other if name not in reference]
    raise ValueError(f"{other_name} and {reference_name} have different keys: missing from "
                     f"{other_name}: {missing[:5]}, not in {reference_name}: {extra[:5]}. Pass "
                     f"one tensor per parameter, keyed by the parameter's name.")


def check_gradients(grads: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError/TypeError naming the parameter if a gradient is not a dense, real
    floating-point tensor. Reads only static properties (layout, dtype): no host sync, so it is
    free under ``torch.compile`` and ``vmap``. :func:`chain` checks its input with it."""
    for name, grad in grads.items():
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"the gradient of parameter {name!r} is a {type(grad).__name__}; "
                            f"pass one tensor per parameter")
        if grad.layout != torch.strided:
            raise ValueError(f"parameter {name!r} has a sparse gradient ({grad.layout}), which "
                             f"Adam-mini does not support; use dense gradients (grad.to_dense(), "
                             f"or nn.Embedding(sparse=False))")
        if not grad.is_floating_point():
            raise TypeError(f"parameter {name!r} has a gradient of dtype {grad.dtype}; Adam-mini "
                            f"needs real floating-point gradients (optimize "
                            f"torch.view_as_real(param) for complex parameters)")


def check_number(name: str, value: Any, low: float, high: float | None = None, *,
                 high_inclusive: bool = False) -> None:
    """Validate a hyperparameter: finite and in range (NaN or Inf would silently turn every
    parameter into NaN). A Python number, or a one-element tensor whose value can be read here
    (not while it is being traced or batched: such a tensor, and a schedule, is checked where
    its value is known); anything else is a TypeError."""
    if isinstance(value, torch.Tensor):
        if not readable(value):
            return
        if value.numel() != 1:
            raise ValueError(f"invalid {name}: {name} must be a float or a one-element tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"invalid {name}={value!r}: pass a Python number or a 0-d tensor")
    above = value > high if high_inclusive else value >= high if high is not None else False
    if not math.isfinite(value) or value < low or above:
        bound = "" if high is None else (f", {high}]" if high_inclusive else f", {high})")
        interval = f"in [{low}{bound}" if high is not None else f">= {low}"
        raise ValueError(f"invalid {name}={value}: it must be a finite number {interval}")


def readable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values can be read on the host: a plain tensor with data, outside
    ``torch.compile`` and ``torch.func`` transforms."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type != "meta"
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def check_betas(betas: Any) -> tuple[float, float]:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"invalid betas={betas!r}: pass a pair (beta1, beta2)") from None
    check_number("betas[0]", beta1, 0.0, 1.0)
    check_number("betas[1]", beta2, 0.0, 1.0)
    return beta1, beta2


def resolve(value: ScalarOrSchedule, count: torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter's value at step ``count``: the schedule's output, or the value itself."""
    return value(count) if callable(value) else value
