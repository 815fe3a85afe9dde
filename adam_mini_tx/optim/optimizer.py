"""``AdamMini``: the functional Adam-mini chain behind the ``torch.optim.Optimizer`` interface.

A step reads top to bottom (:meth:`AdamMini.step`): collect the members, validate everything,
the statistics pass, the non-finite decision, apply, bump the step counts. Everything that can
be wrong with the inputs is found before the first write. The math is the chain's
(:func:`~adam_mini_tx.adam_mini`), run by a backend (:mod:`adam_mini_tx.optim.backends`).
``state_dict()`` carries ``"plan"`` (``BlockPlan.to_dict()``) besides torch's format; loading
checks it (:mod:`adam_mini_tx.optim.restore`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..core.guards import check_policy
from ..planning import BlockPlan, plan_blocks, warn_fallbacks
from ..kernels import native
from .backends import assign, backends_for, check_native, row_sums
from .groups import (named_group, named_groups, reject_duplicates, reject_sharded_low_precision,
                     resolve_plan)
from .hyperparams import Hyper, read_hyperparameters
from .members import Member, check_members, collect
from .nonfinite import decide, record_skip
from .restore import restored
from .state import bump_steps


class AdamMini(torch.optim.Optimizer):
    """Adam-mini as a ``torch.optim.Optimizer``: ``m = b1 m + (1-b1) g``,
    ``v_b = b2 v_b + (1-b2) mean_b(g*g)`` per block ``b``,
    ``p -= lr (m_hat / (sqrt(v_hat_b) + eps) + wd p)`` (decay only where the mask says so).

    ``params``: ``model.named_parameters()``; named param groups (dicts whose ``"params"`` are
    ``(name, param)`` pairs, with their own ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``decay_mask``, ``eps_root``); or unnamed parameters / groups together with ``plan=model``.
    Names must be unique. Hyperparameters are floats or one-element tensors, checked at every
    step (schedulers write them). ``plan``: a :class:`BlockPlan`, a module to plan from, or None
    to plan from the names with ``dim`` / ``n_heads`` / ``n_kv_heads``. ``decay_mask``:
    ``"matrices"`` (no decay for tensors with fewer than 2 dims, the default), ``"all"`` or
    ``"official"``. ``state_dtype``: dtype of ``m`` and ``v`` (default: the parameter's).
    ``nonfinite``: ``"skip"`` (default: a step with a NaN/Inf gradient changes nothing but
    ``group["nonfinite_skipped"]``, with a RuntimeWarning), ``"raise"`` (FloatingPointError) or
    ``"apply"`` (no check). ``fused``: run the chain compiled over buckets of same-layout
    parameters (the first step compiles; ``compile_seconds`` says how long).
    ``momentum_format``: how ``m`` is stored, ``"float32"``, ``"bfloat16"`` or ``"int8"``
    (blockwise, one fp32 scale per 256 elements of a row), rounded stochastically unless
    ``stochastic_rounding=False``, from ``momentum_seed``; None (default): ``state_dtype``.
    ``native``: run CPU parameters through the single-pass C++ kernel
    (:mod:`adam_mini_tx.kernels.native`, built on first use); None (default): where it loads,
    else the eager step (logged once, and shown in ``repr``); True: require it; False: never.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, plan: BlockPlan | nn.Module | None = None,
                 dim: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, state_dtype: torch.dtype | None = None,
                 decay_mask: str = "matrices", eps_root: float = 0.0, nonfinite: str = "skip",
                 fused: bool = False, momentum_format: str | None = None,
                 stochastic_rounding: bool = True, momentum_seed: int = 0,
                 native: bool | None = None):
        self.nonfinite = check_policy(nonfinite)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        check_native(native, fused)
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype such as torch.float32, "
                            f"got {state_dtype!r}")
        self.fused, self.state_dtype = fused, state_dtype
        self._names_by_id = ({id(p): n for n, p in plan.named_parameters()}
                             if isinstance(plan, nn.Module) else {})
        groups = named_groups(params, self._names_by_id)
        reject_duplicates(groups)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decay_mask=decay_mask, eps_root=eps_root, nonfinite_skipped=0,
                        momentum_format=momentum_format,
                        stochastic_rounding=stochastic_rounding, momentum_seed=momentum_seed)
        self._plan_kwargs = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        super().__init__(groups, defaults)
        for index, group in enumerate(self.param_groups):
            read_hyperparameters(group, f"param group {index}: ")
            reject_sharded_low_precision(group, index)
        self.plan = resolve_plan(plan, self._named_params(), **self._plan_kwargs)
        self._originals = dict(self._named_params())  # DeepSpeed replaces them in the groups
        mro = type(self).__mro__
        warn_fallbacks(self.plan, stacklevel=2 + sum("__init__" in vars(cls)  # the user's line
                                                     for cls in mro[:mro.index(AdamMini)]))
        self.native = native
        self._backends = backends_for(native, fused, self._named_params())
        self._layout_cache: tuple[BlockPlan | None, dict] = (None, {})

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step for every parameter that has a gradient; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layouts = self._layouts()
        # 1. the members (a first step's state stays pending until the step is sure to go on)
        groups, pending = collect(self.param_groups, self.state, layouts, self.state_dtype,
                                  self._originals)
        # 2. everything a backend will read, checked: after this the step cannot fail on input
        hypers = [read_hyperparameters(group, f"param group {index}: ")
                  for index, group in enumerate(self.param_groups)]
        check_members(groups)
        work = self._work(groups, hypers, layouts)
        # 3. the statistics pass (row sums the chain then takes) and 4. the non-finite decision
        sums, decision = None, None
        if self.nonfinite != "apply":
            sums, flags = row_sums(work)
            everyone = [member for members in groups for member in members]
            decision = decide(self.nonfinite, everyone, sums, flags, layouts)  # may raise
        self.state.update(pending)
        if decision is not None and not decision.apply:
            record_skip(self.param_groups, decision.bad)
            return loss
        if decision is not None and decision.widened:  # overflowing sums, again in float64
            sums.update(decision.widened)
            work = self._work(groups, hypers, layouts, frozenset(decision.widened))
        # 5. apply, and 6. bump the step counts of every member that was written
        written: list[Member] = []
        try:
            for units, hyper in zip(work, hypers):
                for backend, unit in units:
                    backend.apply(unit, hyper, sums, written)
        finally:
            bump_steps([member.state["step"] for member in written])
        return loss

    def _work(self, groups: list[list[Member]], hypers: list[Hyper], layouts: dict,
              widened: frozenset[str] = frozenset()) -> list[list[tuple[Any, Any]]]:
        """Per group, ``(backend, work)`` for its members (the backends chosen by ``assign``)."""
        return [[(backend, backend.prepare(chosen, layouts, hyper))
                 for backend, chosen in assign(members, self.fused, self._backends, layouts,
                                               widened)]
                for members, hyper in zip(groups, hypers)]

    @property
    def compile_seconds(self) -> float:
        """Seconds the fused step has spent compiling so far (0.0 when ``fused=False``)."""
        return self._backends.compiled.compile_seconds

    @property
    def scratch_bytes(self) -> int:
        """Bytes kept between steps besides the state: the eager step's workspace (one chunk's
        temporaries) and the fused step's per-row statistics buffers."""
        return sum(backend.scratch_bytes for backend in self._backends if backend is not None)

    @property
    def step_kind(self) -> str:
        """Which step runs the plain CPU tensors: ``"fused (compiled)"``, ``"native (single-pass
        C++ kernel)"`` or ``"eager"`` (with the reason when the native kernel is not used)."""
        if self.fused:
            return "fused (compiled)"
        if self._backends.native is not None:
            return "native (single-pass C++ kernel)"
        return "eager" if self.native is False else f"eager (native kernel {native.status()})"

    def __repr__(self) -> str:
        return f"{super().__repr__()}\nStep: {self.step_kind}"

    def _layouts(self) -> dict:
        """``name -> BlockLayout`` of the current plan (recomputed only when the plan changes)."""
        if self._layout_cache[0] is not self.plan:
            self._layout_cache = (self.plan, self.plan.layouts())
        return self._layout_cache[1]

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [pair for group in self.param_groups
                for pair in zip(group["param_names"], group["params"])]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a named group (``"params"``: ``(name, param)`` pairs, or tensors the module given as
        ``plan`` can name); its hyperparameters are checked and its tensors join the block plan.
        On any error the optimizer is left as it was."""
        if not hasattr(self, "plan"):  # torch's __init__: AdamMini checks the groups after it
            return super().add_param_group(param_group)
        group = named_group(dict(param_group), self._names_by_id)
        reject_duplicates([{"params": self._named_params()}, group])
        groups_before, plan_before = list(self.param_groups), self.plan
        try:
            super().add_param_group(group)
            added = self.param_groups[-1]
            read_hyperparameters(added, f"param group {len(self.param_groups) - 1}: ")
            reject_sharded_low_precision(added, len(self.param_groups) - 1)
            named = list(zip(added["param_names"], added["params"]))
            new = [(name, param) for name, param in named if name not in self.plan]
            plan = self.plan.merged(plan_blocks(new, **self._plan_kwargs)) if new else self.plan
            self.plan = resolve_plan(plan, named)
            self._originals.update(named)
        except Exception:
            self.param_groups[:] = groups_before
            self.plan = plan_before
            raise

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (``"state"``, ``"param_groups"`` with ``"param_names"``) plus
        ``"plan"``: the block plan it was made with (``BlockPlan.to_dict()``)."""
        state_dict = super().state_dict()
        state_dict["plan"] = self.plan.to_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint after checking it (:func:`~adam_mini_tx.optim.restore.restored`);
        on any mismatch a ValueError names the parameter and nothing changes. Load hooks run
        where torch runs them: pre-hooks before the checks, post-hooks after the state is in.
        State keeps its saved dtype unless ``state_dtype`` was given to the constructor."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        groups, state = restored(state_dict, self.param_groups, self.plan, self.state_dtype,
                                 self._originals)
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "plan": self.plan, "state_dtype": self.state_dtype,
                "_plan_kwargs": self._plan_kwargs, "nonfinite": self.nonfinite, "fused": self.fused,
                "native": self.native}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("_names_by_id", {})
        self.__dict__.setdefault("native", None)
        self.__dict__.setdefault("_backends",
                                 backends_for(self.native, self.fused, self._named_params()))
        self.__dict__.setdefault("_originals", dict(self._named_params()))
        self.__dict__.setdefault("_layout_cache", (None, {}))
        for group in self.param_groups:  # checkpoints from before the count existed
            group.setdefault("nonfinite_skipped", 0)


__all__ = ["AdamMini"]
