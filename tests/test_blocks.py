"""Block layouts: geometry, reduction and broadcast, checked against explicit reshapes."""
import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx import blocks


def explicit_block_rms(g: torch.Tensor, kind: str, **kw) -> torch.Tensor:
    """rms(g over the block of each element), written with plain reshapes for every layout kind."""
    if kind == "elementwise":
        return g.abs()
    if kind == "whole":
        return g.pow(2).mean().sqrt().expand_as(g)
    if kind == "rows":
        return g.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *[1] * (g.dim() - 1)).expand_as(g)
    if kind == "columns":
        return g.pow(2).mean(0, keepdim=True).sqrt().expand_as(g)
    if kind == "experts":
        return g.pow(2).mean(2, keepdim=True).sqrt().expand_as(g)
    if kind == "heads":
        h = kw["n_heads"]
        per_head = g.reshape(h, -1).pow(2).mean(1).sqrt()
        per_row = per_head.repeat_interleave(g.shape[0] // h)
        return per_row.reshape(-1, *[1] * (g.dim() - 1)).expand_as(g)
    if kind == "qkv":
        hq, hk, d = kw["hq"], kw["hk"], kw["d"]
        q, k, v = g.split([hq * d, hk * d, hk * d])
        return torch.cat([explicit_block_rms(q, "heads", n_heads=hq),
                          explicit_block_rms(k, "heads", n_heads=hk),
                          explicit_block_rms(v, "rows")])
    raise AssertionError(kind)


CASES = [
    ("elementwise", lambda s: blocks.elementwise(s), (6, 5), {}),
    ("elementwise", lambda s: blocks.elementwise(s), (7,), {}),
    ("whole", lambda s: blocks.single_block(s), (9,), {}),
    ("whole", lambda s: blocks.single_block(s), (4, 3), {}),
    ("rows", lambda s: blocks.per_row(s), (8, 5), {}),
    ("rows", lambda s: blocks.per_row(s), (4, 3, 2, 2), {}),
    ("columns", lambda s: blocks.per_row(s, transposed=True), (5, 8), {}),
    ("experts", lambda s: blocks.per_row(s, row_dims=2), (3, 4, 5), {}),
    ("heads", lambda s: blocks.per_head(s, 4), (16, 6), {"n_heads": 4}),
    ("heads", lambda s: blocks.per_head(s, 2), (8,), {"n_heads": 2}),
    ("qkv", lambda s: blocks.fused_rows(s, [("q", 4), ("k", 2), ("v", 6)],
                                        rows_per_segment=[12, 6, 6]), (24, 5),
     {"hq": 4, "hk": 2, "d": 3}),
]


@pytest.mark.parametrize("kind,make,shape,kw", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_mean_square_and_expand_match_explicit_reshapes(kind, make, shape, kw):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    layout = make(shape)
    v = layout.mean_square(g)
    assert tuple(v.shape) == layout.v_shape
    assert v.numel() == layout.num_blocks
    rms = layout.expand(v.sqrt())
    torch.testing.assert_close(rms.expand_as(g), explicit_block_rms(g, kind, **kw))
    # the broadcast is a view of the per-block values, never a full-size copy
    assert rms.numel() <= max(layout.num_rows, 1)


@pytest.mark.parametrize("kind,make,shape,kw", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_one_step_from_zero_is_gradient_over_block_rms(kind, make, shape, kw):
    """The partition semantics, pinned independently of the implementation:
    first Adam-mini step = -lr * g / rms(g over its block)."""
    torch.manual_seed(1)
    name = "layer.weight"
    params = {name: torch.randn(shape, dtype=torch.float64)}
    grads = {name: torch.randn(shape, dtype=torch.float64)}
    tx = amx.adam_mini(lr=0.1, eps=0.0, plan={name: make(shape)})
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = -0.1 * grads[name] / explicit_block_rms(grads[name], kind, **kw)
    torch.testing.assert_close(updates[name], expected)


def test_block_sizes_cover_the_tensor():
    layout = blocks.fused_rows((24, 5), [("q", 4), ("k", 2), ("v", 6)], rows_per_segment=[12, 6, 6])
    assert layout.num_blocks == 12
    assert sum(layout.block_sizes) == 24 * 5
    assert layout.block_sizes[:4] == (15,) * 4 and layout.block_sizes[-1] == 5


@pytest.mark.parametrize("make,message", [
    (lambda: blocks.per_head((10, 4), 4), "cannot be split"),
    (lambda: blocks.per_row((3, 4), transposed=True) and blocks.per_row((3, 4, 5), transposed=True),
     "2-D"),
    (lambda: blocks.BlockLayout((4, 3), (0, 0), 1, ((1, 4),), "bad"), "permutation"),
    (lambda: blocks.BlockLayout((4, 3), (0, 1), 1, ((1, 5),), "bad"), "cover"),
])
def test_impossible_layouts_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_layouts_are_hashable_static_values():
    a, b = blocks.per_head((16, 6), 4), blocks.per_head((16, 6), 4)
    assert a == b and hash(a) == hash(b)
    assert "h=4" in a.pattern
