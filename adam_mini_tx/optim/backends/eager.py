"""The eager backend: the chain over chunks of parameters and row pieces, with donated buffers.

The chain runs once per chunk inside :func:`~adam_mini_tx.donation.donating`: ``m`` and ``v``
are written in place, and each member of the chunk gets one temporary, its update, which the
later transforms overwrite. A chunk holds at most ``CHUNK_ELEMENTS`` elements, so that
temporary stays small (served from the kept workspace, still in the cache for the next
transform). A member larger than a chunk whose blocks are rows or runs of rows of one length
along its first axis (embeddings, output layers, MLP and value/output projections, query/key
heads, 3-D experts) is cut into pieces of whole blocks, each a parameter of its own to the
chain (views of the parameter, its gradient, ``m``, ``v`` and its row sums, with the piece's
block layout); any other member (a transposed ``Conv1D`` weight, fused QKV, a DTensor) is a
chunk of its own. The pieces' results are the whole tensor's, bit for bit, except that in bf16
a piece boundary can move elements between ATen's vectorised loop and its scalar tail, which
round bf16 differently (one bf16 rounding per step at most; the state is unchanged). A
low-precision ``m`` is rounded with its member's noise: each piece passes the chain the salt of
the member's name and the flat index of its first element (``salts``, ``offsets``).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch

from ...core.base import to_dtype
from ...core.blocks import BlockLayout, is_dtensor
from ...core.donation import Workspace, donating
from ...core.guards import all_finite
from ...core.lowbits import salt_of
from ..hyperparams import Hyper, chain_for
from ..members import Member
from ..state import chain_step

CHUNK_ELEMENTS = 2**20
"""Elements per chain call (4 MiB of fp32)."""


class Piece(NamedTuple):
    """A member, or rows ``[start:stop]`` of one, as the chain sees it."""

    name: str  # "<member>" or "<member>[start:stop]"
    member: Member
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    rows: slice | None  # the member's rows it holds (None: all of them)


class EagerWork(NamedTuple):
    members: list[Member]
    chunks: list[list[Piece]]
    layouts: dict[str, BlockLayout]  # every piece's layout, by piece name
    whole: Mapping[str, BlockLayout]  # every member's layout


class EagerBackend:
    """See the module docstring; keeps one :class:`Workspace` (one chunk's temporaries) and
    the layouts of the pieces it has cut (a cache)."""

    def __init__(self) -> None:
        self.workspace = Workspace()
        self._piece_layouts: dict[tuple[BlockLayout, int], BlockLayout] = {}

    @property
    def scratch_bytes(self) -> int:
        return self.workspace.nbytes

    def prepare(self, members: Sequence[Member], layouts: Mapping[str, BlockLayout],
                hyper: Hyper) -> EagerWork:
        pieces: list[Piece] = []
        piece_layouts: dict[str, BlockLayout] = {}
        for member in members:
            for piece, layout in row_pieces(member, layouts[member.name], self._piece_layouts):
                pieces.append(piece)
                piece_layouts[piece.name] = layout
        return EagerWork(list(members), chunks(pieces), piece_layouts, layouts)

    def row_sums(self, work: EagerWork) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        return member_row_sums(work.members, work.whole)

    def apply(self, work: EagerWork, hyper: Hyper, sums: Mapping[str, torch.Tensor] | None,
              written: list[Member]) -> None:
        tx = chain_for(hyper, work.layouts)
        for chunk in work.chunks:
            given = None if sums is None else _piece_sums(chunk, sums)
            salts, offsets = _noise_sites(chunk) if hyper.rounding_seed is not None else (None,
                                                                                          None)
            with donating(self.workspace):
                updates, _ = chain_step(tx, {p.name: p.param for p in chunk},
                                        {p.name: p.grad for p in chunk},
                                        {p.name: p.state for p in chunk}, given,
                                        hyper.rounding_seed, salts, offsets)
            for piece in chunk:
                piece.param.add_(to_dtype(updates[piece.name], piece.param.dtype))
            written.extend(piece.member for piece in chunk
                           if piece.rows is None or piece.rows.stop == piece.member.param.shape[0])

def member_row_sums(members: Sequence[Member], layouts: Mapping[str, BlockLayout]
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The statistics pass over plain-tensor ``members`` (DTensors are left to the caller):
    row sums of squares by name, in at least ``v``'s dtype, and one all-finite flag."""
    sums = {member.name: layouts[member.name].row_sums_of_squares(
                member.grad, member.state["v"].dtype)
            for member in members if not is_dtensor(member.grad)}
    return sums, ([all_finite(sums)] if sums else [])


def row_pieces(member: Member, layout: BlockLayout,
               cache: dict[tuple[BlockLayout, int], BlockLayout] | None = None
               ) -> list[tuple[Piece, BlockLayout]]:
    """``member`` as pieces of at most ``CHUNK_ELEMENTS`` elements (rows of whole blocks) with
    their layouts, when it is larger and its layout allows it; else one piece. ``cache`` keeps
    the pieces' layouts from one step to the next."""
    param, state = member.param, member.state
    block_rows = _rows_per_block(layout)
    scaled = "m_scale" in state  # int8 m: its scales run along the rows of a 2-D+ tensor
    if param.numel() <= CHUNK_ELEMENTS or block_rows is None or is_dtensor(param) \
            or (scaled and param.dim() < 2):
        return [(Piece(member.name, member, param, member.grad, state, None), layout)]
    cache = {} if cache is None else cache
    fitting = CHUNK_ELEMENTS // (param.numel() // param.shape[0])  # first-axis rows in a chunk
    rows = max(1, fitting // block_rows) * block_rows
    pieces = []
    for start in range(0, param.shape[0], rows):
        stop = min(start + rows, param.shape[0])
        blocks = slice(start // block_rows, stop // block_rows)  # v's entries for these rows
        piece_state = {key: value if key == "step" else value[blocks if key == "v" else
                                                              slice(start, stop)]
                       for key, value in state.items()}
        piece = Piece(f"{member.name}[{start}:{stop}]", member, param[start:stop],
                      member.grad[start:stop], piece_state, slice(start, stop))
        if (layout, stop - start) not in cache:
            cache[layout, stop - start] = _piece_layout(layout, block_rows, stop - start)
        pieces.append((piece, cache[layout, stop - start]))
    return pieces


def _piece_layout(layout: BlockLayout, block_rows: int, rows: int) -> BlockLayout:
    """``layout`` for ``rows`` first-axis rows (whole blocks of ``block_rows`` rows each)."""
    shape = (rows, *layout.shape[1:])
    runs = (((1, rows * math.prod(layout.row_shape[1:])),) if block_rows == 1
            else ((block_rows, rows // block_rows),))
    return BlockLayout(shape, layout.perm, layout.row_dims, runs, layout.pattern)


def _piece_sums(chunk: Sequence[Piece], sums: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The row sums of the chunk's pieces (a piece's rows of its member's sums)."""
    given = {}
    for piece in chunk:
        whole = sums.get(piece.member.name)
        if whole is not None:
            given[piece.name] = whole if piece.rows is None else whole[piece.rows]
    return given


def _noise_sites(chunk: Sequence[Piece]) -> tuple[dict[str, int], dict[str, int]]:
    """The rounding noise of the chunk's pieces is their members': the salt of the member's
    name, and the flat index of the piece's first element in the member."""
    salts = {piece.name: salt_of(piece.member.name) for piece in chunk}
    offsets = {piece.name: piece.rows.start * piece.param[0].numel()
               for piece in chunk if piece.rows is not None}
    return salts, offsets


def _rows_per_block(layout: BlockLayout) -> int | None:
    """How many first-axis rows make one block, if every block is that many whole rows in order
    (``v``'s first axis then runs over the blocks); else None."""
    if layout.perm != tuple(range(len(layout.shape))) or layout.row_dims < 1:
        return None
    if layout.one_row_per_block:
        return 1
    runs = [(length, count) for length, count in layout.runs if count]
    return runs[0][0] if layout.row_dims == 1 and len(runs) == 1 else None


def chunks(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces with one step count, packed in order into chunks of at most ``CHUNK_ELEMENTS``
    elements (a larger piece is a chunk of its own): one chain call per chunk."""
    packed: list[list[Piece]] = []
    open_chunks: dict[int, tuple[list[Piece], int]] = {}  # step -> (chunk being filled, size)
    for piece in pieces:
        step, size = int(piece.state["step"]), piece.param.numel()
        chunk, filled = open_chunks.get(step, (None, 0))
        if chunk is None or filled + size > CHUNK_ELEMENTS:
            chunk, filled = [], 0
            packed.append(chunk)
        chunk.append(piece)
        open_chunks[step] = (chunk, filled + size)
    return packed


__all__ = ["CHUNK_ELEMENTS", "EagerBackend", "Piece", "member_row_sums", "row_pieces", "chunks"]
