"""Block layouts: how one parameter tensor is cut into Adam-mini blocks.

A layout is a small static value. It views a tensor as *rows × features*:

1. ``perm`` moves the axes that index rows to the front (``(1, 0)`` for an HF ``Conv1D`` weight
   stored as (in, out), so that its rows are output neurons);
2. the first ``row_dims`` axes of the permuted tensor index rows, every later axis is a feature;
3. ``runs`` groups consecutive rows into blocks: ``((L1, n1), (L2, n2), ...)`` means ``n1`` blocks
   of ``L1`` rows each, then ``n2`` blocks of ``L2`` rows, and so on.

The statistic of block ``b`` is ``mean_{rows r in b, features j} g[r, j]**2``. Every Adam-mini
partition is of this form: per head (runs of ``head_dim`` rows), per output neuron or token (runs of
one row), fused QKV (one run per segment), interleaved QKV (runs repeated per head), 3-D experts
(``row_dims=2``), elementwise (``row_dims = ndim``) and one block (``row_dims = 0``).

Transforms never look inside a layout: they call :meth:`BlockLayout.mean_square` to reduce and
:meth:`BlockLayout.expand` to broadcast a per-block value back over the tensor (a zero-copy view).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

Shape = tuple[int, ...]
Runs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` is partitioned into blocks (see the module docstring)."""

    shape: Shape
    perm: Shape
    row_dims: int
    runs: Runs
    pattern: str

    def __post_init__(self) -> None:
        if sorted(self.perm) != list(range(len(self.shape))):
            raise ValueError(f"layout {self.pattern!r}: perm {self.perm} is not a permutation of "
                             f"the axes of shape {self.shape}")
        if not 0 <= self.row_dims <= len(self.shape):
            raise ValueError(f"layout {self.pattern!r}: row_dims={self.row_dims} outside "
                             f"[0, {len(self.shape)}] for shape {self.shape}")
        self._cache_geometry()
        covered = sum(length * count for length, count in self.runs)
        if covered != self.num_rows or any(length < 1 or count < 0 for length, count in self.runs):
            raise ValueError(f"layout {self.pattern!r}: runs {self.runs} cover {covered} rows, but "
                             f"shape {self.shape} has {self.num_rows} rows")

    # ----- static geometry -------------------------------------------------------------------
    def _cache_geometry(self) -> None:
        """Compute the derived shapes once (an eager step reads them for every tensor; plain
        attributes, which ``torch.compile`` reads for free). Not dataclass fields: equality,
        hashing and ``repr`` stay those of the five fields."""
        ndim = len(self.shape)
        permuted = tuple(self.shape[axis] for axis in self.perm)
        one_row_per_block = all(length == 1 for length, count in self.runs if count)
        row_shape = permuted[: self.row_dims]
        derived = dict(
            _permuted_shape=permuted, _row_shape=row_shape,
            _row_numel=math.prod(permuted[self.row_dims:]), _one_row_per_block=one_row_per_block,
            _v_shape=row_shape if one_row_per_block else (sum(c for _, c in self.runs),),
            _identity=self.perm == tuple(range(ndim)),
            _inverse=tuple(sorted(range(ndim), key=lambda axis: self.perm[axis])),
            _expanded_row_shape=row_shape + (1,) * (ndim - self.row_dims))
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def permuted_shape(self) -> Shape:
        return self._permuted_shape

    @property
    def row_shape(self) -> Shape:
        return self._row_shape

    @property
    def num_rows(self) -> int:
        return math.prod(self.row_shape)

    @property
    def row_numel(self) -> int:
        """Elements per row (features)."""
        return self._row_numel

    @property
    def num_blocks(self) -> int:
        return sum(count for _, count in self.runs)

    @property
    def one_row_per_block(self) -> bool:
        return self._one_row_per_block

    @property
    def v_shape(self) -> Shape:
        """Shape of the second-moment state: the row shape when each row is a block, else flat."""
        return self._v_shape

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Number of elements in each block, in block order."""
        return tuple(size for length, count in self.runs for size in [length * self.row_numel] * count)

    # ----- tensor maps -----------------------------------------------------------------------
    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._identity else x.permute(self.perm)

    def row_sums_of_squares(self, g: torch.Tensor,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
        """``sum_j g[r, j]**2`` for every row ``r``; shape ``row_shape``. Accumulated in
        :func:`accumulation_dtype` of ``g``'s dtype and ``dtype`` (at least fp32: fp16 rows of a
        few thousand elements overflow fp16)."""
        wide = accumulation_dtype(g.dtype, dtype)
        x = self._permute(g)
        feature_axes = tuple(range(self.row_dims, x.dim()))
        if not feature_axes:
            x = x if x.dtype == wide else x.to(wide)
            return x * x
        # one read of g and no full-size temporary (vector_norm's gradient at 0 is 0, not NaN)
        return torch.linalg.vector_norm(x, dim=feature_axes,
                                        dtype=None if x.dtype == wide else wide).square()

    def blocks_from_row_sums(self, row_sums: torch.Tensor) -> torch.Tensor:
        """Per-row sums of squares -> per-block mean squares, shape ``v_shape``."""
        if self.one_row_per_block:
            return row_sums / self.row_numel
        # blocks may span shards (a head across two ranks): gather the small per-row vector
        flat = replicated(row_sums).reshape(-1)
        pieces, offset = [], 0
        for length, count in self.runs:
            span = flat[offset: offset + length * count]
            pieces.append(span.reshape(count, length).sum(dim=1) / (length * self.row_numel))
            offset += length * count
        return torch.cat(pieces)

    def mean_square(self, g: torch.Tensor) -> torch.Tensor:
        """``v_b = mean_{i in b} g_i**2`` for every block ``b``; shape ``v_shape``."""
        return self.blocks_from_row_sums(self.row_sums_of_squares(g))

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-block tensor (shape ``v_shape``) to a view that broadcasts against the
        parameter: block ``b``'s value lands on every element of ``b``. No full-size copy."""
        if self.one_row_per_block:
            per_row = per_block
        else:
            per_row = torch.cat([piece.repeat_interleave(length) for piece, (length, _) in
                                 zip(per_block.split([count for _, count in self.runs]), self.runs)])
        per_row = per_row.reshape(self._expanded_row_shape)
        return per_row if self._identity else per_row.permute(self._inverse)


def accumulation_dtype(*dtypes: torch.dtype | None) -> torch.dtype:
    """The dtype statistics are summed in: the widest of ``dtypes`` and fp32."""
    wide = torch.float32
    for dtype in dtypes:
        if dtype is not None:
            wide = torch.promote_types(wide, dtype)
    return wide


def is_dtensor(x: torch.Tensor) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed.tensor at start-up)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: x is no DTensor
    return dtensor is not None and isinstance(x, dtensor.DTensor)


def replicated(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or for a sharded DTensor the same values replicated over its own mesh (an
    all-gather of a per-row or per-block vector, never of a full parameter)."""
    if not is_dtensor(x) or all(p.is_replicate() for p in x.placements):
        return x
    dtensor = sys.modules["torch.distributed.tensor"]
    return x.redistribute(x.device_mesh, [dtensor.Replicate()] * x.device_mesh.ndim)


# ----- constructors ---------------------------------------------------------------------------
def _shape(shape: Sequence[int] | torch.Size) -> Shape:
    return tuple(int(size) for size in shape)


def _identity(ndim: int) -> Shape:
    return tuple(range(ndim))


def elementwise(shape: Sequence[int]) -> BlockLayout:
    """Every element its own block: plain Adam (biases, or anything you want Adam on)."""
    shape = _shape(shape)
    rows = math.prod(shape)
    return BlockLayout(shape, _identity(len(shape)), len(shape), ((1, rows),), "elementwise")


def single_block(shape: Sequence[int]) -> BlockLayout:
    """The whole tensor is one block (norm weights)."""
    shape = _shape(shape)
    return BlockLayout(shape, _identity(len(shape)), 0, ((1, 1),), "whole tensor")


def per_row(shape: Sequence[int], *, row_dims: int = 1, transposed: bool = False,
            axis: int = 0) -> BlockLayout:
    """One block per row: an output neuron of a (out, in) weight, a token of an embedding, an
    output channel of a conv, an (expert, neuron) pair of a 3-D expert weight (``row_dims=2``).
    ``transposed=True`` reads a 2-D (in, out) weight (HF ``Conv1D``) by its columns; ``axis``
    names the row axis in general (1 for a ``ConvTranspose`` weight (in, out, ...))."""
    shape = _shape(shape)
    if transposed:
        _require_2d(shape, "a transposed (in, out) layout")
        axis = 1
    if not 0 <= axis < max(len(shape), 1):
        raise ValueError(f"row axis {axis} is out of range for shape {shape}")
    if axis:
        perm = (axis, *[a for a in range(len(shape)) if a != axis])
        axes = _axes(len(shape)).split()
        axes[0], axes[axis] = axes[axis], axes[0]
        return BlockLayout(shape, perm, 1, ((1, shape[axis]),), f"{' '.join(axes)} -> {axes[axis]}"
                           if not transposed else "i o -> o")
    layout = BlockLayout(shape, _identity(len(shape)), row_dims,
                         ((1, math.prod(shape[:row_dims])),), "")
    return _with_pattern(layout, _row_pattern(len(shape), row_dims))


def per_head(shape: Sequence[int], n_heads: int, *, transposed: bool = False) -> BlockLayout:
    """One block per attention head: rows (output features) are ``n_heads`` runs of
    ``head_dim = rows / n_heads`` (query / key weights and their heads-major biases)."""
    return fused_rows(shape, [("h", n_heads)], transposed=transposed)


def fused_rows(shape: Sequence[int], segments: Sequence[tuple[str, int]], *,
               transposed: bool = False, rows_per_segment: Sequence[int] | None = None,
               repeat: int = 1) -> BlockLayout:
    """Rows stacked as consecutive segments, each cut into ``n`` equal blocks: ``("h", n_heads)``
    for heads, ``("o", rows)`` for one block per row.

    Stacked ``[q | k | v]``: one pass over the segments. Interleaved layouts repeat the segment
    pattern ``repeat`` times: per head ``[q_h k_h v_h]`` (GPT-NeoX, BLOOM) or per KV group
    ``[q_g1..q_gn k_g v_g]`` (Falcon). ``rows_per_segment`` gives each segment's rows within one
    repetition; by default the rows are split evenly."""
    shape = _shape(shape)
    if transposed:
        _require_2d(shape, "a transposed (in, out) layout")
    perm = (1, 0) if transposed else _identity(len(shape))
    num_rows = shape[perm[0]] if shape else 1
    if repeat < 1 or num_rows % repeat:
        raise ValueError(f"{num_rows} rows cannot be split into {repeat} equal repetitions "
                         f"(check n_heads / n_kv_heads)")
    rows_per_repeat = num_rows // repeat
    if rows_per_segment is None:
        if rows_per_repeat % len(segments):
            raise ValueError(f"{rows_per_repeat} rows cannot be split evenly into {len(segments)} "
                             f"segments")
        rows_per_segment = [rows_per_repeat // len(segments)] * len(segments)
    if sum(rows_per_segment) != rows_per_repeat:
        raise ValueError(f"segments cover {sum(rows_per_segment)} rows, but each repetition has "
                         f"{rows_per_repeat} (check n_heads / n_kv_heads / head_dim)")
    runs, labels = [], []
    for (label, count), rows in zip(segments, rows_per_segment):
        if count <= 0 or rows % count:
            raise ValueError(f"segment {label!r}: {rows} rows cannot be split into {count} equal "
                             f"blocks (check n_heads / n_kv_heads)")
        runs.append((rows // count, count))
        labels.append(f"{label}={count}" if rows // count > 1 else f"{label}={count} rows")
    inner = "i o" if transposed else _axes(len(shape))
    if len(runs) == 1 and runs[0][0] > 1 and repeat == 1:
        rest = " ".join(_axes(len(shape)).split()[1:])
        pattern = ("i (h d) -> h" if transposed else f"(h d) {rest} -> h".replace("  ", " ")) + \
            f" [h={runs[0][1]}]"
    else:
        pattern = f"{inner} -> [{' | '.join(labels)}]" + (f" x{repeat}" if repeat > 1 else "")
    return BlockLayout(shape, perm, 1 if shape else 0, tuple(runs) * repeat, pattern)


def _require_2d(shape: Shape, what: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got shape {shape}")


def _axes(ndim: int) -> str:
    return " ".join(["o", "i", "k", "l", "m", "n"][:ndim]) if ndim <= 6 else f"<{ndim}-D>"


def _row_pattern(ndim: int, row_dims: int) -> str:
    if ndim == 3 and row_dims == 2:
        return "e o i -> e o"
    axes = _axes(ndim).split()
    return f"{' '.join(axes)} -> {' '.join(axes[:row_dims])}"


def _with_pattern(layout: BlockLayout, pattern: str) -> BlockLayout:
    return BlockLayout(layout.shape, layout.perm, layout.row_dims, layout.runs, pattern)
