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
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from . import blocks
from .blocks import BlockLayout

LayoutSpec = Union[str, BlockLayout, Callable[[tuple[int, ...]], BlockLayout]]
Rules = Union[Mapping[str, LayoutSpec], Sequence[tuple[str, LayoutSpec]], None]
NamedTensors = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class ParamBlocks:
    """The plan for one parameter: its layout and why it was chosen."""

    name: str
    shape: tuple[int, ...]
    layout: BlockLayout
    role: str
    source: str  # "rule" (user), "name", or "fallback"
    dtype: torch.dtype = torch.float32

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def state_bytes(self) -> int:
        """Adam-mini state: ``m`` (one per element) plus ``v`` (one per block)."""
        return (self.numel + self.num_blocks) * _itemsize(self.dtype)

    @property
    def adamw_state_bytes(self) -> int:
        return 2 * self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class BlockPlan(Mapping[str, ParamBlocks]):
    """An ordered mapping ``name -> ParamBlocks`` with a printable table."""

    entries: tuple[ParamBlocks, ...]
    _index: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {entry.name: entry for entry in self.entries})

    def __getitem__(self, name: str) -> ParamBlocks:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"parameter {name!r} is not in the block plan") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self.entries)

    def merged(self, other: "BlockPlan") -> "BlockPlan":
        """This plan followed by the entries of ``other`` it does not have yet."""
        return BlockPlan(self.entries + tuple(e for e in other.entries if e.name not in self))

    def layouts(self) -> dict[str, BlockLayout]:
        return {entry.name: entry.layout for entry in self.entries}

    @property
    def fallbacks(self) -> list[str]:
        return [entry.name for entry in self.entries if entry.source == "fallback"]

    @property
    def num_blocks(self) -> int:
        return sum(entry.num_blocks for entry in self.entries)

    @property
    def numel(self) -> int:
        return sum(entry.numel for entry in self.entries)

    @property
    def state_bytes(self) -> int:
        return sum(entry.state_bytes for entry in self.entries)

    @property
    def adamw_state_bytes(self) -> int:
        return sum(entry.adamw_state_bytes for entry in self.entries)

    def table(self) -> str:
        """A text table: one row per parameter, then totals against AdamW."""
        header = ("name", "shape", "role", "layout", "blocks", "state")
        rows = [(e.name, "x".join(map(str, e.shape)) or "scalar", e.role, e.layout.pattern,
                 f"{e.num_blocks:,}", _bytes(e.state_bytes)) for e in self.entries]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
        ratio = self.state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else 0.0
        out = [line(header), line(["-" * w for w in widths]), *map(line, rows), "",
               f"parameters: {self.numel:,} in {len(self)} tensors; second-moment values: "
               f"{self.num_blocks:,} (AdamW: {self.numel:,})",
               f"optimizer state: {_bytes(self.state_bytes)} vs AdamW {_bytes(self.adamw_state_bytes)}"
               f" ({ratio:.3f}x)"]
        if self.fallbacks:
            out.append(f"fallbacks (no structural match; check these): {', '.join(self.fallbacks)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """A plain, checkpointable description: ``name -> {shape, pattern, runs, ...}``."""
        return {e.name: {"shape": list(e.shape), "role": e.role, "source": e.source,
                         "perm": list(e.layout.perm), "row_dims": e.layout.row_dims,
                         "runs": [list(run) for run in e.layout.runs], "pattern": e.layout.pattern}
                for e in self.entries}


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ----- name rules (the official package's, made token-exact) ---------------------------------
_ROLE_NAMES = {
    "query": {"q_proj", "wq", "query", "q"},
    "key": {"k_proj", "wk", "key", "k"},
    "value": {"v_proj", "wv", "value", "v"},
    "attn_out": {"o_proj", "wo", "out_proj"},
    "embedding": {"embed_tokens", "tok_embeddings", "wte", "wpe", "embed", "embd",
                  "word_embeddings", "embeddings"},
    "output": {"lm_head", "output", "final_layer"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc"},
}
_MLP_CONTAINERS = {"mlp", "feed_forward", "ffn"}


def _module_and_attribute(name: str) -> tuple[list[str], str]:
    parts = name.lower().split(".")
    return parts[:-1], parts[-1]


def role_from_name(name: str, shape: tuple[int, ...]) -> str | None:
    """The role a parameter's name implies, matching whole name components (so ``network`` is
    not ``wo``), or None."""
    modules, attribute = _module_and_attribute(name)
    if attribute == "bias" or (attribute.endswith("bias") and len(shape) <= 1):
        return "bias"
    last = modules[-1] if modules else attribute
    if len(shape) <= 1 and (re.search(r"(^|_)(ln|norm|layernorm|rmsnorm)(_|\d|$)", last)
                            or "norm" in last):
        return "norm"
    for role, names in _ROLE_NAMES.items():
        if last in names:
            return role
    if any(module in _MLP_CONTAINERS for module in modules) and len(shape) >= 2:
        return "mlp"
    return None


def layout_for_role(role: str, name: str, shape: tuple[int, ...], *, n_heads: int | None,
                    n_kv_heads: int | None) -> BlockLayout:
    """The layout a role gets for a tensor of ``shape``."""
    if role == "bias":
        return blocks.elementwise(shape)
    if role == "norm" or len(shape) == 0:
        return blocks.single_block(shape)
    if role in ("query", "key"):
        heads = n_heads if role == "query" else (n_kv_heads or n_heads)
        which = "n_heads" if role == "query" else "n_kv_heads"
        if heads is None:
            raise ValueError(f"parameter {name!r} looks like a {role} projection, so it is blocked "
                             f"per head, but n_heads is unknown: pass n_heads= (and n_kv_heads= "
                             f"for grouped-query attention) or a plan")
        if shape[0] % heads:
            raise ValueError(f"parameter {name!r}: {which}={heads} does not divide its "
                             f"{shape[0]} output rows; check n_heads / n_kv_heads")
        return blocks.per_head(shape, heads)
    return blocks.per_row(shape)


def _layout_from_spec(spec: LayoutSpec, name: str, shape: tuple[int, ...], n_heads, n_kv_heads):
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
        heads = int(spec.split(":", 1)[1]) if ":" in spec else n_heads
        layout = layout_for_role("query", name, shape, n_heads=heads, n_kv_heads=None)
    else:
        raise ValueError(f"rule for parameter {name!r}: unknown layout {spec!r}; use 'elementwise', "
                         f"'whole', 'rows', 'columns', 'heads:N', a BlockLayout or a callable")
    if tuple(layout.shape) != tuple(shape):
        raise ValueError(f"rule for parameter {name!r} gives a layout for shape {layout.shape}, "
                         f"but the parameter has shape {shape}")
    return layout


def _match_rule(rules: Rules, name: str) -> LayoutSpec | None:
    items = rules.items() if isinstance(rules, Mapping) else (rules or [])
    for pattern, spec in items:
        if fnmatch.fnmatchcase(name, pattern) or (_is_regex(pattern) and re.fullmatch(pattern, name)):
            return spec
    return None


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


def _named_tensors(source: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        return [(n, p) for n, p in source.named_parameters() if p.requires_grad]
    items = source.items() if isinstance(source, Mapping) else source
    named = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"plan_blocks needs named parameters ((name, tensor) pairs, a dict or a "
                            f"module), got an item of type {type(item).__name__}; pass "
                            f"model.named_parameters() instead of model.parameters()")
        named.append(item)
    return named


def plan_blocks(model_or_named_params: NamedTensors, *, dim: int | None = None,
                n_heads: int | None = None, n_kv_heads: int | None = None,
                rules: Rules = None) -> BlockPlan:
    """Plan the Adam-mini blocks of every parameter.

    User ``rules`` (glob or regex on the name -> layout spec) win; then the name's role; anything
    unmatched falls back to one block per output row (>= 2-D) or one block (1-D), and is listed
    in ``plan.fallbacks``. ``dim`` is accepted for the official package's signature.
    """
    if n_heads is not None and n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    entries = []
    for name, tensor in _named_tensors(model_or_named_params):
        shape = tuple(tensor.shape)
        spec = _match_rule(rules, name)
        if spec is not None:
            layout = _layout_from_spec(spec, name, shape, n_heads, n_kv_heads)
            role, source = "rule", "rule"
        else:
            role = role_from_name(name, shape)
            source = "name"
            if role is None:
                role, source = ("mlp" if len(shape) >= 2 else "norm"), "fallback"
            layout = layout_for_role(role, name, shape, n_heads=n_heads, n_kv_heads=n_kv_heads)
        entries.append(ParamBlocks(name, shape, layout, role, source, tensor.dtype))
    return BlockPlan(tuple(entries))
