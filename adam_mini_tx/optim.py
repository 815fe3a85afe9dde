"""``AdamMini``: the functional Adam-mini chain behind the ``torch.optim.Optimizer`` interface.

Each step runs :func:`adam_mini_tx.adam_mini` (the one definition of the math) parameter by
parameter, so temporaries never exceed one parameter's size, and writes the result in place.

Per-parameter state (``optimizer.state[p]``, and ``state_dict()["state"][i]``), stable keys:

* ``"step"``: 0-d int64 tensor, steps taken by this parameter;
* ``"m"``: first moment, the parameter's shape;
* ``"v"``: blockwise second moment, one value per block (``plan[name].layout.v_shape``).

``state_dict()`` also carries ``"plan"`` (``BlockPlan.to_dict()``); loading checks it against the
optimizer's own plan, and every state tensor's shape, before anything is changed.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .alias import DECAY_MASKS, adam_mini, adam_mini_slots, adam_mini_state_from_slots
from .base import check_betas, check_number
from .plan import BlockPlan, plan_blocks

logger = logging.getLogger("adam_mini_tx")

STATE_KEYS = ("step", "m", "v")


class AdamMini(torch.optim.Optimizer):
    """Adam-mini as a ``torch.optim.Optimizer``.

    ``params``: ``model.named_parameters()``, named param groups (dicts whose ``"params"`` are
    ``(name, param)`` pairs, with their own ``lr``/``betas``/``eps``/``weight_decay``/``decay_mask``),
    or unnamed parameters together with ``plan=model`` (names are looked up in the module).
    ``plan``: a :class:`BlockPlan`, a module to plan from (reads its config), or None to plan from
    the names with ``dim``/``n_heads``/``n_kv_heads``. ``decay_mask``: ``"matrices"`` (no decay for
    tensors with fewer than 2 dims, the default), ``"all"`` or ``"official"``.
    ``state_dtype``: dtype of ``m`` and ``v`` (default: the parameter's; e.g. fp32 for bf16 params).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, plan: BlockPlan | nn.Module | None = None,
                 dim: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, state_dtype: torch.dtype | None = None,
                 decay_mask: str = "matrices", eps_root: float = 0.0):
        check_number("lr", lr, 0.0)
        check_betas(betas)
        check_number("eps", eps, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        _check_decay_mask(decay_mask)
        groups = _named_groups(params, plan)
        _reject_duplicates(groups)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decay_mask=decay_mask, eps_root=eps_root)
        self.state_dtype = state_dtype
        super().__init__(groups, defaults)
        self.plan = _resolve_plan(plan, self._named_params(), dim=dim, n_heads=n_heads,
                                  n_kv_heads=n_kv_heads)

    # ----- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step for every parameter that has a gradient; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tx = self._transform(group)
            for name, param in zip(group["param_names"], group["params"]):
                if param.grad is None:
                    continue
                self._step_param(tx, name, param)
        return loss

    def _transform(self, group: Mapping[str, Any]):
        """The group's Adam-mini chain; lr and weight decay are read from the group at each
        step, so schedulers (which write ``group["lr"]``) take effect without rebuilding."""
        return adam_mini(lambda count: group["lr"], group["betas"], group["eps"],
                         lambda count: group["weight_decay"], plan=self.plan,
                         eps_root=group["eps_root"], state_dtype=self.state_dtype,
                         decay_mask=group["decay_mask"])

    def _step_param(self, tx, name: str, param: torch.Tensor) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise ValueError(f"parameter {name!r} has a sparse gradient, which AdamMini does not "
                             f"support; use dense gradients (e.g. nn.Embedding(sparse=False))")
        state = self.state[param]
        if not state:
            state.update(adam_mini_slots(tx.init({name: param}), name))
        updates, new_state = tx.update({name: grad}, adam_mini_state_from_slots(state, name),
                                       {name: param})
        param.add_(updates[name].to(param.dtype))
        state.update(adam_mini_slots(new_state, name))

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"plan"``, the block plan it was made with."""
        state_dict = super().state_dict()
        state_dict["plan"] = self.plan.to_dict()
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint after checking its plan and state shapes; nothing changes on error.
        State tensors keep their saved dtype (fp32 state of bf16 params stays fp32)."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected a mapping with 'state' and "
                             "'param_groups' (pass optimizer.state_dict())")
        if "plan" not in state_dict:
            raise ValueError("checkpoint has no 'plan': it was not saved by AdamMini.state_dict()")
        self._check_plan(state_dict["plan"])
        self._check_state_shapes(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "plan"})
        self._restore_saved_dtypes(state_dict)

    def _restore_saved_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        """torch casts floating state to the parameter dtype on load; put back the saved dtype
        (fp32 state of bf16 params must stay fp32 for an exact resume)."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if key != "step":
                        self.state[param][key] = value.to(device=param.device)

    def _check_plan(self, saved: Any) -> None:
        mine = self.plan.to_dict()
        if saved == mine:
            return
        if not isinstance(saved, Mapping):
            raise ValueError("checkpoint 'plan' is not a mapping: the checkpoint is damaged")
        for name in [*mine, *(n for n in saved if n not in mine)]:
            if mine.get(name) != saved.get(name):
                raise ValueError(f"checkpoint was saved with another block plan: parameter {name!r} "
                                 f"is {_describe(saved.get(name))} in the checkpoint but "
                                 f"{_describe(mine.get(name))} here; load it into the same model "
                                 f"with the same plan")
        raise ValueError("checkpoint plan differs from this optimizer's plan (parameter order)")

    def _check_state_shapes(self, state_dict: Mapping[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} param groups but this optimizer "
                             f"has {len(self.param_groups)}")
        for saved, group in zip(saved_groups, self.param_groups):
            ids = saved.get("params", [])
            if len(ids) != len(group["params"]):
                raise ValueError(f"checkpoint group has {len(ids)} parameters but this optimizer's "
                                 f"group has {len(group['params'])}")
            for index, name, param in zip(ids, group["param_names"], group["params"]):
                slots = state_dict["state"].get(index)
                if slots is not None:
                    self._check_slots(name, param, slots)

    def _check_slots(self, name: str, param: torch.Tensor, slots: Any) -> None:
        if not isinstance(slots, Mapping) or set(slots) != set(STATE_KEYS):
            keys = sorted(slots) if isinstance(slots, Mapping) else type(slots).__name__
            raise ValueError(f"checkpoint state of parameter {name!r} has keys {keys}, expected "
                             f"{list(STATE_KEYS)}")
        expected = {"step": (), "m": tuple(param.shape), "v": self.plan[name].layout.v_shape}
        for key, shape in expected.items():
            value = slots[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"checkpoint state {key!r} of parameter {name!r} has shape {got}, "
                                 f"expected {shape}: the checkpoint is from another model")

    # ----- helpers ----------------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [pair for group in self.param_groups
                for pair in zip(group["param_names"], group["params"])]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a named group (``"params"``: ``(name, param)`` pairs); it joins the block plan."""
        super().add_param_group(param_group)
        if hasattr(self, "plan"):  # groups added after construction extend the plan
            group = self.param_groups[-1]
            new = [(n, p) for n, p in zip(group["param_names"], group["params"])
                   if n not in self.plan]
            if new:
                self.plan = self.plan.merged(plan_blocks(new))


def _describe(entry: Any) -> str:
    if not isinstance(entry, Mapping):
        return "absent" if entry is None else repr(entry)
    return f"shape {entry.get('shape')} blocked {entry.get('pattern')!r}"


def _check_decay_mask(decay_mask: Any) -> None:
    if decay_mask not in DECAY_MASKS:
        raise ValueError(f"invalid decay_mask={decay_mask!r}: use one of {sorted(DECAY_MASKS)}")


def _named_groups(params: Iterable[Any], plan: Any) -> list[dict[str, Any]]:
    """Normalise every accepted form of ``params`` into named param groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of (name, parameter) pairs or of param groups, "
                        "not a single tensor; pass model.named_parameters()")
    items = list(params)
    if not items:
        raise ValueError("AdamMini got an empty parameter list")
    groups = items if all(isinstance(item, Mapping) for item in items) else [{"params": items}]
    names_by_id = ({id(p): n for n, p in plan.named_parameters()}
                   if isinstance(plan, nn.Module) else {})
    return [_named_group(dict(group), names_by_id) for group in groups]


def _named_group(group: dict[str, Any], names_by_id: dict[int, str]) -> dict[str, Any]:
    if "params" not in group:
        raise ValueError("a param group needs a 'params' entry of (name, parameter) pairs")
    members = list(group["params"])
    named = []
    for member in members:
        if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
            named.append(member)
        elif isinstance(member, torch.Tensor) and id(member) in names_by_id:
            named.append((names_by_id[id(member)], member))
        elif isinstance(member, torch.Tensor):
            raise ValueError("AdamMini needs parameter names to choose each tensor's blocks: pass "
                             "model.named_parameters() (or named groups), or plan=model to look "
                             "the names up in the module")
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
    if plan is None:
        return plan_blocks(named, **plan_kwargs)
    if isinstance(plan, nn.Module):
        plan = plan_blocks(plan, **plan_kwargs)
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
