"""How a single-pass kernel cuts one parameter into tiles: runs of whole blocks that are also
runs of whole *segments*, so that one program owns every element it reads or writes.

A segment is a piece of one line of the tensor's last axis: each line of ``last`` elements is cut
into ``G`` segments of ``size`` elements (the last one shorter), ``G = ceil(last / cap)`` and
``size = ceil(last / G)``. With ``cap = 256`` these are exactly the int8 groups of
:mod:`adam_mini_tx.core.lowbits` (one fp32 scale each), so a tile holds whole groups.

Rows are the spec's rows (:mod:`.spec`): for ``columns=False`` row ``r`` is the flat elements
``[r*row_numel, (r+1)*row_numel)``; for ``columns=True`` it is column ``r`` of an ``(in, out)``
tensor. A row index ``r`` may end a tile when a block starts there and, in units of the last axis
(``r*row_numel`` flat elements, or column ``r``), it is a multiple of ``size`` within its line.
Consecutive such pieces are merged until a tile holds about :data:`TARGET` elements.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..core.lowbits import GROUP

TARGET = 16384
"""Elements a tile grows to (whole pieces merged): small enough that its gradient, parameter and
first moment stay in the L2 cache between the statistic and the update."""

COLUMN_CAP = 32
"""Segment length of a transposed parameter whose ``m`` is not int8: 32 columns, 128 bytes of
fp32 per line, so that tiles are narrow (many programs) and loads still coalesce."""


class Segments(NamedTuple):
    last: int  # elements per line (the last axis; 1 for a 0-d tensor)
    count: int  # G, segments per line
    size: int  # elements per segment (the last one of a line may be shorter)


class Tiling(NamedTuple):
    tiles: torch.Tensor  # (T, 7) int64: row0, row1, block0, block1, segment0, segments, max rows per block
    block_rows: torch.Tensor  # (blocks + 1,) int64: the first row of each block, then the row count
    segments: Segments
    max_rows: int  # most rows in one tile
    max_blocks: int  # most blocks in one tile
    max_segments: int  # most segments in one tile


def segments(shape: tuple[int, ...], cap: int) -> Segments:
    """The segments of a tensor of ``shape`` with at most ``cap`` elements each."""
    last = shape[-1] if shape else 1
    count = max(1, math.ceil(last / cap))
    return Segments(last, count, math.ceil(last / count))


@functools.lru_cache(maxsize=1024)
def tiling(shape: tuple[int, ...], runs: tuple[tuple[int, int], ...], row_numel: int,
           columns: bool, int8: bool) -> Tiling:
    """The tiles of a parameter (on the CPU; :func:`tiling_on` moves them)."""
    seg = segments(shape, GROUP if int8 or not columns else COLUMN_CAP)
    lengths = torch.repeat_interleave(torch.tensor([length for length, _ in runs]),
                                      torch.tensor([count for _, count in runs]))
    block_rows = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    num_rows = int(block_rows[-1])
    unit = 1 if columns else row_numel  # last-axis elements per row
    starts = block_rows[:-1]
    aligned = starts[(starts * unit % seg.last) % seg.size == 0]
    bucket = aligned * row_numel // TARGET
    first = torch.ones_like(bucket, dtype=torch.bool)
    first[1:] = bucket[1:] != bucket[:-1]
    cuts = torch.cat([aligned[first], torch.tensor([num_rows])])
    row0, row1 = cuts[:-1], cuts[1:]
    block0 = torch.searchsorted(block_rows, row0)
    block1 = torch.searchsorted(block_rows, row1)
    if columns:  # segments of one line; the tile has these in each of its row_numel lines
        segment0 = row0 // seg.size
        per_tile = (-(-row1 // seg.size) - segment0) * row_numel
    else:
        segment0 = _segment_of(row0 * row_numel, seg)
        per_tile = _segment_of(row1 * row_numel, seg) - segment0
    tile_of_block = torch.searchsorted(row0, starts, right=True) - 1
    max_len = torch.zeros(len(row0), dtype=torch.int64).scatter_reduce_(
        0, tile_of_block, lengths, "amax")
    tiles = torch.stack([row0, row1, block0, block1, segment0, per_tile, max_len], dim=1)
    return Tiling(tiles, block_rows, seg, int((row1 - row0).max()), int((block1 - block0).max()),
                  int(per_tile.max()))


def _segment_of(flat: torch.Tensor, seg: Segments) -> torch.Tensor:
    """The index of the segment that starts at flat element ``flat`` (a segment boundary)."""
    return flat // seg.last * seg.count + flat % seg.last // seg.size


@functools.lru_cache(maxsize=1024)
def tiling_on(key: tuple, device: torch.device) -> Tiling:
    """:func:`tiling` of ``key`` with its tables on ``device`` (copied once)."""
    cpu = tiling(*key)
    return cpu._replace(tiles=cpu.tiles.to(device), block_rows=cpu.block_rows.to(device))


__all__ = ["TARGET", "COLUMN_CAP", "Segments", "Tiling", "segments", "tiling", "tiling_on"]
