"""Parameters cut into flat 1-D partitions (DeepSpeed ZeRO), seen as pieces with block layouts.

A flat partition holds *fragments*: elements ``[start, start + numel)`` of a parameter's
row-major flattening, at ``offset`` in the partition. A fragment may begin or end inside a row,
a head or any block. It is cut into *pieces*, each a 2-D view of the partition (1-D for a 1-D
parameter) holding the layout rows ``[r0, r1)`` of the parameter, whole or in part:

    the end of a row  |  whole rows (in pieces of at most PIECE_ELEMENTS)  |  the start of a row

Each piece gets its own :class:`~adam_mini_tx.core.blocks.BlockLayout`: the parameter's blocks
clipped to the piece's rows, so a block cut by the partition is a shorter block of the piece.
The chain runs on the pieces unchanged, with the statistics of the *whole* blocks given as row
sums: every rank sums ``g*g`` per row over its pieces, the per-row sums of every parameter of the
partition's group are summed over the ranks (one all-reduce of ``O(rows)`` values), and a piece
row ``r`` gets ``mean_{block(r)} * row_numel(piece)``, so that the piece's block mean is the whole
block's mean. Layout rows are contiguous runs of the flattening for an unpermuted layout; a 2-D
transposed layout (an HF ``Conv1D`` weight) has them across the flattening, and is cut along its
stored rows. Other permuted layouts are refused.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ..core.blocks import BlockLayout, Runs, accumulation_dtype


class Fragment(NamedTuple):
    """Elements ``[start, start + numel)`` of parameter ``name`` (row-major flattening), stored at
    ``offset`` in a flat partition."""

    name: str
    start: int
    offset: int
    numel: int


class Piece(NamedTuple):
    """A view of a flat partition that the chain sees as one parameter (see the module
    docstring)."""

    name: str  # "<parameter>[first element:end]", unique in the partition
    param_name: str
    offset: int  # first element in the partition
    shape: tuple[int, ...]  # the view's shape
    rows: slice  # the parameter's layout rows it holds, whole or in part
    layout: BlockLayout  # the parameter's blocks clipped to those rows
    v: slice  # its blocks' entries in the partition's v
    whole: bool  # its rows are whole rows, its blocks whole blocks of the parameter


PieceSums = Callable[[Sequence[tuple[str, torch.Tensor, BlockLayout]]], Sequence[torch.Tensor]]
"""Row sums of squares of pieces, ``(name, gradient view, layout)`` each: flat, one per row."""


class FlatPartition(NamedTuple):
    """A flat partition's pieces and what its statistics are summed over."""

    name: str  # the optimizer member's name
    params: tuple[tuple[str, BlockLayout], ...]  # every parameter whose rows are all-reduced
    pieces: tuple[Piece, ...]
    v_numel: int
    process_group: Any  # the ranks sharing the partitioned parameters (None: this rank alone)

    def row_sums(self, grad: torch.Tensor, dtype: torch.dtype,
                 sums_of: PieceSums | None = None,
                 grad_views: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-row sums of squares of every parameter in ``params`` (concatenated, in order),
        over all ranks: ``sum_j g[r, j]**2``; accumulated in at least fp32. ``sums_of``: the
        pieces' own row sums in one call (a kernel's statistics pass), given ``(name, view,
        layout)`` per piece; None: each piece's ``row_sums_of_squares``. ``grad_views``: the
        pieces' views of ``grad`` where already made (:meth:`views`)."""
        total = torch.zeros(self._row_offsets()[-1],
                            dtype=accumulation_dtype(grad.dtype, dtype), device=grad.device)
        grad_views = self.views(grad) if grad_views is None else grad_views
        views = [(piece.name, grad_views[piece.name], piece.layout) for piece in self.pieces]
        sums = (sums_of(views) if sums_of is not None
                else [layout.row_sums_of_squares(view, total.dtype).reshape(-1)
                      for _, view, layout in views])
        for rows, piece_sums in zip(self._rows_in_total(), sums):
            total[rows] += piece_sums
        if self.shared:
            torch.distributed.all_reduce(total, group=self.process_group)
        return total

    @property
    def shared(self) -> bool:
        """Whether other ranks hold parts of these parameters (the statistics are all-reduced)."""
        return self.process_group is not None and \
            torch.distributed.get_world_size(self.process_group) > 1

    @property
    def self_contained(self) -> bool:
        """Whether each piece's own ``g*g`` gives its blocks' statistics: every piece is
        :attr:`Piece.whole` and no other rank shares the parameters."""
        return not self.shared and all(piece.whole for piece in self.pieces)

    def piece_row_sums(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """Given :meth:`row_sums`, each piece's row sums that make its block means the whole
        blocks' means: a whole piece's rows' own sums; otherwise ``mean_{block(r)} *
        row_numel(piece)`` for its row ``r``."""
        offsets = self._row_offsets()
        cut = {piece.param_name for piece in self.pieces if not piece.whole}
        per_row = {}
        for (name, layout), first, end in zip(self.params, offsets, offsets[1:]):
            if name in cut:
                means = layout.blocks_from_row_sums(total[first:end].reshape(layout.row_shape))
                per_row[name] = layout.expand(means).reshape(-1)
        return {piece.name: (total[rows] if piece.whole else
                             per_row[piece.param_name][piece.rows] * piece.layout.row_numel
                             ).view(piece.layout.row_shape)
                for piece, rows in zip(self.pieces, self._rows_in_total())}

    def views(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every piece's view of a partition-sized tensor (the partition, its gradient, ``m``)."""
        return {piece.name: _view(tensor, piece) for piece in self.pieces}

    def v_views(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every piece's view of the partition's ``v`` (shape ``(v_numel,)``)."""
        return {piece.name: v[piece.v].view(piece.layout.v_shape) for piece in self.pieces}

    def _rows_in_total(self) -> list[slice]:
        """Each piece's rows in :meth:`row_sums`' result."""
        starts = dict(zip((name for name, _ in self.params), self._row_offsets()))
        return [slice(starts[piece.param_name] + piece.rows.start,
                      starts[piece.param_name] + piece.rows.stop) for piece in self.pieces]

    def _row_offsets(self) -> list[int]:
        offsets = [0]
        for _, layout in self.params:
            offsets.append(offsets[-1] + layout.num_rows)
        return offsets


PIECE_ELEMENTS = 2**20
"""At most this many elements in a piece of whole rows (more rows are more pieces), and in the
pieces of one chain call: the step's temporaries stay small whatever the partition's size."""


def flat_partition(name: str, fragments: Sequence[Fragment],
                   params: Sequence[tuple[str, BlockLayout]], process_group: Any,
                   piece_elements: int = PIECE_ELEMENTS) -> FlatPartition:
    """The partition ``name`` holding ``fragments`` of ``params`` (every parameter whose
    statistics its ranks sum, in the same order on every rank); made once per arguments (a
    step reads the same partitions again)."""
    return _flat_partition(name, tuple(fragments), tuple(params), process_group, piece_elements)


@functools.lru_cache(maxsize=1024)
def _flat_partition(name: str, fragments: tuple[Fragment, ...],
                    params: tuple[tuple[str, BlockLayout], ...], process_group: Any,
                    piece_elements: int) -> FlatPartition:
    layouts = dict(params)
    pieces: list[Piece] = []
    v_numel = 0
    for fragment in fragments:
        for offset, shape, rows in _cuts(fragment, layouts[fragment.name], piece_elements):
            layout = _piece_layout(layouts[fragment.name], shape, rows.start, rows.stop)
            first = fragment.start + offset - fragment.offset
            pieces.append(Piece(f"{fragment.name}[{first}:{first + _numel(shape)}]",
                                fragment.name, offset, shape, rows, layout,
                                slice(v_numel, v_numel + layout.num_blocks),
                                _whole(layouts[fragment.name], shape, rows)))
            v_numel += layout.num_blocks
    return FlatPartition(name, params, tuple(pieces), v_numel, process_group)


def _whole(layout: BlockLayout, shape: tuple[int, ...], rows: slice) -> bool:
    """Whether a piece of ``shape`` holding ``layout``'s rows ``rows`` holds them whole, and
    whole blocks: it starts and ends on block edges."""
    return (_numel(shape) == (rows.stop - rows.start) * layout.row_numel
            and _on_edge(layout.runs, rows.start) and _on_edge(layout.runs, rows.stop))


def _on_edge(runs: Runs, row: int) -> bool:
    """Whether ``row`` is where a block of ``runs`` starts (or the end of the last)."""
    start = 0
    for length, count in runs:
        if start <= row <= start + length * count and (row - start) % length == 0:
            return True
        start += length * count
    return row == 0


def _numel(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[1] if len(shape) > 1 else 1)


def _view(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    return tensor.narrow(0, piece.offset, _numel(piece.shape)).view(piece.shape)


def _cuts(fragment: Fragment, layout: BlockLayout, piece_elements: int
          ) -> list[tuple[int, tuple[int, ...], slice]]:
    """``(offset in the partition, view shape, layout rows)`` of the fragment's pieces."""
    if layout.perm == tuple(range(len(layout.shape))):
        width, transposed = layout.row_numel, False  # a row: `width` consecutive elements
    elif len(layout.shape) == 2 and layout.perm == (1, 0):
        width, transposed = layout.shape[1], True  # a stored row crosses every layout row
    else:
        raise NotImplementedError(
            f"parameter {fragment.name!r}: its block layout {layout.pattern!r} permutes the axes "
            f"{layout.perm}; flat (DeepSpeed ZeRO) partitions support unpermuted layouts and 2-D "
            f"transposed ones: use FSDP2 for this model, or a plan rule that keeps the axes")
    start, end = fragment.start, fragment.start + fragment.numel
    cuts, position = [], start
    while position < end:
        row, column = divmod(position, width)
        if column or end - position < width:  # part of one stored row
            stop = min(end, (row + 1) * width)
            count, shape = 1, (1, stop - position)
        else:  # whole stored rows
            count = min((end - position) // width, max(1, piece_elements // width))
            stop, shape = position + count * width, (count, width)
        rows = slice(column, column + shape[1]) if transposed else slice(row, row + count)
        if len(layout.shape) < 2:
            shape = (_numel(shape),)
        cuts.append((fragment.offset + position - start, shape, rows))
        position = stop
    return cuts


@functools.lru_cache(maxsize=2**16)  # every piece of a large model, rebuilt at each step
def _piece_layout(layout: BlockLayout, shape: tuple[int, ...], r0: int, r1: int) -> BlockLayout:
    """``layout``'s blocks clipped to its rows ``[r0, r1)``, over a view of ``shape``."""
    runs = _clipped(layout.runs, r0, r1)
    if len(shape) == 1 and layout.row_dims == 0:  # one block (a norm weight): no row axis
        return BlockLayout(shape, (0,), 0, ((1, 1),), layout.pattern)
    perm = (1, 0) if layout.perm == (1, 0) else tuple(range(len(shape)))
    return BlockLayout(shape, perm, 1, runs, layout.pattern)


def _clipped(runs: Runs, r0: int, r1: int) -> Runs:
    """The blocks of ``runs`` that meet rows ``[r0, r1)``, cut to those rows."""
    clipped: list[tuple[int, int]] = []
    row = 0
    for length, count in runs:
        end = row + length * count
        low, high = max(r0, row), min(r1, end)
        if low < high:
            first, last = (low - row) // length, (high - 1 - row) // length
            if first == last:
                clipped.append((high - low, 1))
            else:
                clipped.append((row + (first + 1) * length - low, 1))
                if last - first > 1:
                    clipped.append((length, last - first - 1))
                clipped.append((high - row - last * length, 1))
        row = end
    merged: list[tuple[int, int]] = []
    for length, count in clipped:
        if merged and merged[-1][0] == length:
            merged[-1] = (length, merged[-1][1] + count)
        else:
            merged.append((length, count))
    return tuple(merged)


__all__ = ["PIECE_ELEMENTS", "Fragment", "Piece", "FlatPartition", "flat_partition"]
