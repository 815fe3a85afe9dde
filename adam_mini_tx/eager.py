"""The units of the eager step: parameters packed into chunks, large ones cut into row pieces.

The optimizer runs the :func:`adam_mini` chain once per chunk, with donated buffers
(:func:`~adam_mini_tx.donation.donating`): ``m`` and ``v`` are written in place, and each
parameter of the chunk gets one temporary, its update, which the later transforms overwrite. A
chunk holds at most ``CHUNK_ELEMENTS`` elements, so that temporary stays small: it is served from
glibc's heap rather than freshly mapped (and page-faulted) memory, and it is still in the cache
when the next transform reads it. A parameter larger than a chunk whose blocks are rows or
runs of rows of one length along its first axis (embeddings, output layers, MLP and
value/output projections, query/key heads, 3-D experts) is cut into pieces of whole blocks, each
a parameter of its own to the chain (a view of the parameter, of ``m`` and of ``v``, with the
piece's block layout); any other parameter (a transposed ``Conv1D`` weight, fused QKV, a DTensor)
is a chunk of its own. The pieces' results are the whole tensor's, bit for bit, except that in
bf16 a piece boundary can move elements between ATen's vectorised loop and its scalar tail,
which round bf16 differently: a parameter may then differ by one bf16 rounding per step (its
state does not; ``tests/test_properties_hypothesis.py``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .base import to_dtype
from .blocks import BlockLayout, GivenRowSumsMap, is_dtensor
from .guards import all_finite

CHUNK_ELEMENTS = 2**20
"""Elements per chain call of the eager step (4 MiB of fp32)."""


class Member(NamedTuple):
    """One tensor of the eager step: its name (as the chain sees it), the parameter (or a view of
    its rows), its gradient and its ``{"step", "m", "v"}`` state (of the rows). ``owner`` is the
    whole parameter's state dict, where the new step count goes, and ``whole`` its name."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    owner: dict[str, torch.Tensor]
    whole: str


def row_pieces(name: str, param: torch.Tensor, state: dict[str, torch.Tensor],
               layouts: dict[str, BlockLayout]) -> list[Member]:
    """``param`` as members of at most ``CHUNK_ELEMENTS`` elements (rows of whole blocks) when it
    is larger and its layout allows it; else one member. A piece's layout is registered in
    ``layouts`` under the piece's name, ``"<name>[start:stop]"``."""
    layout = layouts[name]
    block_rows = _rows_per_block(layout)
    if param.numel() <= CHUNK_ELEMENTS or block_rows is None or is_dtensor(param):
        return [Member(name, param, param.grad, state, state, name)]
    fitting = CHUNK_ELEMENTS // (param.numel() // param.shape[0])  # first-axis rows in a chunk
    rows = max(1, fitting // block_rows) * block_rows
    pieces = []
    for start in range(0, param.shape[0], rows):
        stop = min(start + rows, param.shape[0])
        piece = f"{name}[{start}:{stop}]"
        if piece not in layouts:
            layouts[piece] = _piece_layout(layout, block_rows, stop - start)
        blocks = slice(start // block_rows, stop // block_rows)  # v's entries for these rows
        pieces.append(Member(piece, param[start:stop], param.grad[start:stop],
                             {"step": state["step"], "m": state["m"][start:stop],
                              "v": state["v"][blocks]}, state, name))
    return pieces


def _rows_per_block(layout: BlockLayout) -> int | None:
    """How many first-axis rows make one block, if every block is that many whole rows in order
    (``v``'s first axis then runs over the blocks); else None."""
    if layout.perm != tuple(range(len(layout.shape))) or layout.row_dims < 1:
        return None
    if layout.one_row_per_block:
        return 1
    runs = [(length, count) for length, count in layout.runs if count]
    return runs[0][0] if layout.row_dims == 1 and len(runs) == 1 else None


def _piece_layout(layout: BlockLayout, block_rows: int, rows: int) -> BlockLayout:
    """``layout`` for ``rows`` first-axis rows (whole blocks of ``block_rows`` rows each)."""
    shape = (rows, *layout.shape[1:])
    if block_rows == 1:
        runs = ((1, rows * math.prod(layout.row_shape[1:])),)
    else:
        runs = ((block_rows, rows // block_rows),)
    return BlockLayout(shape, layout.perm, layout.row_dims, runs, layout.pattern)


def chunks(members: list[Member]) -> list[list[Member]]:
    """The eager step's chain calls: members with one step count, packed in order into chunks of
    at most ``CHUNK_ELEMENTS`` elements (a larger member is a chunk of its own). One call per
    chunk keeps the Python work per step small."""
    packed: list[list[Member]] = []
    open_chunks: dict[int, tuple[list[Member], int]] = {}  # step -> (chunk being filled, size)
    for member in members:
        step, size = int(member.state["step"]), member.param.numel()
        chunk, filled = open_chunks.get(step, (None, 0))
        if chunk is None or filled + size > CHUNK_ELEMENTS:
            chunk, filled = [], 0
            packed.append(chunk)
        chunk.append(member)
        open_chunks[step] = (chunk, filled + size)
    return packed


def row_statistics(members: list[Member], given: GivenRowSumsMap) -> tuple[list[torch.Tensor],
                                                                            set[str]]:
    """The statistics pass of a step with a non-finite check: every plain-tensor member's row
    sums of squares (in ``v``'s dtype, as the chain computes them), handed to the chain through
    ``given`` so that it does not read ``g`` for them again. Returns a 0-d bool per call (all
    sums finite: so is every gradient element, unless a finite one's square overflows) and the
    names of the parameters covered. DTensor members are left to the caller's own check."""
    sums, covered = {}, set()
    for member in members:
        if is_dtensor(member.grad):
            continue
        wrapper = given[member.name]
        wrapper.row_sums = sums[member.name] = wrapper.layout.row_sums_of_squares(
            to_dtype(member.grad, member.state["v"].dtype))
        covered.add(member.whole)
    return ([all_finite(sums)] if sums else []), covered


__all__ = ["CHUNK_ELEMENTS", "Member", "row_pieces", "chunks", "row_statistics"]
