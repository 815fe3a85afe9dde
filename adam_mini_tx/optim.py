"""``AdamMini``: the functional Adam-mini chain behind the ``torch.optim.Optimizer`` interface.

Each step runs :func:`adam_mini_tx.adam_mini` (the one definition of the math) through
:func:`~adam_mini_tx.fused.chain_step`: eagerly over chunks of parameters and row pieces with
donated buffers (:mod:`adam_mini_tx.eager`: ``m`` and ``v`` written in place, one small
temporary per piece, then ``p.add_(update)``), or with ``fused=True`` compiled over buckets of
parameters that share a layout, writing parameters and state in place (:mod:`adam_mini_tx.fused`).

Per-parameter state (``optimizer.state[p]`` and ``state_dict()["state"][i]``), stable keys:

* ``"step"``: 0-d int64 tensor, steps taken by this parameter;
* ``"m"``: first moment, the parameter's shape;
* ``"v"``: blockwise second moment, one value per block (``plan[name].layout.v_shape``).

They are DTensors when the parameter is a DTensor. ``state_dict()`` also carries ``"plan"``
(``BlockPlan.to_dict()``); loading checks the parameter names, the plan and every state tensor's
shape against this optimizer before anything is changed.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from .alias import DECAY_MASKS, adam_mini, adam_mini_slots
from .base import (GradientTransformation, check_betas, check_gradients, check_number,
                   to_dtype)
from .blocks import GivenRowSumsMap, is_dtensor
from .donation import Workspace, donating
from .eager import Member, chunks, row_pieces, row_statistics
from .fused import FusedStep, chain_step
from .guards import all_finite, check_policy, nonfinite_names
from .plan import BlockPlan, plan_blocks

STATE_KEYS = ("step", "m", "v")
"""The keys of ``optimizer.state[p]`` (see the module docstring)."""

_LAYOUT_FIELDS = ("shape", "perm", "row_dims", "runs")  # what a plan entry means for the state
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "decay_mask", "eps_root")


def init_slots(tx: GradientTransformation, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh ``{"step": 0, "m": 0, "v": 0}`` for one parameter, made by ``tx.init``."""
    return adam_mini_slots(tx.init({name: param}), name)


class AdamMini(torch.optim.Optimizer):
    """Adam-mini as a ``torch.optim.Optimizer``: ``m = b1 m + (1-b1) g``,
    ``v_b = b2 v_b + (1-b2) mean_b(g*g)`` per block ``b``,
    ``p -= lr (m_hat / (sqrt(v_hat_b) + eps) + wd p)`` (decay only where the mask says so).

    ``params``: ``model.named_parameters()``; named param groups (dicts whose ``"params"`` are
    ``(name, param)`` pairs, with their own ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``decay_mask``, ``eps_root``); or unnamed parameters / groups together with ``plan=model``
    (names are looked up in the module by identity; a :class:`BlockPlan` alone cannot name tensors).
    ``lr``: a float or a 0-d tensor (schedulers write ``group["lr"]``; it is read at every step).
    ``plan``: a :class:`BlockPlan`, a module to plan from (reads its config), or None to plan from
    the names with ``dim`` / ``n_heads`` / ``n_kv_heads``. ``decay_mask``: ``"matrices"`` (no decay
    for tensors with fewer than 2 dims, the default), ``"all"`` or ``"official"``.
    ``state_dtype``: dtype of ``m`` and ``v`` (default: the parameter's; e.g. fp32 for bf16 params).
    ``nonfinite``: what a step does when a gradient holds NaN or Inf: ``"skip"`` (default: nothing
    changes, a RuntimeWarning is issued and ``group["nonfinite_skipped"]`` counts it; one host sync
    per step), ``"raise"`` (``FloatingPointError`` naming the parameters) or ``"apply"`` (no check).
    ``fused``: run the same chain compiled with ``torch.compile`` over buckets of parameters that
    share a block layout, writing parameters and state in place (no full-size temporaries). The
    first step compiles every bucket shape (``optimizer.compile_seconds`` reports the time);
    DTensor (FSDP2) parameters keep the eager path. Equal to the eager step to ~1e-7. In both
    modes, with a non-finite check (``"skip"``, ``"raise"``) a statistics pass computes every
    gradient's row sums of squares first; the check reads those and the chain takes them, so the
    check costs no read of the gradients of its own (the first step creates the state before it).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, plan: BlockPlan | nn.Module | None = None,
                 dim: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, state_dtype: torch.dtype | None = None,
                 decay_mask: str = "matrices", eps_root: float = 0.0, nonfinite: str = "skip",
                 fused: bool = False):
        self.nonfinite = check_policy(nonfinite)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        self.fused = fused
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype such as torch.float32, "
                            f"got {state_dtype!r}")
        self._names_by_id = ({id(p): n for n, p in plan.named_parameters()}
                             if isinstance(plan, nn.Module) else {})
        groups = _named_groups(params, self._names_by_id)
        _reject_duplicates(groups)
        defaults = dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                        decay_mask=decay_mask, eps_root=eps_root, nonfinite_skipped=0)
        self.state_dtype = state_dtype
        self._plan_kwargs = dict(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        self._chains: list[_GroupChain] = []
        self._layouts: tuple[BlockPlan | None, dict] = (None, {})
        super().__init__(groups, defaults)
        self.plan = _resolve_plan(plan, self._named_params(), **self._plan_kwargs)

    # ----- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step for every parameter that has a gradient; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._checked_gradients()
        chains = [self._chain(index, group) for index, group in enumerate(self.param_groups)]
        # the statistics passes need the state (v's dtype, the pieces' views) before the check
        members = [self._members(chain.tx, group)
                   for chain, group in zip(chains, self.param_groups)]
        check = self.nonfinite != "apply"
        finite, checked, eager = [], set(), []
        for chain, group_members in zip(chains, members):
            if chain.fused is not None:  # fused: its members' statistics pass, then the rest
                local = [m for m in group_members if not is_dtensor(m[1])]
                finite.extend(chain.fused.prepare(local, statistics=check))
                checked.update(name for name, _, _ in local)
                group_members = [m for m in group_members if is_dtensor(m[1])]
            pieces = [piece for name, param, state in group_members
                      for piece in row_pieces(name, param, state, chain.given.layouts)]
            if check:  # the check reads the statistics, and the chain takes them
                flags, covered = row_statistics(pieces, chain.given)
                finite.extend(flags)
                checked.update(covered)
            eager.append(pieces)
        try:
            if check and not self._finite_or_skip(grads, finite, checked):
                return loss
            for chain, group, pieces in zip(chains, self.param_groups, eager):
                if chain.fused is not None:
                    chain.fused.apply(group)
                _eager_step(chain, pieces)
        finally:
            for chain in chains:
                chain.given.forget_sums()
        return loss

    @property
    def compile_seconds(self) -> float:
        """Seconds the fused step has spent compiling so far (0.0 when ``fused=False``)."""
        return sum(chain.fused.compile_seconds for chain in self._chains
                   if chain.fused is not None)

    @property
    def scratch_bytes(self) -> int:
        """Bytes the optimizer keeps between steps besides its state: the eager step's workspace
        (one chunk's temporaries) and the fused step's per-row statistics buffers."""
        return sum(chain.workspace.nbytes + (chain.fused.scratch_bytes if chain.fused else 0)
                   for chain in self._chains)

    def _checked_gradients(self) -> dict[str, torch.Tensor]:
        """Every gradient of this step, validated before any parameter or state changes."""
        grads = {name: param.grad for name, param in self._named_params()
                 if param.grad is not None}
        check_gradients(grads)
        return grads

    def _members(self, tx: GradientTransformation, group: dict[str, Any]
                 ) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(name, param, state)`` for the group's parameters that have a gradient, their state
        initialised by ``tx`` where it is empty."""
        members = []
        for name, param in zip(group["param_names"], group["params"]):
            if param.grad is not None:
                state = self.state[param]
                if not state:
                    state.update(init_slots(tx, name, param))
                members.append((name, param, state))
        return members

    def _finite_or_skip(self, grads: dict[str, torch.Tensor], finite: list[torch.Tensor],
                        checked: set[str]) -> bool:
        """The non-finite policy: True if the step may go on (one host sync per step).
        ``finite`` holds flags, from the statistics passes, that already cover the gradients
        named in ``checked``; the others are read here."""
        rest = {name: grad for name, grad in grads.items() if name not in checked}
        if rest:
            finite = [*finite, all_finite(rest)]
        if not finite or bool(torch.stack([flag.to(finite[0].device) for flag in finite]).all()):
            return True
        names = nonfinite_names(grads)
        if not names:  # finite gradients whose squares overflow: the step goes on, as eager
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient in {names}; the step was not applied")
        for group in self.param_groups:
            group["nonfinite_skipped"] += 1
        warnings.warn(f"AdamMini skipped a step: non-finite gradient in {names[:5]} "
                      f"({self.param_groups[0]['nonfinite_skipped']} skipped so far)",
                      RuntimeWarning, stacklevel=3)
        return False

    def _chain(self, index: int, group: dict[str, Any]) -> _GroupChain:
        """The group's :func:`adam_mini` chain (and its fused step when ``fused=True``), built once
        and rebuilt only when ``betas``, ``eps``, ``eps_root`` or ``decay_mask`` change (OneCycleLR
        cycles beta1) or the group was replaced (``load_state_dict``). ``lr`` and
        ``weight_decay`` are read from the group at every step, so schedulers that write
        ``group["lr"]`` need no rebuild (and no recompile)."""
        key = (tuple(group["betas"]), group["eps"], group["eps_root"], group["decay_mask"])
        while len(self._chains) <= index:
            self._chains.append(_GroupChain({}, (), None, None, GivenRowSumsMap({}), Workspace()))
        cached = self._chains[index]
        if cached.group is not group or cached.key != key:
            def make(lr, weight_decay, plan, decay_mask):
                return adam_mini(lr, group["betas"], group["eps"], weight_decay, plan=plan,
                                 eps_root=group["eps_root"], state_dtype=self.state_dtype,
                                 decay_mask=decay_mask)

            layouts = self._layout_map()
            given = GivenRowSumsMap(layouts)
            tx = make(lambda count: group["lr"], lambda count: group["weight_decay"], given,
                      group["decay_mask"])
            fused_step = None
            if self.fused:
                mask = DECAY_MASKS[group["decay_mask"]]
                fused_step = FusedStep(
                    lambda lr, wd, plan, label: make(lr, wd, plan, lambda name, t: label),
                    layouts, mask)
            self._chains[index] = _GroupChain(group, key, tx, fused_step, given, Workspace())
        return self._chains[index]

    def _layout_map(self) -> dict:
        """``name -> BlockLayout`` of the current plan (recomputed only when the plan changes)."""
        if self._layouts[0] is not self.plan:
            self._layouts = (self.plan, self.plan.layouts())
        return self._layouts[1]

    # ----- param groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a named group (``"params"``: ``(name, param)`` pairs, or tensors the module given as
        ``plan`` can name); its hyperparameters are checked and its tensors join the block plan."""
        if hasattr(self, "plan"):  # after construction: name, de-duplicate, then plan the group
            param_group = _named_group(dict(param_group), getattr(self, "_names_by_id", {}))
            _reject_duplicates([{"params": self._named_params()}, param_group])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, len(self.param_groups) - 1)
        if hasattr(self, "plan"):
            new = [(n, p) for n, p in zip(group["param_names"], group["params"])
                   if n not in self.plan]
            if new:
                self.plan = self.plan.merged(plan_blocks(new, **self._plan_kwargs))

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [pair for group in self.param_groups
                for pair in zip(group["param_names"], group["params"])]

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (``"state"``, ``"param_groups"`` with ``"param_names"``) plus
        ``"plan"``: the block plan it was made with (``BlockPlan.to_dict()``)."""
        state_dict = super().state_dict()
        state_dict["plan"] = self.plan.to_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint after checking it; on any mismatch a ValueError names the parameter
        and nothing changes. Checked: group sizes, parameter names (when saved), each group's
        hyperparameters, the block plan (when saved; checkpoints written through
        torch.distributed.checkpoint have none), and every state tensor's shape, dtype and values
        (an integer step >= 0; finite ``m``; finite ``v >= 0``). State tensors keep their saved
        dtype (fp32 state of bf16 params stays fp32)."""
        if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict \
                or not isinstance(state_dict.get("state"), Mapping):
            raise ValueError("not an optimizer state dict: expected a mapping with 'state' (a "
                             "mapping) and 'param_groups' (pass optimizer.state_dict())")
        self._check_groups(state_dict["param_groups"])
        if "plan" in state_dict:
            self._check_plan(state_dict["plan"])
        self._check_state_shapes(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "plan"})
        self._own_loaded_state(state_dict)

    def _own_loaded_state(self, state_dict: Mapping[str, Any]) -> None:
        """Give every loaded state tensor its own storage, in its saved dtype. torch's loader
        shares the tensors with ``state_dict`` (a fused step, which writes state in place, would
        then change the caller's checkpoint or another optimizer's state) and casts floating state
        to the parameter dtype (fp32 state of bf16 params must stay fp32)."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    device = value.device if key == "step" else param.device
                    self.state[param][key] = value.to(device=device, copy=True)

    def _check_groups(self, saved_groups: Any) -> None:
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
            raise ValueError(f"checkpoint has {count} param groups but this optimizer has "
                             f"{len(self.param_groups)}: build the optimizer with the same groups")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            self._check_saved_group(saved, index)
            ids = saved["params"]
            if len(ids) != len(group["params"]):
                raise ValueError(f"checkpoint param group {index} has {len(ids)} parameters but this "
                                 f"optimizer's has {len(group['params'])}")
            names = saved.get("param_names")
            if names is None:
                continue
            for position, (theirs, mine) in enumerate(zip(names, group["param_names"])):
                if theirs != mine:
                    raise ValueError(f"checkpoint param group {index} holds {theirs!r} at position "
                                     f"{position} where this optimizer has {mine!r}: give the "
                                     f"parameters in the same order as when it was saved")

    @staticmethod
    def _check_saved_group(saved: Any, index: int) -> None:
        """A saved group is a mapping with a list of parameter ids and valid hyperparameters
        (torch would load a hand-edited ``lr=-1`` or a group without ``eps`` and fail later)."""
        where = f"checkpoint param group {index}"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{where} is not a mapping with a 'params' list: the checkpoint is "
                             f"damaged; use an earlier one")
        missing = [key for key in _HYPERPARAMETERS if key not in saved]
        names = saved.get("param_names", [])
        if missing or not isinstance(names, (list, tuple)):
            raise ValueError(f"{where} lacks {missing or 'a param_names list'}: the checkpoint is "
                             f"damaged or was not saved by AdamMini")
        try:
            _check_group(saved, index)
        except (ValueError, TypeError) as error:
            raise ValueError(f"checkpoint {error}; the checkpoint is damaged") from None

    def _check_plan(self, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            raise ValueError("checkpoint 'plan' is not a mapping: the checkpoint is damaged")
        mine = self.plan.to_dict()
        for name in [*mine, *(n for n in saved if n not in mine)]:
            if _layout_of(mine.get(name)) != _layout_of(saved.get(name)):
                raise ValueError(f"checkpoint was saved with another block plan: parameter {name!r} "
                                 f"is {_describe(saved.get(name))} in the checkpoint but "
                                 f"{_describe(mine.get(name))} here; load it into the same model "
                                 f"with the same plan")

    def _check_state_shapes(self, state_dict: Mapping[str, Any]) -> None:
        known = set()
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            known.update(saved["params"])
            for index, name, param in zip(saved["params"], group["param_names"], group["params"]):
                slots = state_dict["state"].get(index)
                if slots is not None:
                    self._check_slots(name, param, slots)
        unknown = [index for index in state_dict["state"] if index not in known]
        if unknown:
            raise ValueError(f"checkpoint has state for parameter ids {unknown[:5]} that no param "
                             f"group lists: the checkpoint is damaged or from another optimizer")

    def _check_slots(self, name: str, param: torch.Tensor, slots: Any) -> None:
        if not isinstance(slots, Mapping) or set(slots) != set(STATE_KEYS):
            keys = sorted(slots) if isinstance(slots, Mapping) else type(slots).__name__
            raise ValueError(f"checkpoint state of parameter {name!r} has keys {keys}, expected "
                             f"{list(STATE_KEYS)}: it was not saved by AdamMini")
        expected = {"step": (), "m": tuple(param.shape), "v": self.plan[name].layout.v_shape}
        for key, shape in expected.items():
            value = slots[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"checkpoint state {key!r} of parameter {name!r} has shape {got}, "
                                 f"expected {shape}: the checkpoint is from another model or plan")
            local = value.to_local() if hasattr(value, "to_local") else value
            if key == "step":
                valid = not (local.is_floating_point() or local.is_complex()
                             or local.dtype == torch.bool) and int(local) >= 0
                wanted = "a non-negative integer count"
            else:
                valid = local.is_floating_point() and bool(torch.isfinite(local).all())
                valid = valid and (key != "v" or bool((local >= 0).all()))
                wanted = ("finite floating-point values" if key == "m" else
                          "finite non-negative floating-point values (a mean of squares)")
            if not valid:
                raise ValueError(f"checkpoint state {key!r} of parameter {name!r} ({local.dtype}) "
                                 f"does not hold {wanted}: the checkpoint is corrupt; use an "
                                 f"earlier one")

    # ----- pickling / copying -----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "plan": self.plan, "state_dtype": self.state_dtype,
                "_plan_kwargs": self._plan_kwargs, "nonfinite": self.nonfinite, "fused": self.fused}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)
        for group in self.param_groups:  # checkpoints from before the count existed
            group.setdefault("nonfinite_skipped", 0)
        self._chains = []  # groups may be new dicts (load_state_dict, unpickling): rebuild lazily
        self._layouts = (None, {})


class _GroupChain(NamedTuple):
    """A param group's chain, built by ``AdamMini._chain`` for the group's hyperparameters."""

    group: dict[str, Any]  # the param group it was built for
    key: tuple  # the hyperparameters it was built with
    tx: GradientTransformation  # the group's adam_mini chain
    fused: FusedStep | None  # its fused step (fused=True)
    given: GivenRowSumsMap  # what tx reads: the layouts (and row pieces) with given row sums
    workspace: Workspace  # the eager step's temporaries (one chunk's worth, reused)


def _eager_step(chain: _GroupChain, pieces: list[Member]) -> None:
    """The group's chain over chunks of its members and row pieces (see
    :mod:`adam_mini_tx.eager`), with donated buffers: ``m`` and ``v`` are written in place (also
    through row pieces' views), and the statistics are the given row sums where there are."""
    for chunk in chunks(pieces):
        with donating(chain.workspace):
            updates, slots = chain_step(chain.tx, {m.name: m.param for m in chunk},
                                        {m.name: m.grad for m in chunk},
                                        {m.name: m.state for m in chunk})
        for member in chunk:
            member.param.add_(to_dtype(updates[member.name], member.param.dtype))
            member.owner["step"] = slots[member.name]["step"]


def _layout_of(entry: Any) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    return tuple(_as_tuple(entry.get(key)) for key in _LAYOUT_FIELDS)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _describe(entry: Any) -> str:
    if not isinstance(entry, Mapping):
        return "absent" if entry is None else repr(entry)
    return f"shape {entry.get('shape')} blocked {entry.get('pattern')!r}"


def _check_group(group: Mapping[str, Any], index: int) -> None:
    """Validate one param group's hyperparameters, naming the group."""
    where = f"param group {index}: "
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}lr must be a float or a one-element tensor, got shape "
                         f"{tuple(lr.shape)}")
    try:
        check_number("lr", lr, 0.0)
        check_betas(group["betas"])
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_number("eps_root", group["eps_root"], 0.0)
    except (ValueError, TypeError) as error:
        raise type(error)(where + str(error)) from None
    skipped = group.get("nonfinite_skipped", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"{where}nonfinite_skipped={skipped!r} must be a count >= 0")
    if group["decay_mask"] not in DECAY_MASKS:
        raise ValueError(f"{where}invalid decay_mask={group['decay_mask']!r}: use one of "
                         f"{sorted(DECAY_MASKS)} (or weight_decay=0.0 for the group)")


def _named_groups(params: Iterable[Any], names_by_id: dict[int, str]) -> list[dict[str, Any]]:
    """Normalise every accepted form of ``params`` into named param groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of (name, parameter) pairs or of param groups, "
                        "not a single tensor; pass model.named_parameters()")
    items = list(params)
    if not items:
        raise ValueError("AdamMini got an empty parameter list")
    groups = items if all(isinstance(item, Mapping) for item in items) else [{"params": items}]
    return [_named_group(dict(group), names_by_id) for group in groups]


def _named_group(group: dict[str, Any], names_by_id: dict[int, str]) -> dict[str, Any]:
    if "params" not in group:
        raise ValueError("a param group needs a 'params' entry of (name, parameter) pairs")
    members = group["params"]
    members = [members] if isinstance(members, torch.Tensor) else list(members)
    if "param_names" in group:  # torch's own named-group form: parallel lists
        members = list(zip(group.pop("param_names"), members))
    named = []
    for member in members:
        if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
            named.append(member)
        elif isinstance(member, torch.Tensor) and id(member) in names_by_id:
            named.append((names_by_id[id(member)], member))
        elif isinstance(member, torch.Tensor):
            raise ValueError(f"AdamMini needs parameter names to choose each tensor's blocks, but "
                             f"got an unnamed tensor of shape {tuple(member.shape)}: pass "
                             f"model.named_parameters() (or groups of (name, param) pairs), or "
                             f"plan=model to look the names up in the module")
        else:
            raise TypeError(f"AdamMini params must be (name, tensor) pairs, got "
                            f"{type(member).__name__}")
    group["params"] = named
    return group


def _reject_duplicates(groups: list[dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for group in groups:
        for name, param in group["params"]:
            if id(param) in seen:
                raise ValueError(f"parameter {name!r} appears twice (also as {seen[id(param)]!r}), "
                                 f"e.g. in two param groups; give each parameter to one group")
            seen[id(param)] = name


def _resolve_plan(plan: Any, named: list[tuple[str, torch.Tensor]], **plan_kwargs) -> BlockPlan:
    """The optimizer's plan. A module is planned from its structure; tensors it leaves out (frozen
    ones) are planned from their names. A given BlockPlan must cover every parameter."""
    if plan is None:
        return plan_blocks(named, **plan_kwargs)
    if isinstance(plan, nn.Module):
        plan = plan_blocks(plan, **plan_kwargs)
        missing = [(n, p) for n, p in named if n not in plan]
        if missing:
            plan = plan.merged(plan_blocks(missing, **plan_kwargs))
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan must be a BlockPlan, an nn.Module or None, got {type(plan).__name__}")
    for name, param in named:
        if name not in plan:
            raise ValueError(f"parameter {name!r} is not covered by the block plan; build the plan "
                             f"from the same model (amx.plan_blocks(model)) or add a rule for it")
        if tuple(plan[name].shape) != tuple(param.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(param.shape)} but the plan was "
                             f"made for {plan[name].shape}; rebuild the plan")
    return plan


__all__ = ["AdamMini", "STATE_KEYS", "init_slots"]
