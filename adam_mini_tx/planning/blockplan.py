"""The block plan: which :class:`~adam_mini_tx.core.blocks.BlockLayout` every parameter got,
and why (role, source, note); printable as a table (``print(plan)``), serialisable
(``plan.to_dict()``), and the one warning about tensors placed by fallback.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..core.blocks import BlockLayout
from ..core.lowbits import group_count


@dataclass(frozen=True)
class ParamBlocks:
    """The plan for one parameter: its layout and why it was chosen."""

    name: str
    shape: tuple[int, ...]
    layout: BlockLayout
    role: str
    source: str  # "rule" (user), "structure" (module type/config), "name", or "fallback"
    dtype: torch.dtype = torch.float32
    note: str = ""  # for a fallback: what was assumed, and how to be sure

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def state_bytes(self) -> int:
        """Adam-mini state: ``m`` (one per element) plus ``v`` (one per block)."""
        return self.state_bytes_as(None)

    def state_bytes_as(self, momentum_format: str | None) -> int:
        """The state's bytes with ``m`` stored in ``momentum_format`` (None: the parameter's
        dtype; ``"int8"``: a byte per element and an fp32 scale per group of a row)."""
        per_element = {None: _itemsize(self.dtype), "float32": 4, "bfloat16": 2, "int8": 1}
        m = self.numel * per_element[momentum_format]
        if momentum_format == "int8":
            m += 4 * math.prod(self.shape[:-1]) * group_count(self.shape)
        return m + self.num_blocks * _itemsize(self.dtype)

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

    def fallback_lines(self) -> list[str]:
        """One line per tensor placed by fallback: its name, its blocks and what was assumed."""
        return [f"{e.name} {tuple(e.shape)}: {e.layout.pattern}, {e.num_blocks:,} blocks"
                + (f" ({e.note})" if e.note else "")
                for e in self.entries if e.source == "fallback"]

    @property
    def num_blocks(self) -> int:
        return sum(entry.num_blocks for entry in self.entries)

    @property
    def numel(self) -> int:
        return sum(entry.numel for entry in self.entries)

    @property
    def state_bytes(self) -> int:
        return sum(entry.state_bytes for entry in self.entries)

    def state_bytes_as(self, momentum_format: str | None) -> int:
        """Every parameter's :meth:`ParamBlocks.state_bytes_as`."""
        return sum(entry.state_bytes_as(momentum_format) for entry in self.entries)

    @property
    def adamw_state_bytes(self) -> int:
        return sum(entry.adamw_state_bytes for entry in self.entries)

    def table(self, momentum_format: str | None = None) -> str:
        """A text table: one row per parameter, then totals against AdamW (with ``m`` stored in
        ``momentum_format``, also against fp32 AdamW)."""
        header = ("name", "shape", "role", "layout", "blocks", "state")
        rows = [(e.name, "x".join(map(str, e.shape)) or "scalar", e.role, e.layout.pattern,
                 f"{e.num_blocks:,}", _bytes(e.state_bytes_as(momentum_format)))
                for e in self.entries]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
        state = self.state_bytes_as(momentum_format)
        ratio = state / self.adamw_state_bytes if self.adamw_state_bytes else 0.0
        out = [line(header), line(["-" * w for w in widths]), *map(line, rows), "",
               f"parameters: {self.numel:,} in {len(self)} tensors; second-moment values: "
               f"{self.num_blocks:,} (AdamW: {self.numel:,})",
               f"optimizer state: {_bytes(state)} vs AdamW {_bytes(self.adamw_state_bytes)}"
               f" ({ratio:.3f}x)"]
        if momentum_format is not None:
            fp32 = 8 * self.numel
            out.append(f"m stored as {momentum_format}: {state / fp32:.3f}x fp32 AdamW's state "
                       f"({_bytes(fp32)})")
        fallbacks = self.fallback_lines()
        if fallbacks:
            out.append("fallbacks (no structural match; check these):")
            out.extend(f"  {line}" for line in fallbacks)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping]) -> "BlockPlan":
        """Inverse of :meth:`to_dict` (entries keep their order); raises ValueError naming the
        parameter when an entry is malformed."""
        entries = []
        for name, entry in data.items():
            try:
                layout = BlockLayout(tuple(entry["shape"]), tuple(entry["perm"]),
                                     int(entry["row_dims"]),
                                     tuple(tuple(run) for run in entry["runs"]), entry["pattern"])
                entries.append(ParamBlocks(name, layout.shape, layout, entry["role"],
                                           entry["source"]))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"block plan entry for parameter {name!r} is malformed: "
                                 f"{error!r}") from None
        return cls(tuple(entries))

    def to_dict(self) -> dict:
        """A plain, checkpointable description: ``name -> {shape, pattern, runs, ...}``."""
        return {e.name: {"shape": list(e.shape), "role": e.role, "source": e.source,
                         "perm": list(e.layout.perm), "row_dims": e.layout.row_dims,
                         "runs": [list(run) for run in e.layout.runs], "pattern": e.layout.pattern}
                for e in self.entries}


def check_coverage(plan: Mapping[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every tensor has an entry in ``plan`` (a :class:`BlockPlan`, or ``name -> BlockLayout``)
    made for its shape; else a ValueError naming the parameter."""
    for name, tensor in tensors:
        if name not in plan:
            raise ValueError(f"parameter {name!r} is not covered by the block plan; build the plan "
                             f"from the same model (amx.plan_blocks(model)) or add a rule for it")
        if tuple(plan[name].shape) != tuple(tensor.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape)} but the block "
                             f"plan was made for {tuple(plan[name].shape)}; rebuild the plan")


def warn_fallbacks(plan: BlockPlan, stacklevel: int = 1) -> bool:
    """Issue one ``UserWarning`` listing ``plan.fallback_lines()``, if there are any; returns
    whether it warned. ``stacklevel`` counts from the caller of this function, as for
    ``warnings.warn`` (1: the line that called it)."""
    lines = plan.fallback_lines()
    if lines:
        warnings.warn(f"Adam-mini placed {len(lines)} parameter(s) by fallback; check their "
                      f"blocks, or plan from the model (plan=model to AdamMini, model= to "
                      f"Adam_mini) or add rules:\n  " + "\n  ".join(lines), UserWarning,
                      stacklevel=stacklevel + 1)
    return bool(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


__all__ = ["ParamBlocks", "BlockPlan", "check_coverage", "warn_fallbacks"]
