"""``Adam_mini``: a drop-in for the official ``adam_mini.Adam_mini`` (version 1.1.1).

Same signature, and the same numbers on the models the official package handles (Llama-style
names: ``embed_tokens``, ``q_proj`` ... ``lm_head``; grouped-query attention included).

Kept from the official package, for fidelity:

* the update: ``m = b1 m + (1-b1) g``, ``v_b = b2 v_b + (1-b2) mean_b(g*g)``,
  ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat_b) + eps)``;
* its weight-decay rule, substring quirk included: no decay where the lower-cased name contains
  ``norm``, ``ln`` or ``bias`` (``decay_mask="official"``), so a 2-D ``relative_attention_bias``
  is not decayed either (:class:`~adam_mini_tx.AdamMini`'s default decays every tensor with >= 2 dims);
* frozen parameters (``requires_grad=False``) are left out; ``model_sharding`` is accepted.

Fixed:

* blocks come from the planner. q/k get one block per head from ``n_heads`` / ``n_kv_heads``
  (the official cuts ``view(-1, dim * dim / n_heads)``: it crashes when ``dim`` is left at its
  default on a model of another width, and cuts heads in pieces when ``head_dim * n_heads != dim``;
  ``dim`` only sizes the heads of a tensor that a changed ``wqk_names`` sends there). Names
  are matched by whole components, and architectures the official crashes on (BERT, ViT, T5,
  GPT-NeoX, 3-D experts) are planned from their shapes;
* it logs the block table (``logging.getLogger("adam_mini_tx")``) instead of printing;
* one param group for all tensors instead of one per tensor (``betas`` instead of ``beta1`` /
  ``beta2`` keys), state keys ``step`` / ``m`` / ``v`` with a 0-d tensor step, checkpoints checked
  on load. Official checkpoints (``vmean``, ``head_per_gpu``...) are converted on load
  (:meth:`Adam_mini.convert_official_state_dict`) where both packages block a tensor alike.

The official's tuning knobs are kept: the seven name sets (:data:`OFFICIAL_NAME_SETS`, e.g.
``optimizer.wv_names = {}``, ``optimizer.embd_names.add("tok_emb")``). A tensor whose category
under the official rule (substring match on the lower-cased name: ``adam_block_names`` ->
elementwise, else ``wqk_names`` -> per head, else embd / output / wv / mlp / attn_proj -> per row,
else one block) differs from the one the default sets give is blocked as the official would block
it; the others keep the planner's blocks. Changes are applied at the first ``step()`` (or
``load_state_dict``); once there is state, a change raises an error.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .core import blocks
from .core.blocks import BlockLayout
from .optim import AdamMini
from .planning import BlockPlan, ParamBlocks

logger = logging.getLogger("adam_mini_tx")

OFFICIAL_NAME_SETS: dict[str, frozenset[str]] = {
    "embd_names": frozenset({"embed", "embd", "wte"}),
    "output_names": frozenset({"lm_head", "output", "final_layer"}),
    "wqk_names": frozenset({"k_proj", "q_proj", "wq", "wk", "query", "key"}),
    "wv_names": frozenset({"v_proj", "wv", "value"}),
    "attn_proj_names": frozenset({"o_proj", "wo", "attn.proj"}),
    "mlp_names": frozenset({"feed_forward", "linear", "mlp"}),
    "adam_block_names": frozenset({"bias"}),
}
"""The official 1.1.1 name sets and their defaults: fragments matched as substrings of the
lower-cased parameter name."""

_PER_ROW_SETS = ("embd_names", "output_names", "wv_names", "mlp_names", "attn_proj_names")
Knobs = dict[str, frozenset[str]]


def official_category(name: str, knobs: Mapping[str, Iterable[str]]) -> tuple[str, str]:
    """The official rule for one parameter: ``(category, why)``, category one of
    ``"elementwise"`` (adam_block_names), ``"heads"`` (wqk_names), ``"rows"`` (embd, output, wv,
    mlp, attn_proj names) or ``"whole"`` (anything else, e.g. norms), checked in that order."""
    lowered = name.lower()

    def hit(key: str) -> str | None:
        return next((f"{key} entry {frag!r}" for frag in sorted(knobs[key]) if frag in lowered),
                    None)

    for key, category in (("adam_block_names", "elementwise"), ("wqk_names", "heads")):
        why = hit(key)
        if why:
            return category, why
    for key in _PER_ROW_SETS:
        why = hit(key)
        if why:
            return "rows", why
    return "whole", "no name set matches"


class Adam_mini(AdamMini):  # noqa: N801 - the official package's name
    """Drop-in replacement for ``adam_mini.Adam_mini`` with the official signature (see the module
    docstring for what is kept and what is fixed). ``named_parameters``: ``(name, param)`` pairs,
    usually ``model.named_parameters()``, or named param groups. ``model``: optionally the module
    itself, to plan from its structure and config (as ``AdamMini(..., plan=model)``) where names
    alone cannot tell (convolutions, fused QKV rows of an unknown family). ``momentum_format``:
    ``m`` stored as ``"bfloat16"`` or ``"int8"`` (see :class:`~adam_mini_tx.AdamMini`)."""

    def __init__(self, named_parameters: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, model_sharding: bool | None = None,
                 dim: int = 2048, n_heads: int = 32, n_kv_heads: int | None = None,
                 verbose: bool = True, model: nn.Module | None = None,
                 momentum_format: str | None = None):
        if model_sharding is not None:
            warnings.warn("Adam_mini: model_sharding is deprecated (as in the official package) and "
                          "ignored: sharding is read from each DTensor parameter",
                          DeprecationWarning, stacklevel=2)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the model whose named_parameters are "
                            f"given), got {type(model).__name__}")
        super().__init__(_trainable(named_parameters), lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, plan=model, dim=dim, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, decay_mask="official",
                         momentum_format=momentum_format)
        self.verbose = verbose
        for key, default in OFFICIAL_NAME_SETS.items():
            setattr(self, key, set(default))
        self._base_plan = self.plan
        self._planned_knobs = self._knobs()
        # a step pre-hook, not a step() override: torch wraps each class's step() with its hooks,
        # so an override calling AdamMini.step would run the user's step hooks twice
        self.register_step_pre_hook(_replan_before_step)
        if verbose:
            self._log_plan()

    def _log_plan(self) -> None:
        logger.info("Adam-mini block plan:\n%s", self.plan)

    # ----- the official's name sets ------------------------------------------------------------
    def _knobs(self) -> Knobs:
        knobs = {}
        for key in OFFICIAL_NAME_SETS:
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or not all(
                    isinstance(fragment, str) for fragment in value):
                raise TypeError(f"Adam_mini.{key} must be a set of name fragments (str), got "
                                f"{value!r}; e.g. optimizer.{key} = {{'v_proj'}} or set()")
            knobs[key] = frozenset(value)
        return knobs

    def _replan_for_knobs(self) -> None:
        """Re-plan if a name set changed since the plan was made; an error once there is state."""
        knobs = self._knobs()
        if knobs == self._planned_knobs:
            return
        changed = [key for key in knobs if knobs[key] != self._planned_knobs[key]]
        if any(self.state.values()):
            raise RuntimeError(f"Adam_mini: {', '.join(changed)} changed after the optimizer "
                               f"made its state; the blocks (and the shapes of the state 'v') are "
                               f"fixed from then on. Set the name sets right after construction, "
                               f"before the first step, or restore them")
        self.plan = self.plan_for_name_sets(knobs)
        self._planned_knobs = knobs
        if self.verbose:
            logger.info("Adam-mini: %s changed; re-planned", ", ".join(changed))
            self._log_plan()

    def plan_for_name_sets(self, knobs: Mapping[str, Iterable[str]]) -> BlockPlan:
        """The plan under the name sets ``knobs``: a tensor whose official category (see
        :func:`official_category`) differs from its category under the defaults gets the
        official's blocks for the new category; the others keep the planner's blocks."""
        base = self._base_plan.merged(self.plan)
        entries = []
        for entry in base.values():
            category, why = official_category(entry.name, knobs)
            if category == official_category(entry.name, OFFICIAL_NAME_SETS)[0]:
                entries.append(entry)
                continue
            layout = self._official_layout(entry, category, why)
            entries.append(ParamBlocks(entry.name, entry.shape, layout, category, "rule",
                                       entry.dtype, f"official rule: {why}"))
        return BlockPlan(tuple(entries))

    def _official_layout(self, entry: ParamBlocks, category: str, why: str) -> BlockLayout:
        """The official's blocks for ``category``; heads are ``dim / n_heads`` rows (its blocks of
        ``dim * dim / n_heads`` elements, on a tensor with ``dim`` columns)."""
        shape = entry.shape
        if category == "elementwise":
            return blocks.elementwise(shape)
        if category == "whole":
            return blocks.single_block(shape)
        if len(shape) < 2:
            raise ValueError(f"parameter {entry.name!r} {shape} matches {why}, so the official "
                             f"rule blocks it per {'head' if category == 'heads' else 'row'}, "
                             f"which needs >= 2 dims (the official package fails at its first "
                             f"step): "
                             f"make the name fragment more specific")
        if category == "rows":
            return blocks.per_row(shape)
        dim, n_heads = self._plan_kwargs["dim"], self._plan_kwargs["n_heads"]
        head_rows = dim // n_heads if dim % n_heads == 0 else 0
        if not head_rows or shape[0] % head_rows:
            raise ValueError(f"parameter {entry.name!r} {shape} matches {why}, so the official "
                             f"rule cuts it into heads of dim / n_heads = {dim} / {n_heads} rows, "
                             f"which do not fit its {shape[0]} rows: pass dim= the model's hidden "
                             f"size")
        return blocks.per_head(shape, shape[0] // head_rows)

    def __getstate__(self) -> dict[str, Any]:
        extra = (*OFFICIAL_NAME_SETS, "_base_plan", "_planned_knobs", "verbose")
        return {**super().__getstate__(), **{key: getattr(self, key) for key in extra}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # step hooks are not pickled: register ours again
        self.register_step_pre_hook(_replan_before_step)

    # ----- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint of this class, or of the official package (converted by
        :meth:`convert_official_state_dict`)."""
        self._replan_for_knobs()
        if _is_official(state_dict):
            state_dict = self.convert_official_state_dict(state_dict)
        super().load_state_dict(state_dict)

    def convert_official_state_dict(self, official: Mapping[str, Any]) -> dict[str, Any]:
        """An official ``adam_mini.Adam_mini`` (1.1.1) ``state_dict()`` in this optimizer's format:
        its per-tensor groups (``beta1``, ``beta2``) become this optimizer's groups' ``lr``,
        ``betas``, ``eps``, ``weight_decay``; per tensor ``m`` -> ``m`` (reshaped to the
        parameter), ``vmean`` (or ``v`` of an elementwise block) -> ``v`` (reshaped to the plan's
        ``v_shape``), the int ``step`` -> a 0-d int64 tensor. Both must be built from the same
        ``named_parameters``; a ValueError names any tensor the two block differently."""
        groups = official["param_groups"]
        named = self._named_params()
        if len(groups) != len(named):
            raise ValueError(f"the official checkpoint holds {len(groups)} parameters (one param "
                             f"group each) but this optimizer has {len(named)}: build it from the "
                             f"same model.named_parameters() (frozen ones are left out by both)")
        converted = self.state_dict()
        ids = [index for group in converted["param_groups"] for index in group["params"]]
        state, differ = {}, []
        for (name, param), group, index in zip(named, groups, ids):
            if group.get("name") != name.lower():
                raise ValueError(f"the official checkpoint has {group.get('name')!r} where this "
                                 f"optimizer has {name!r}: give the parameters in the same order")
            slots = official["state"].get(group["params"][0])
            if slots:
                state[index], problem = self._slots_from_official(name, param, slots)
                differ += [problem] if problem else []
        if differ:
            raise ValueError(f"the official checkpoint's state cannot be carried over exactly: "
                             f"{len(differ)} tensor(s) are blocked differently: "
                             f"{'; '.join(differ[:5])}. Finish the run with the official package, "
                             f"or set the name sets (or rules) so both block them alike")
        hyper = _official_hyperparameters(groups)
        for group in converted["param_groups"]:
            group.update(hyper)
        converted["state"] = state
        return converted

    def _slots_from_official(self, name: str, param: torch.Tensor, slots: Mapping[str, Any]
                             ) -> tuple[dict[str, torch.Tensor] | None, str]:
        """One tensor's state in this optimizer's format, or None and why it cannot be."""
        mine = self.plan[name].layout
        v = slots["vmean"] if "vmean" in slots else slots["v"]
        category, why = official_category(name, self._planned_knobs)
        theirs = {"elementwise": lambda: blocks.elementwise(param.shape),
                  "whole": lambda: blocks.single_block(param.shape),
                  "rows": lambda: blocks.per_row(param.shape),
                  "heads": lambda: blocks.per_head(param.shape, v.numel())}[category]
        try:
            same = _cuts(theirs()) == _cuts(mine)
        except ValueError:  # the official's blocks are not whole rows (heads cut in pieces)
            same = False
        if not same or v.numel() != mine.num_blocks:
            return None, (f"{name!r} has {v.numel()} values there ({why}: {category}), "
                          f"{mine.num_blocks} here ({mine.pattern})")
        return {"step": torch.tensor(int(slots["step"]), dtype=torch.int64),
                "m": slots["m"].reshape(param.shape), "v": v.reshape(mine.v_shape)}, ""


def _replan_before_step(optimizer: Adam_mini, args: Any, kwargs: Any) -> None:
    """Step pre-hook: apply changed name sets before the step (an error once there is state)."""
    optimizer._replan_for_knobs()


def _cuts(layout: BlockLayout) -> tuple:
    """What a layout means for the state, without its printed pattern."""
    return layout.perm, layout.row_dims, layout.runs


def _is_official(state_dict: Any) -> bool:
    """An official adam-mini state dict: one param group per tensor with ``beta1`` / ``beta2``."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    return bool(groups) and all(isinstance(g, Mapping) and "beta1" in g for g in groups)


def _official_hyperparameters(groups: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One set of hyperparameters from the official per-tensor groups (they share lr, betas,
    eps; weight decay is 0 where its name rule says so, which ``decay_mask="official"`` keeps)."""
    hyper = {}
    for key in ("lr", "beta1", "beta2", "eps", "initial_lr"):
        values = {repr(g[key]) for g in groups if key in g}
        if len(values) > 1:
            raise ValueError(f"the official checkpoint's param groups have different {key} values "
                             f"({sorted(values)[:3]}): this optimizer keeps one {key}; load the "
                             f"groups' common value by hand")
        if values:
            hyper[key] = groups[0][key]
    decays = {g["weight_decay"] for g in groups} - {0.0}
    if len(decays) > 1:
        raise ValueError(f"the official checkpoint's param groups have different weight decays "
                         f"{sorted(decays)}: this optimizer keeps one")
    hyper["betas"] = (hyper.pop("beta1"), hyper.pop("beta2"))
    hyper["weight_decay"] = decays.pop() if decays else 0.0
    return hyper


def _trainable(named_parameters: Iterable[Any]) -> list[Any]:
    """The official package skips parameters with ``requires_grad=False``; so do we."""
    items = list(named_parameters)
    if items and all(isinstance(item, Mapping) for item in items):
        return [{**group, "params": _trainable(group["params"])} for group in items]
    return [item for item in items
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[1], torch.Tensor) and not item[1].requires_grad)]


__all__ = ["Adam_mini", "OFFICIAL_NAME_SETS", "official_category"]
