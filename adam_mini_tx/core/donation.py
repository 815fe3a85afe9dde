"""Buffer donation: an update that may write in place, for callers that give up their old state.

A transform's ``update`` is pure: it returns new tensors and leaves its inputs alone. Eagerly,
every such new tensor is one more pass over memory into freshly allocated (page-faulted) memory,
which is most of an eager step's time. In :func:`donated_update`, as with JAX's donated buffers:

* the *state* handed to ``update`` is consumed: a transform may overwrite its own state tensors
  in place (``m.lerp_(g, 1 - b1)``), and the caller must use only the state that is returned;
* a *temporary* that a transform made in this step (registered with :func:`fresh`) may be
  overwritten by the transforms after it (``u.div_(denominator)``), so a whole Adam-mini step
  makes one temporary per parameter. :func:`empty_temporary` takes its memory from the call's
  :class:`Workspace`, which a caller may keep from one call to the next: the optimizer's eager
  step then allocates nothing, and reuses memory that is still in the cache.

Gradients, parameters and whatever a transform returns that it did not register are never
written. The values are bitwise those of the pure update (the same kernels, in place). Only
transforms marked with :func:`in_place_safe` write in place: any other transform (and whatever
it calls: ``nonfinite_guard`` reads the old state after its inner update) runs with donation
suspended, at the top or inside :func:`~adam_mini_tx.chain` and :func:`~adam_mini_tx.partition`,
and every temporary is forgotten after it, since it may keep one in its state. Outside
:func:`donated_update` (and under ``torch.func`` or ``torch.compile``) nothing changes.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch

_TEMPORARIES: ContextVar[weakref.WeakValueDictionary | None] = ContextVar(
    "adam_mini_tx_temporaries", default=None)
_WORKSPACE: ContextVar[Workspace | None] = ContextVar("adam_mini_tx_workspace", default=None)

Update = TypeVar("Update", bound=Callable)

_ALIGN = 16  # elements: temporaries start on 64-byte boundaries (fp32)


class Workspace:
    """Memory for the temporaries of donated updates: one flat buffer per dtype and device,
    handed out in order and reused by the next :func:`donating` call that is given it (so the
    updates of one call must be consumed before the next). It grows to the largest call's needs
    (the optimizer's eager step: one chunk, 4 MiB of fp32, or a larger tensor that cannot be cut
    into pieces) and is then never reallocated."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def reset(self) -> None:
        """Every temporary handed out so far may be overwritten from now on."""
        self._used.clear()

    def empty(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` from the buffer of its dtype and
        device (a larger buffer replaces a full one; the tensors already handed out keep theirs)."""
        key, numel = (dtype, device), math.prod(shape)
        start, buffer = self._used.get(key, 0), self._buffers.get(key)
        if buffer is None or start + numel > buffer.numel():
            size = max(start + numel, 2 * buffer.numel() if buffer is not None else 0)
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
            start = 0
        self._used[key] = start + -(-numel // _ALIGN) * _ALIGN
        return buffer[start:start + numel].view(shape)


def donated_update(transform: Any, updates: dict[str, torch.Tensor],
                   state: Any, params: dict[str, torch.Tensor] | None = None,
                   grads: dict[str, torch.Tensor] | None = None, *,
                   workspace: Workspace | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """``transform.update(updates, state, params, grads)`` with donated buffers (see the module
    docstring): the old ``state`` is consumed, use only the one returned. Temporaries come from
    ``workspace`` (reset here: the previous call's updates must be dead) or, by default, from a
    workspace of this call's own. A transform not marked :func:`in_place_safe` runs pure."""
    with donating(workspace):
        return run_update(transform, updates, state, params, grads)


@contextlib.contextmanager
def donating(workspace: Workspace | None = None) -> Iterator[None]:
    """The context of :func:`donated_update` (call transforms inside it through
    :func:`run_update`, never an unmarked transform's ``update`` directly)."""
    workspace = Workspace() if workspace is None else workspace
    workspace.reset()
    tokens = _TEMPORARIES.set(weakref.WeakValueDictionary()), _WORKSPACE.set(workspace)
    try:
        yield
    finally:
        _TEMPORARIES.reset(tokens[0])
        _WORKSPACE.reset(tokens[1])


def _temporaries() -> weakref.WeakValueDictionary | None:
    """The registered temporaries of the running donated update (None: no donation). Never
    under ``torch.compile``, whose tracer cannot read a ContextVar (and needs no donation)."""
    return None if torch.compiler.is_compiling() else _TEMPORARIES.get()


def donated() -> bool:
    """True inside :func:`donating`: an ``in_place_safe`` transform may overwrite its state."""
    return _temporaries() is not None


def fresh(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, registered (inside :func:`donating`) as a temporary that later transforms may
    overwrite. Call it only on a tensor the transform made and keeps no other reference to."""
    temporaries = _temporaries()
    if temporaries is not None:
        temporaries[id(tensor)] = tensor
    return tensor


def empty_temporary(like: torch.Tensor) -> torch.Tensor | None:
    """Inside :func:`donating`: an uninitialised tensor shaped like ``like`` from the workspace,
    registered as a temporary (write it with an ``out=`` op). None outside donation and for a
    tensor subclass such as a DTensor (then allocate as usual and register with :func:`fresh`)."""
    if _temporaries() is None or type(like) is not torch.Tensor:
        return None
    return fresh(_WORKSPACE.get().empty(like.shape, like.dtype, like.device))


def forget(tensors: Iterable[torch.Tensor] | None = None) -> None:
    """Nothing in ``tensors`` (default: no temporary at all) may be overwritten any more."""
    temporaries = _temporaries()
    if not temporaries:
        return
    if tensors is None:
        temporaries.clear()
        return
    for tensor in tensors:
        if temporaries.get(id(tensor)) is tensor:
            del temporaries[id(tensor)]


def in_place_or_new(tensor: torch.Tensor, op: str, other: torch.Tensor | float,
                    **kwargs) -> torch.Tensor:
    """``tensor.<op>(other, **kwargs)``, written into ``tensor`` when it is a registered
    temporary and the result has its shape and dtype (``op`` is ``"add"``, ``"mul"``, ``"div"``,
    ...). A new result is registered in turn, for the next transform."""
    temporaries = _temporaries()
    if (temporaries is not None and temporaries.get(id(tensor)) is tensor
            and _result_fits(tensor, other)):
        return getattr(tensor, op + "_")(other, **kwargs)
    return fresh(getattr(tensor, op)(other, **kwargs))


def _result_fits(tensor: torch.Tensor, other: torch.Tensor | float) -> bool:
    """``tensor op other`` has ``tensor``'s dtype and shape (so in place changes no value)."""
    if not isinstance(other, torch.Tensor):  # a Python number keeps a floating dtype
        return tensor.is_floating_point()
    if other.dtype != tensor.dtype and torch.result_type(tensor, other) != tensor.dtype:
        return False
    if other.dim() > tensor.dim():
        return False
    return all(size in (1, full) for size, full in zip(reversed(other.shape),
                                                        reversed(tensor.shape)))


def in_place_safe(update: Update) -> Update:
    """Mark a transform's ``update`` as one that writes in place only what :func:`donating`
    allows, registers only tensors it keeps no other reference to, and keeps no reference to its
    incoming updates in its state. Unmarked transforms are run as pure functions."""
    update.in_place_safe = True
    return update


def run_update(transform: Any, updates: dict[str, torch.Tensor], state: Any,
               params: dict[str, torch.Tensor] | None, grads: dict[str, torch.Tensor] | None,
               extra_args: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """``transform.update(updates, state, params, grads, **extra_args)`` (a
    :class:`~adam_mini_tx.GradientTransformation`); inside :func:`donating`, a transform not
    marked :func:`in_place_safe` runs with donation suspended, and every temporary is forgotten
    after it (how :func:`~adam_mini_tx.chain` calls its members)."""
    extra_args = extra_args or {}
    if getattr(transform.update, "in_place_safe", False) or _temporaries() is None:
        return transform.update(updates, state, params, grads, **extra_args)
    token = _TEMPORARIES.set(None)
    try:
        result = transform.update(updates, state, params, grads, **extra_args)
    finally:
        _TEMPORARIES.reset(token)
    forget()
    return result


__all__ = ["Workspace", "donated_update", "donating", "donated", "fresh", "empty_temporary",
           "forget", "in_place_or_new", "in_place_safe", "run_update"]
