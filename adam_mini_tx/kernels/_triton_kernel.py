"""The Triton program of :mod:`.triton_step` (imports triton: load it only through that module).

One program owns one tile (:mod:`.tiles`) and makes three sweeps over it:

1. ``S_r = sum_j g[r, j]**2`` for every row of the tile, into the ``rows`` scratch (skipped when
   row sums are given);
2. per block: ``S_b = sum_{r in b} S_r``, ``v_b`` updated and stored, and
   ``d_b = sqrt(v_b + eps_root c2) / sqrt(c2) + eps`` written for each of its rows into ``denom``;
3. per segment (a whole int8 group): ``g``, ``p``, ``m`` loaded again, ``m``, ``p`` (and the
   group's scale) updated and stored.

Sweep 3 reads the tile's gradient a second time, right after sweep 1 read it: at most
:data:`~.tiles.TARGET` elements (or one block) ago, so the second read hits the L2 cache, not
memory: the gradient crosses the memory bus once.
"""
from __future__ import annotations

import triton
import triton.language as tl

_GOLDEN = tl.constexpr(10368889)  # lowbits._GOLDEN


@triton.jit
def _row_sums(g, rows, row0, row1, row_numel, last,
              COLUMNS: tl.constexpr, RB: tl.constexpr, EB: tl.constexpr):
    """Sweep 1: ``rows[r] = sum_j g[r, j]**2`` for ``r`` in ``[row0, row1)``."""
    for r in range(row0, row1, RB):
        row = r + tl.arange(0, RB)
        acc = tl.zeros([RB], dtype=tl.float32)
        if COLUMNS:  # element (r, j) is g[j, r]
            for j in range(0, row_numel, EB):
                col = j + tl.arange(0, EB)
                mask = (row[:, None] < row1) & (col[None, :] < row_numel)
                x = tl.load(g + col[None, :].to(tl.int64) * last + row[:, None], mask=mask,
                            other=0.0).to(tl.float32)
                acc += tl.sum(x * x, axis=1)
        else:
            for j in range(0, row_numel, EB):
                col = j + tl.arange(0, EB)
                mask = (row[:, None] < row1) & (col[None, :] < row_numel)
                x = tl.load(g + row[:, None].to(tl.int64) * row_numel + col[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                acc += tl.sum(x * x, axis=1)
        tl.store(rows + row, acc, mask=row < row1)


@triton.jit
def _blocks(v, rows, denom, block_rows, block0, block1, max_len, row_numel, beta2, one_minus_beta2, eps, eps_root, c2, sqrt_c2, NB: tl.constexpr):
    """Sweep 2: ``v_b = b2 v_b + (1 - b2) S_b / |b|`` and ``denom[r] = d_b`` for ``r`` in ``b``."""
    for b in range(block0, block1, NB):
        block = b + tl.arange(0, NB)
        live = block < block1
        first = tl.load(block_rows + block, mask=live, other=0)
        end = tl.load(block_rows + block + 1, mask=live, other=1)  # no 0 / 0 in dead lanes
        total = tl.zeros([NB], dtype=tl.float32)
        for k in range(0, max_len):
            total += tl.load(rows + first + k, mask=live & (first + k < end), other=0.0)
        numel = ((end - first) * row_numel).to(tl.float32)
        old = tl.load(v + block, mask=live, other=0.0)
        new = old.to(tl.float32) * beta2 + tl.div_rn(total, numel) * one_minus_beta2
        tl.store(v + block, _stored(new, old.dtype), mask=live)
        d = tl.div_rn(tl.sqrt_rn(new + eps_root * c2), sqrt_c2) + eps
        for k in range(0, max_len):
            tl.store(denom + first + k, d, mask=live & (first + k < end))


@triton.jit
def _bf16_rounded(x, carry):
    """fp32 ``x`` rounded to bf16 (returned as fp32) by adding ``carry`` below bf16's last bit
    and truncating: ``0x7FFF`` plus that bit rounds to nearest-even, 16 random bits round
    stochastically. Non-finite values keep their bits. (Explicit: Triton's interpreter
    truncates in ``.to(tl.bfloat16)``.)"""
    word = (x.to(tl.int32, bitcast=True) + carry) & -65536
    return tl.where(tl.abs(x) < float("inf"), word.to(tl.float32, bitcast=True), x)


@triton.jit
def _stored(x, dtype: tl.constexpr):
    """fp32 ``x`` in ``dtype`` (fp32 or bf16), to nearest."""
    if dtype == tl.bfloat16:
        word = x.to(tl.int32, bitcast=True)
        x = _bf16_rounded(x, 0x7FFF + ((word >> 16) & 1))
    return x.to(dtype)


@triton.jit
def _round_half_even(x):
    """``torch.round``: to nearest, ties to even (exact for ``|x| < 2**23``)."""
    r = tl.floor(x + 0.5)
    tie_to_odd = (r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0)
    return tl.where(tie_to_odd, r - 1.0, r)


@triton.jit
def _update(p, g, m, scale, denom, segment0, segments, row_numel, last, count,
            size, one_minus_beta1, c1, neg_lr, weight_decay, noise_key,
            COLUMNS: tl.constexpr, INT8: tl.constexpr, STOCHASTIC: tl.constexpr,
            DECAY: tl.constexpr, NG: tl.constexpr, SP: tl.constexpr):
    """Sweep 3, over whole segments: ``m += (1 - b1)(g - m)``, ``u = m / c1 / d (+ wd p)``,
    ``p += bf16?(-lr u)``; ``m`` stored to nearest or stochastically, as int8 with its scale."""
    t = tl.arange(0, SP)
    for s in range(0, segments, NG):
        seg = s + tl.arange(0, NG)
        if COLUMNS:  # the tile's columns, in each of the row_numel lines
            per_line = segments // row_numel
            line = seg // per_line
            piece = segment0 + seg % per_line
        else:
            sid = segment0 + seg
            line = sid // count
            piece = sid % count
        start = line.to(tl.int64) * last + piece * size
        length = tl.minimum(size, last - piece * size)
        mask = (seg < segments)[:, None] & (t[None, :] < length[:, None])
        offs = start[:, None] + t[None, :]
        if COLUMNS:
            row = piece[:, None] * size + t[None, :]
        else:
            row = offs // row_numel
        d = tl.load(denom + row, mask=mask, other=1.0)
        grad = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        old_p = tl.load(p + offs, mask=mask, other=0.0)
        param = old_p.to(tl.float32)
        codes = tl.load(m + offs, mask=mask, other=0)
        if INT8:  # int8 codes times the group's scale
            group = line * count + piece
            mom = codes.to(tl.float32) * tl.load(scale + group, mask=seg < segments)[:, None]
        else:
            mom = codes.to(tl.float32)
        mom = tl.fma(one_minus_beta1, grad - mom, mom)  # torch's lerp, weight < 0.5
        u = tl.div_rn(tl.div_rn(mom, c1), d)
        if DECAY:
            u = u + weight_decay * param
        step = u * neg_lr
        step = _stored(step, old_p.dtype).to(tl.float32)
        tl.store(p + offs, _stored(param + step, old_p.dtype), mask=mask)
        if STOCHASTIC:
            bits = (offs * _GOLDEN + noise_key) & 0xFFFFFF
        if INT8:
            top = tl.div_rn(tl.max(tl.where(mask, tl.abs(mom), 0.0), axis=1), 127.0)
            scaled = tl.div_rn(mom, tl.where(top > 0, top, 1.0)[:, None])
            if STOCHASTIC:
                scaled = tl.floor(scaled + bits.to(tl.float32) * (1.0 / 16777216.0))
            else:
                scaled = _round_half_even(scaled)
            scaled = tl.minimum(tl.maximum(scaled, -127.0), 127.0)
            tl.store(m + offs, scaled.to(tl.int8), mask=mask)
            tl.store(scale + group, top, mask=seg < segments)
        elif STOCHASTIC:  # bf16
            tl.store(m + offs, _bf16_rounded(mom, (bits >> 8).to(tl.int32)).to(tl.bfloat16),
                     mask=mask)
        else:
            tl.store(m + offs, _stored(mom, codes.dtype), mask=mask)


@triton.jit
def step_kernel(p, g, m, scale, v, rows, denom, tiles, block_rows,
                row_numel, last, count, size,
                one_minus_beta1, beta2, one_minus_beta2, eps, eps_root, c1, c2, sqrt_c2,
                neg_lr, weight_decay, noise_key,
                COLUMNS: tl.constexpr, INT8: tl.constexpr, STOCHASTIC: tl.constexpr,
                DECAY: tl.constexpr, GIVEN_SUMS: tl.constexpr, RB: tl.constexpr,
                EB: tl.constexpr, NB: tl.constexpr, NG: tl.constexpr, SP: tl.constexpr):
    """One tile of one parameter (program ``i`` owns row ``i`` of ``tiles``)."""
    tile = tiles + tl.program_id(0) * 7
    row0 = tl.load(tile)
    row1 = tl.load(tile + 1)
    if not GIVEN_SUMS:
        _row_sums(g, rows, row0, row1, row_numel, last, COLUMNS, RB, EB)
        tl.debug_barrier()
    _blocks(v, rows, denom, block_rows, tl.load(tile + 2), tl.load(tile + 3), tl.load(tile + 6),
            row_numel, beta2, one_minus_beta2, eps, eps_root, c2, sqrt_c2, NB)
    tl.debug_barrier()
    _update(p, g, m, scale, denom, tl.load(tile + 4), tl.load(tile + 5), row_numel, last, count,
            size, one_minus_beta1, c1, neg_lr, weight_decay, noise_key, COLUMNS, INT8, STOCHASTIC, DECAY, NG, SP)
