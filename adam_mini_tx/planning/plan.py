"""Block plans: which :class:`~adam_mini_tx.blocks.BlockLayout` every parameter gets.

The plan is computed once, before training, from names, shapes and (where available) the model's
structure; it is printable (``print(plan)``) and serialisable (``plan.to_dict()``).

Roles and their blocks (Adam-mini, section 3 of the paper):

========== ============================================ =================
role       examples                                     blocks
========== ============================================ =================
query/key  ``q_proj``, ``k_proj``, ``wq``, ``wk``         one per head (k: per KV head)
value      ``v_proj``, ``wv``                           one per output neuron
attn_out   ``o_proj``, ``wo``                           one per output neuron
mlp        ``gate_proj``, ``up_proj``, ``w1``            one per output neuron
embedding  ``embed_tokens``, ``wte``                    one per token (row)
output     ``lm_head``, ``output``                      one per token (row)
norm       ``input_layernorm``, ``ln_f``               one for the tensor
bias       ``*.bias``                                   one per element
========== ============================================ =================
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..core import blocks
from ..core.blocks import BlockLayout
from .blockplan import BlockPlan, ParamBlocks
from .registry import (CONV_HINTS, GPT2_NAMES, MHA_ATTRS, PER_GROUP, STACKED,
                       STACKED_QKV_NAMES, TRANSPOSED_CONV_HINTS, FusedQKV, ModelDims,
                       dims_from_config, fused_qkv_style, is_lora, module_components,
                       role_from_components)

LayoutSpec = Union[str, BlockLayout, Callable[[tuple[int, ...]], BlockLayout]]
Rules = Union[Mapping[str, LayoutSpec], Sequence[tuple[str, LayoutSpec]], None]
NamedTensors = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


# ----- planning ---------------------------------------------------------------------------------
def plan_blocks(model_or_named_params: NamedTensors, *, dim: int | None = None,
                n_heads: int | None = None, n_kv_heads: int | None = None,
                head_dim: int | None = None, rules: Rules = None) -> BlockPlan:
    """Plan the Adam-mini blocks of every trainable parameter.

    Precedence: user ``rules`` (glob or regex on the name -> layout spec) > module structure
    (``nn.Embedding``, ``nn.Linear``, HF ``Conv1D`` (in, out), ``nn.MultiheadAttention``, convs,
    norms, 3-D expert weights, LoRA adapters) with the model's config (heads, KV heads, head_dim,
    fused-QKV row order of its family) > name rules > one block per output row (>= 2-D) or one
    block (1-D). Fallbacks are listed in ``plan.fallbacks``. Explicit ``n_heads`` / ``n_kv_heads``
    / ``head_dim`` win over the config; ``dim`` is accepted for the official package's signature.
    A model on the meta device plans without allocating memory.
    """
    config = getattr(model_or_named_params, "config", None) \
        if isinstance(model_or_named_params, nn.Module) else None
    dims = _explicit_dims(dims_from_config(config), n_heads, n_kv_heads, head_dim)
    style, style_known = fused_qkv_style(config)
    matcher = _RuleMatcher(rules)
    items = _params_with_modules(model_or_named_params)
    conv1d = _gpt2_conv1d(items)
    entries = []
    for name, tensor, module in items:
        _check_plannable(name, tensor)
        shape = tuple(tensor.shape)
        spec = matcher.match(name)
        if spec is not None:
            role, layout, source, note = ("rule", _layout_from_spec(spec, name, shape, dims),
                                          "rule", "")
        else:
            role, layout, source, note = _plan_param(name, shape, module, dims, style,
                                                     style_known, conv1d)
        entries.append(ParamBlocks(name, shape, layout, role, source, tensor.dtype, note))
    matcher.warn_unused()
    return BlockPlan(tuple(entries))


def _check_plannable(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_complex():
        raise TypeError(f"parameter {name!r} is complex ({tensor.dtype}); Adam-mini's blocks are "
                        f"defined for real tensors: optimize torch.view_as_real(param) instead")
    if not tensor.is_floating_point():
        raise TypeError(f"parameter {name!r} has dtype {tensor.dtype}; only floating-point "
                        f"tensors can be optimized")
    if tensor.numel() == 0:
        raise ValueError(f"parameter {name!r} has no elements (shape {tuple(tensor.shape)}); "
                         f"leave it out of the optimizer")


def _explicit_dims(from_config: ModelDims, n_heads, n_kv_heads, head_dim) -> ModelDims:
    for arg, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"invalid {arg}={value!r}: pass a positive int, or None to read it "
                             f"from the model's config")
    if n_heads is not None and n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if n_heads is None and n_kv_heads is None and head_dim is None:
        return from_config
    heads = n_heads if n_heads is not None else from_config.n_heads
    kv = n_kv_heads if n_kv_heads is not None else (heads if n_heads is not None
                                                     else from_config.n_kv_heads)
    # explicit head counts: head_dim comes from the rows unless given (dim*dim/n_heads is wrong
    # whenever head_dim * n_heads != hidden size)
    width = head_dim if head_dim is not None else (None if n_heads is not None
                                                    else from_config.head_dim)
    return ModelDims(from_config.hidden, heads, kv, width)


def _params_with_modules(source: NamedTensors) -> list[tuple[str, torch.Tensor, nn.Module | None]]:
    """(name, tensor, owning module or None) for every trainable parameter, tied ones once."""
    if isinstance(source, nn.Module):
        seen, out = set(), []
        for module_name, module in source.named_modules():
            for attr, param in module.named_parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                out.append((f"{module_name}.{attr}" if module_name else attr, param, module))
        return out
    items = source.items() if isinstance(source, Mapping) else source
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"plan_blocks needs named parameters ((name, tensor) pairs, a dict or a "
                            f"module), got an item of type {type(item).__name__}; pass "
                            f"model.named_parameters() instead of model.parameters()")
        out.append((item[0], item[1], None))
    return out


def _is_norm_module(module: nn.Module | None) -> bool:
    return module is not None and "norm" in type(module).__name__.lower()


_PASS_MODEL = "pass plan=model to AdamMini (model= to Adam_mini) or a rule for it"


def _plan_param(name: str, shape: tuple[int, ...], module: nn.Module | None, dims: ModelDims,
                style: FusedQKV, style_known: bool, conv1d: bool | None
                ) -> tuple[str, BlockLayout, str, str]:
    """(role, layout, source, note) for one parameter from its module (None: names only), name
    and shape; ``note`` says what a fallback assumed."""
    components, attr = module_components(name)
    structural = "structure" if module is not None else "name"
    if len(shape) == 0:
        return "scalar", blocks.single_block(shape), structural, ""
    if is_lora(name):
        return "lora", blocks.per_row(shape), structural, ""
    if len(shape) == 1:
        if attr == "bias" or attr.endswith("_bias"):
            return "bias", blocks.elementwise(shape), structural, ""
        if _is_norm_module(module) or _looks_like_norm(components + [attr]):
            return "norm", blocks.single_block(shape), structural, ""
        return "vector", blocks.single_block(shape), "fallback", \
            "one block: its name is neither a norm's nor a bias's"
    if isinstance(module, nn.MultiheadAttention):
        return _multihead_attention(name, attr, shape, module.num_heads, "structure")
    if module is None and attr in MHA_ATTRS:
        return _multihead_attention(name, attr, shape, dims.n_heads, "name")
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", blocks.per_row(shape, axis=1 if module.transposed else 0), "structure", ""
    if isinstance(module, nn.Embedding):
        return "embedding", blocks.per_row(shape, row_dims=len(shape) - 1), "structure", ""
    path = components + ([attr] if attr not in ("weight", "bias") else [])
    role = role_from_components(path, len(shape))
    if role == "embedding":
        return role, blocks.per_row(shape, row_dims=len(shape) - 1), "name", ""
    if len(shape) >= 3:
        if any("expert" in c for c in path):
            return "experts", blocks.per_row(shape, row_dims=len(shape) - 1), structural, ""
        if module is None:
            return _conv_by_name(name, shape, path)
        return "experts", blocks.per_row(shape, row_dims=len(shape) - 1), "fallback", \
            "assumed stacked expert weights (experts, out, in): one block per expert and row"
    transposed, note = _transposed(shape, module, components, conv1d)
    source = "fallback" if note else structural
    if role in ("query", "key"):
        return role, _heads_layout(name, role, shape, dims, transposed), source, note
    if role == "qkv":
        if module is None or not style_known:  # no family known: the name may settle it
            style, guessed = _qkv_style_by_name(path[-1], dims)
            if guessed:
                source, note = "fallback", note or guessed + (
                    _PASS_MODEL if module is None else
                    "add the model's family to registry.FAMILIES or a rule for it")
            elif module is not None:
                source = "name"
        return role, _fused_qkv_layout(name, shape, dims, style, transposed), source, note
    if role is None:
        layout = blocks.per_row(shape, transposed=transposed)
        if module is None:
            return "linear", layout, "fallback", note or (
                f"no role known from its name: one block per row, as for an nn.Linear (out, in); "
                f"{_PASS_MODEL}")
        if not (isinstance(module, nn.Linear) or transposed):
            return "linear", layout, "fallback", "not an nn.Linear, and no role known from its " \
                "name: one block per row; add a rule if its rows are not output neurons"
        return "linear", layout, "structure", ""
    return role, blocks.per_row(shape, transposed=transposed), source, note


def _gpt2_conv1d(items: list[tuple[str, torch.Tensor, nn.Module | None]]) -> bool | None:
    """Names only: whether GPT-2-named weights (``c_attn``, ``c_fc``, ``c_proj``) are HF
    ``Conv1D`` (in, out) or ``nn.Linear`` (out, in). The fused ``c_attn`` tells: Conv1D (E, 3E)
    is wide, Linear (3E, E) or (E + 2 kv d, E) tall. Without a c_attn, separate query
    projections (StarCoder2's ``q_proj`` next to ``c_fc``) mean Linear: the Conv1D models fuse
    QKV. None when nothing says it (or the c_attn weights disagree)."""
    named = [(module_components(name)[0][-1:], tensor) for name, tensor, module in items
             if module is None and tensor.dim() == 2]
    votes = {tensor.shape[1] > tensor.shape[0] for last, tensor in named
             if last == ["c_attn"] and tensor.shape[0] != tensor.shape[1]}
    if not votes and any(role_from_components(last, 2) == "query" for last, _ in named):
        return False
    return votes.pop() if len(votes) == 1 else None


def _transposed(shape: tuple[int, ...], module: nn.Module | None, components: list[str],
                conv1d: bool | None) -> tuple[bool, str]:
    """Whether a 2-D weight is stored (in, out), and a note when that is a guess."""
    if module is not None:
        return type(module).__name__ == "Conv1D", ""
    if components[-1:] and components[-1] in GPT2_NAMES:
        if conv1d is None:
            return False, ("a GPT-2 name, but with no c_attn weight to show whether these are "
                           f"HF Conv1D (in, out) or nn.Linear (out, in); assumed (out, in): "
                           f"{_PASS_MODEL}")
        return conv1d, ""
    return False, ""


def _qkv_style_by_name(fused_name: str, dims: ModelDims) -> tuple[FusedQKV, str]:
    """The row order of a fused QKV weight from its name when the model's family is unknown:
    (style, "" or what a guess assumed).
    ``query_key_value`` is per head in GPT-NeoX / BLOOM / Falcon without GQA, stacked under
    multi-query (Falcon: one KV group), per KV group under GQA (Falcon's new architecture;
    ChatGLM stacks instead, hence a fallback there)."""
    if fused_name in STACKED_QKV_NAMES:
        return STACKED, ""
    if fused_name == "query_key_value":
        kv = dims.n_kv_heads or dims.n_heads
        if kv in (1, dims.n_heads):
            return PER_GROUP, ""
        return PER_GROUP, ("assumed Falcon's per-KV-group row order [q.. k v] (ChatGLM stacks "
                           "[q | k | v]): ")
    return STACKED, (f"the row order of a fused {fused_name!r} depends on the model family; "
                     f"assumed stacked [q | k | v]: ")


def _conv_by_name(name: str, shape: tuple[int, ...], path: list[str]
                  ) -> tuple[str, BlockLayout, str, str]:
    """Names only, a >= 3-D tensor that is no expert weight: a convolution, one block per output
    channel (axis 0; axis 1 for a transposed one, stored (in, out, ...)). A 3-D tensor with no
    hint in its name may as well be stacked expert weights: an error."""
    if any(hint in c for c in path for hint in TRANSPOSED_CONV_HINTS):
        return "conv", blocks.per_row(shape, axis=1), "name", ""
    if any(hint in c for c in path for hint in CONV_HINTS):
        return "conv", blocks.per_row(shape), "name", ""
    if len(shape) == 3:
        raise ValueError(f"parameter {name!r} has shape {shape}: a Conv1d weight (out, in, k), a "
                         f"ConvTranspose1d weight (in, out, k) or stacked expert weights (experts, "
                         f"out, in), and its name does not say which; {_PASS_MODEL}")
    return "conv", blocks.per_row(shape), "fallback", \
        f"assumed a convolution weight (out, in, ...): one block per output channel; a " \
        f"ConvTranspose weight (in, out, ...) is blocked by its axis 1: {_PASS_MODEL}"


def _looks_like_norm(components: list[str]) -> bool:
    return any("norm" in c or c == "ln" or c.startswith("ln_") for c in components)


def _heads_layout(name: str, role: str, shape: tuple[int, ...], dims: ModelDims,
                  transposed: bool) -> BlockLayout:
    rows = shape[1] if transposed else shape[0]
    heads = dims.heads_in(rows, role)
    which = "n_heads" if role == "query" else "n_kv_heads"
    if heads is None:
        raise ValueError(f"parameter {name!r} looks like a {role} projection, so it is blocked "
                         f"per head, but n_heads is unknown: pass n_heads= (and n_kv_heads= for "
                         f"grouped-query attention), a model with a config, or a plan rule")
    if rows % heads:
        raise ValueError(f"parameter {name!r}: {which}={heads} does not divide its {rows} output "
                         f"rows; check n_heads / n_kv_heads / head_dim")
    return blocks.per_head(shape, heads, transposed=transposed)


def _fused_qkv_layout(name: str, shape: tuple[int, ...], dims: ModelDims, style: FusedQKV,
                      transposed: bool) -> BlockLayout:
    """[q | k | v] rows in the family's order: q and k per head, v per output neuron."""
    rows = shape[1] if transposed else shape[0]
    heads, kv = dims.n_heads, dims.n_kv_heads or dims.n_heads
    if heads is None:
        raise ValueError(f"parameter {name!r} is a fused QKV projection; pass n_heads= (and "
                         f"n_kv_heads=) or plan from a model with a config")
    if rows % (heads + 2 * kv) or heads % kv:
        raise ValueError(f"parameter {name!r}: {rows} fused QKV rows do not fit n_heads={heads}, "
                         f"n_kv_heads={kv}; check the head counts")
    width = rows // (heads + 2 * kv)
    try:
        if style.style == "per_head":
            return blocks.fused_rows(shape, [("q", 1), ("k", 1), ("v", width)], repeat=heads,
                                     rows_per_segment=[width] * 3, transposed=transposed)
        if style.style == "per_group":
            per_group = heads // kv
            return blocks.fused_rows(shape, [("q", per_group), ("k", 1), ("v", width)], repeat=kv,
                                     rows_per_segment=[per_group * width, width, width],
                                     transposed=transposed)
        return blocks.fused_rows(shape, [("q", heads), ("k", kv), ("v", kv * width)],
                                 rows_per_segment=[heads * width, kv * width, kv * width],
                                 transposed=transposed)
    except ValueError as error:
        raise ValueError(f"parameter {name!r}: {error}") from None


def _multihead_attention(name: str, attr: str, shape: tuple[int, ...], heads: int | None,
                         source: str) -> tuple[str, BlockLayout, str, str]:
    """``nn.MultiheadAttention``'s own weights: ``in_proj_weight`` stacked [q | k | v] (3E, E) with
    q and k per head and v per row; separate ``q/k_proj_weight`` per head; the rest per row."""
    if attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight") and heads is None:
        raise ValueError(f"parameter {name!r} is an nn.MultiheadAttention projection, blocked per "
                         f"head, but n_heads is unknown: pass n_heads=, or plan=model to AdamMini "
                         f"(model= to Adam_mini)")
    try:
        if attr == "in_proj_weight":
            width = shape[0] // 3
            if 3 * width != shape[0]:
                raise ValueError(f"{shape[0]} rows are not 3 equal [q | k | v] segments")
            return "qkv", blocks.fused_rows(shape, [("q", heads), ("k", heads), ("v", width)],
                                            rows_per_segment=[width] * 3), source, ""
        if attr in ("q_proj_weight", "k_proj_weight"):
            return ("query" if attr[0] == "q" else "key"), blocks.per_head(shape, heads), \
                source, ""
    except ValueError as error:
        raise ValueError(f"parameter {name!r} (nn.MultiheadAttention, n_heads={heads}): "
                         f"{error}") from None
    return "value", blocks.per_row(shape), source, ""


# ----- user rules ---------------------------------------------------------------------------------
class _RuleMatcher:
    """Glob or regex patterns on parameter names -> layout specs; all matches must agree."""

    def __init__(self, rules: Rules):
        items = rules.items() if isinstance(rules, Mapping) else (rules or [])
        self.rules = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"rules must map name patterns (str) to layouts, got {item!r}")
            self.rules.append(item)
        self.used: set[str] = set()

    def match(self, name: str) -> LayoutSpec | None:
        hits = [(pattern, spec) for pattern, spec in self.rules if _matches(pattern, name)]
        self.used.update(pattern for pattern, _ in hits)
        if not hits:
            return None
        if any(spec != hits[0][1] for _, spec in hits[1:]):
            described = ", ".join(f"{pattern!r} -> {spec!r}" for pattern, spec in hits)
            raise ValueError(f"conflicting rules for parameter {name!r}: {described}; make the "
                             f"patterns disjoint")
        return hits[0][1]

    def warn_unused(self) -> None:
        unused = [pattern for pattern, _ in self.rules if pattern not in self.used]
        if unused:
            warnings.warn(f"block-plan rules matched no parameter: {unused}", stacklevel=3)


def _matches(pattern: str, name: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _layout_from_spec(spec: LayoutSpec, name: str, shape: tuple[int, ...],
                      dims: ModelDims) -> BlockLayout:
    try:
        if isinstance(spec, BlockLayout):
            layout = spec
        elif callable(spec):
            layout = spec(shape)
        elif spec in ("elementwise", "adam"):
            layout = blocks.elementwise(shape)
        elif spec in ("whole", "single", "norm"):
            layout = blocks.single_block(shape)
        elif spec in ("rows", "neuron", "token"):
            layout = blocks.per_row(shape)
        elif spec in ("columns", "transposed"):
            layout = blocks.per_row(shape, transposed=True)
        elif isinstance(spec, str) and spec.startswith("heads"):
            heads = int(spec.split(":", 1)[1]) if ":" in spec else None
            layout = (blocks.per_head(shape, heads) if heads else
                      _heads_layout(name, "query", shape, dims, transposed=False))
        else:
            raise ValueError(f"unknown layout {spec!r}; use 'elementwise', 'whole', 'rows', "
                             f"'columns', 'heads' or 'heads:N', a BlockLayout or a callable")
    except ValueError as error:
        if str(error).startswith("parameter"):
            raise
        raise ValueError(f"rule for parameter {name!r}: {error}") from None
    if tuple(layout.shape) != tuple(shape):
        raise ValueError(f"rule for parameter {name!r} gives a layout for shape {layout.shape}, "
                         f"but the parameter has shape {shape}")
    return layout
