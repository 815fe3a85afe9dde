"""The composable pieces of Adam-mini (and AdamW): pure transforms over ``dict[str, Tensor]``.

Adam-mini is ``chain(momentum(b1), blockwise_mean_square(b2, plan), decay, scale_by_lr(lr))``:
momentum consumes the raw gradient, and ``blockwise_mean_square`` computes its statistic from the
raw gradient too (the chain hands every transform the gradient that entered it as ``grads``) and
divides whatever reaches it. Put it *before* momentum and the same pieces give LaProp.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch

from ..core.base import (EmptyState, GradientTransformation, Params, ScalarOrSchedule, Updates,
                   check_number, check_same_keys, check_same_structure, resolve,
                   takes_extra_args, to_dtype)
from ..core.blocks import BlockLayout
from ..core.donation import (donated, empty_temporary, fresh, in_place_or_new, in_place_safe,
                              run_update)
from ..planning import BlockPlan, check_coverage, plan_blocks
from ..core.lowbits import salt_of
from .moments import LOW_PRECISION, check_format, check_sharded, new_moment, read, write

PlanLike = Union[BlockPlan, Mapping[str, BlockLayout],
                 Callable[[Mapping[str, torch.Tensor]], Mapping[str, BlockLayout]], None]


class MomentumState(NamedTuple):
    count: torch.Tensor  # () int64, steps taken
    mu: dict[str, torch.Tensor]  # each: the parameter's shape


class RoundedMomentumState(NamedTuple):
    """A low-precision first moment (``momentum_format="bfloat16"`` or ``"int8"``)."""

    count: torch.Tensor  # () int64, steps taken
    mu: dict[str, Any]  # each: the parameter's shape (bf16, or a QuantizedMoment for int8)
    seed: torch.Tensor  # () int64, of the stochastic rounding


class SecondMomentState(NamedTuple):
    count: torch.Tensor  # () int64, steps taken
    nu: dict[str, torch.Tensor]  # each: its layout's v_shape (one value per block)


class CountState(NamedTuple):
    count: torch.Tensor  # () int64, steps taken (drives schedules)


class PartitionState(NamedTuple):
    inner: dict[str, object]  # label -> that transform's state


def _zero_count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _bias_correction(beta: float | torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``1 - beta**count`` in float64, elementwise over the integer ``count`` (early steps,
    ``1 - 0.999 = 1e-3``, keep full precision), computed once per compiled call
    (:func:`_computed_once`)."""
    return _computed_once(1 - torch.pow(beta, count.to(torch.float64)))  # beta is promoted


def _computed_once(small: torch.Tensor) -> torch.Tensor:
    """``small`` itself. Under ``torch.compile`` it passes through an exact ``amax`` over 16
    copies of itself, so inductor computes it in a loop of its own (it unrolls reductions of at
    most 8 elements, ``unroll_reductions_threshold``) and a loop that broadcasts it loads it,
    instead of recomputing it (``pow``, ``sqrt``, divisions) at every vector iteration: the C++
    is built with ``-fmath-errno`` and the loop writes through pointers that may alias its
    inputs, so the C++ compiler does not hoist such scalar work out of the loop itself.
    Values and gradients are unchanged. Only on the CPU (on a GPU one more kernel launch would
    cost more than the recomputation; see docs/benchmarks.md)."""
    if torch.compiler.is_compiling() and small.device.type == "cpu":
        return small.unsqueeze(-1).expand(*small.shape, 16).amax(-1)
    return small


class _PerDtype:
    """A scalar tensor cast once per dtype (not once per parameter: the casts are dispatches)."""

    def __init__(self, value: torch.Tensor):
        self._value = value
        self._in: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._in:
            self._in[dtype] = to_dtype(self._value, dtype)
        return self._in[dtype]


def _state_like(tensor: torch.Tensor, shape: tuple[int, ...] | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros on ``tensor``'s device in ``dtype`` (default: the tensor's own dtype)."""
    shape = tuple(tensor.shape) if shape is None else shape
    return tensor.new_zeros(shape, dtype=dtype or tensor.dtype)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at ``x = 0`` is 0 instead of ``inf`` (no NaN meta-gradients
    through blocks whose gradient is exactly zero). Same forward values as ``torch.sqrt``, which
    it is when no derivative can be taken (the optimizer's step: 1 op instead of 6)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.sqrt(x)
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))),
                       torch.zeros_like(x))


def momentum(b1: float | torch.Tensor = 0.9, *, nesterov: bool = False,
             bias_correction: bool = True, state_dtype: torch.dtype | None = None,
             momentum_format: str | None = None, stochastic_rounding: bool = True,
             seed: int = 0) -> GradientTransformation:
    """Exponential moving average of the raw gradient, bias-corrected.

    ``m_t = b1 m_{t-1} + (1 - b1) g_t``;  output ``m_t / (1 - b1**t)``.
    With ``nesterov=True`` the output looks one step ahead:
    ``b1 m_t / (1 - b1**(t+1)) + (1 - b1) g_t / (1 - b1**t)``.
    ``state_dtype`` stores ``m`` in another dtype (e.g. fp32 for bf16 params); default: the
    parameter's dtype. ``momentum_format`` (``"float32"``, ``"bfloat16"``, ``"int8"``) stores it
    in that format instead: a low-precision ``m`` is read into fp32, updated, and written back
    rounded (stochastically by default, from ``seed``, kept in the state, the step and the
    parameter: ``update(..., salts={name: salt})`` or the salt of its name, and each element's
    flat index in it; a tensor that is a piece of a parameter, elements ``[offset, offset +
    numel)`` of it, says so with ``offsets={name: offset}``; see
    :mod:`adam_mini_tx.core.lowbits`); the output is fp32.
    """
    check_number("b1", b1, 0.0, 1.0)
    low = check_format(momentum_format) in LOW_PRECISION

    def init(params: Params) -> MomentumState | RoundedMomentumState:
        if low:
            check_sharded(params, momentum_format)
        mu = {n: new_moment(p, momentum_format, state_dtype) for n, p in params.items()}
        if low:
            return RoundedMomentumState(_zero_count(), mu, torch.tensor(seed))
        return MomentumState(_zero_count(), mu)

    @in_place_safe
    def update(updates, state, params=None, grads=None, *, salts=None, offsets=None,
               **extra_args):
        check_same_structure(_shapes(state.mu), updates, "updates", "momentum state")
        count = state.count + 1
        if low:  # m read into fp32 (a temporary of ours), updated there, stored rounded
            in_place, mu, values = donated(), {}, {}
            for name, m in state.mu.items():
                value = read(m)
                value.lerp_(to_dtype(updates[name], torch.float32), _as_weight(1 - b1, value))
                salt = salts[name] if salts is not None else salt_of(name)
                where = (salt, offsets.get(name, 0) if offsets else 0)
                mu[name] = write(value, m, in_place,
                                 (state.seed, count, *where) if stochastic_rounding else None)
                values[name] = fresh(value)
        else:
            lerp = torch.Tensor.lerp_ if donated() else torch.Tensor.lerp  # donated: in place
            mu = {name: lerp(m, to_dtype(updates[name], m.dtype), _as_weight(1 - b1, m))
                  for name, m in state.mu.items()}
            values = mu
        new_state = RoundedMomentumState(count, mu, state.seed) if low else MomentumState(count, mu)
        if not bias_correction:
            return dict(values), new_state
        correction = _PerDtype(_bias_correction(b1, count))
        if not nesterov:
            return ({name: _divided(m, correction(m.dtype)) for name, m in values.items()},
                    new_state)
        ahead = _PerDtype(_bias_correction(b1, count + 1))
        out = {name: fresh(_as_weight(b1, m) * m / ahead(m.dtype)
                           + _as_weight(1 - b1, m) * to_dtype(updates[name], m.dtype)
                           / correction(m.dtype))
               for name, m in values.items()}
        return out, new_state

    return GradientTransformation(init, update)


def _shapes(mu: Mapping[str, Any]) -> dict[str, Any]:
    """The first moments as tensors of their parameters' shapes (an int8 moment's codes)."""
    return {name: getattr(m, "codes", m) for name, m in mu.items()}


def _divided(m: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """``m / correction``, a new tensor (in a donated call: a temporary from the workspace)."""
    out = empty_temporary(m)
    return fresh(m / correction) if out is None else torch.div(m, correction, out=out)


def _as_weight(weight: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return to_dtype(weight, like.dtype) if isinstance(weight, torch.Tensor) else weight


class _Layouts:
    """Resolves the block layout of every parameter. A given plan (a BlockPlan or a mapping) is
    looked up and checked at every call, which is cheap; a plan made from the tensors (``None``
    or a function) is computed once per parameter structure."""

    def __init__(self, plan: PlanLike, plan_kwargs: dict):
        self._plan_kwargs = plan_kwargs
        self._given = plan.layouts() if isinstance(plan, BlockPlan) else plan
        self._cache: dict[tuple, Mapping[str, BlockLayout]] = {}

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, BlockLayout]:
        if isinstance(self._given, Mapping):
            return self._checked(tensors, self._given)
        key = tuple((name, tuple(t.shape)) for name, t in tensors.items())
        layouts = self._cache.get(key)
        if layouts is None:
            layouts = (plan_blocks(dict(tensors), **self._plan_kwargs).layouts()
                       if self._given is None else self._checked(tensors, self._given(tensors)))
            self._cache[key] = layouts
        return layouts

    @staticmethod
    def _checked(tensors: Mapping[str, torch.Tensor],
                 given: Mapping[str, BlockLayout]) -> Mapping[str, BlockLayout]:
        check_coverage(given, tensors.items())
        return {name: given[name] for name in tensors}


def blockwise_mean_square(b2: float | torch.Tensor = 0.999, plan: PlanLike = None, *,
                          eps: float | torch.Tensor = 1e-8, eps_root: float = 0.0,
                          state_dtype: torch.dtype | None = None,
                          **plan_kwargs) -> GradientTransformation:
    """Divide the incoming updates by the root of a blockwise EMA of the raw gradient's square.

    For every block ``b`` of the plan (a head, a neuron, a token, a whole norm, one element):
    ``v_b = b2 v_b + (1 - b2) mean_{i in b} g_i**2``, and the output is
    ``u_i / (sqrt(v_b / (1 - b2**t) + eps_root) + eps)`` for every ``i in b``.
    ``g`` is the raw gradient that entered the chain; ``u`` is what reaches this transform (the
    momentum, in Adam-mini). State: one scalar per block. ``plan=None`` plans the blocks from the
    parameter names and shapes (``plan_kwargs`` such as ``n_heads`` go to :func:`plan_blocks`).
    The statistic is accumulated in at least fp32 (:meth:`BlockLayout.row_sums_of_squares`),
    and ``(1 - b2) mean(g*g)`` is formed in that precision before it meets ``v``'s dtype.
    ``update(..., row_sums={name: sums})`` takes a parameter's row sums of squares computed
    earlier (by a statistics pass) instead of reading ``g`` for them.
    """
    check_number("b2", b2, 0.0, 1.0)
    check_number("eps", eps, 0.0)
    check_number("eps_root", eps_root, 0.0)
    layouts_of = _Layouts(plan, plan_kwargs)

    def init(params: Params) -> SecondMomentState:
        layouts = layouts_of(params)
        return SecondMomentState(_zero_count(), {
            name: _state_like(p, layouts[name].v_shape, state_dtype) for name, p in params.items()})

    @in_place_safe
    def update(updates, state, params=None, grads=None, *, row_sums=None, **extra_args):
        grads = updates if grads is None else grads
        check_same_keys(state.nu, updates, "updates", "second-moment state")
        check_same_structure(updates, grads, "grads", "updates")
        layouts = layouts_of(grads)
        for name, v in state.nu.items():  # before any state is written (donated: in place)
            if tuple(v.shape) != tuple(layouts[name].v_shape):
                raise ValueError(f"parameter {name!r}: the second-moment state has shape "
                                 f"{tuple(v.shape)} but its block layout needs "
                                 f"{layouts[name].v_shape}; the state was made with another "
                                 f"block plan: init it with this transform")
        count = state.count + 1
        correction = _bias_correction(b2, count)
        corrections = _PerDtype(correction), _PerDtype(correction.sqrt())
        in_place = donated()  # the state is donated: v is written in place
        nu, out = {}, {}
        for name, v in state.nu.items():
            layout = layouts[name]
            sums = row_sums.get(name) if row_sums else None
            if sums is None:
                sums = layout.row_sums_of_squares(grads[name], v.dtype)
            new_square = to_dtype(layout.blocks_from_row_sums(sums) * _as_weight(1 - b2, sums),
                                  v.dtype)
            v = (v.mul_(_as_weight(b2, v)).add_(new_square) if in_place
                 else v * _as_weight(b2, v) + new_square)
            nu[name] = v
            denominator = _root_of_corrected(v, *corrections, eps_root) + _as_weight(eps, v)
            if denominator.numel() < grads[name].numel():  # one value per block, broadcast
                denominator = _computed_once(denominator)
            update = to_dtype(updates[name], v.dtype)
            if update is not updates[name]:  # a cast made here is a temporary too
                fresh(update)
            out[name] = in_place_or_new(update, "div", layout.expand(denominator))
        return out, SecondMomentState(count, nu)

    return GradientTransformation(init, update)


def _root_of_corrected(v: torch.Tensor, correction: _PerDtype, root_of_correction: _PerDtype,
                       eps_root: float) -> torch.Tensor:
    """``sqrt(v / c + eps_root)``, computed as ``sqrt(v + eps_root c) / sqrt(c)`` (torch.optim's
    rounding order, so that elementwise blocks reproduce torch.optim.AdamW to the last bits)."""
    if eps_root:
        v = v + eps_root * correction(v.dtype)
    return safe_sqrt(v) / root_of_correction(v.dtype)


def decoupled_decay(weight_decay: ScalarOrSchedule = 1e-2) -> GradientTransformation:
    """Decoupled weight decay (AdamW): ``u + wd_t * p``. Chained before ``scale_by_lr(lr)`` it
    gives ``p <- p - lr (u + wd p)``, i.e. torch's ``p *= 1 - lr*wd``. ``weight_decay`` may be a
    float, a 0-d tensor or a schedule ``count -> value``. Restrict it to some parameters with
    :func:`partition`."""
    check_number("weight_decay", weight_decay, 0.0)

    def init(params: Params) -> CountState:
        return CountState(_zero_count())

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        if params is None:
            raise ValueError("decoupled_decay needs params: call update(grads, state, params)")
        check_same_structure(updates, params, "params", "updates")
        count = state.count + 1
        wd = resolve(weight_decay, count)
        if isinstance(wd, torch.Tensor):
            out = {name: in_place_or_new(u, "add",
                                         _as_weight(wd, u) * to_dtype(params[name], u.dtype))
                   for name, u in updates.items()}
        elif wd == 0:
            out = dict(updates)
        else:  # a Python number: one fused pass, u + wd * p
            out = {name: in_place_or_new(u, "add", to_dtype(params[name], u.dtype), alpha=wd)
                   for name, u in updates.items()}
        return out, CountState(count)

    return GradientTransformation(init, update)


def scale_by_lr(lr: ScalarOrSchedule = 1e-3) -> GradientTransformation:
    """``u -> -lr_t * u``. ``lr`` is a float, a 0-d tensor (change it in place: a compiled step
    does not recompile) or a schedule ``count -> value`` evaluated at the 1-based step count."""
    check_number("lr", lr, 0.0)

    def init(params: Params) -> CountState:
        return CountState(_zero_count())

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        count = state.count + 1
        rate = resolve(lr, count)
        return ({name: in_place_or_new(u, "mul", _as_weight(-rate, u))
                 for name, u in updates.items()}, CountState(count))

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates together so that their global L2 norm is at most ``max_norm``:
    ``u -> u * min(1, max_norm / ||u||)`` with ``||u||^2 = sum_n sum_i u_{n,i}^2`` (no host sync).
    Put it in an outer chain, ``chain(clip_by_global_norm(1.0), adam_mini(...))``, so that both
    moments see the clipped gradient."""
    check_number("max_norm", max_norm, 0.0)

    def init(params: Params) -> EmptyState:
        return EmptyState()

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        if not updates:
            return updates, state
        # accumulated in float64 without a float64 copy of any tensor
        norm = torch.sqrt(sum(torch.linalg.vector_norm(u, dtype=torch.float64).square()
                              for u in updates.values()))
        scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
        return {name: in_place_or_new(u, "mul", scale.to(u.dtype))
                for name, u in updates.items()}, state

    return GradientTransformation(init, update)


Labeler = Union[Mapping[str, str], Callable[[str, torch.Tensor], str]]


def partition(transforms: Mapping[str, GradientTransformation],
              labels: Labeler) -> GradientTransformation:
    """Route each parameter to the transform of its label: ``u_n -> T_{label(n)}(u_n)``.

    ``labels`` is a dict ``name -> label`` or a function ``(name, tensor) -> label``. Each inner
    transform sees only its own parameters (updates, params and grads alike). This is how masks
    are expressed: ``partition({"decay": decoupled_decay(wd), "no_decay": identity()}, ...)``.
    """

    def label_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        out = {}
        for name, tensor in tensors.items():
            label = labels(name, tensor) if callable(labels) else labels.get(name)
            if label not in transforms:
                raise ValueError(f"parameter {name!r} has label {label!r}, which is not one of "
                                 f"the partition's transforms {sorted(transforms)}")
            out[name] = label
        return out

    def select(tensors: Mapping[str, torch.Tensor] | None, names: list[str]):
        return None if tensors is None else {name: tensors[name] for name in names}

    def groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        by_label = {label: [] for label in transforms}
        for name, label in label_of(tensors).items():
            by_label[label].append(name)
        return by_label

    takes_extra = {label: takes_extra_args(t) for label, t in transforms.items()}

    def init(params: Params) -> PartitionState:
        return PartitionState({label: transforms[label].init(select(params, names))
                               for label, names in groups(params).items()})

    @in_place_safe
    def update(updates, state, params=None, grads=None, **extra_args):
        out, inner = {}, {}
        for label, names in groups(params if params is not None else updates).items():
            new, inner[label] = run_update(
                transforms[label], select(updates, names), state.inner[label],
                select(params, names), select(grads, names),
                extra_args if takes_extra[label] else None)
            out.update(new)
        return {name: out[name] for name in updates}, PartitionState(inner)

    return GradientTransformation(init, update)


__all__ = ["momentum", "blockwise_mean_square", "decoupled_decay", "scale_by_lr", "partition",
           "clip_by_global_norm",
           "safe_sqrt", "MomentumState", "RoundedMomentumState", "SecondMomentState", "CountState", "PartitionState",
           "EmptyState", "Updates"]
