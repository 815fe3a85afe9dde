"""The Triton step kernel against the functional chain ``adam_mini(...)``, for every layout kind
the kernel accepts, every first-moment format, fp32 and bf16 parameters, decay on and off, and
given row sums, over several steps. On a machine without CUDA it runs on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, slow: the tensors are small, with several blocks,
rows and int8 groups each); with CUDA it runs the compiled kernel (benchmarks/gpu_run.sh)."""
import os

import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx.core import blocks
from adam_mini_tx.functional.alias import adam_mini_slots
from adam_mini_tx.kernels.spec import KernelMember, geometry, member_noise_key, step_scalars
from adam_mini_tx.kernels import tiles
from adam_mini_tx.kernels.tiles import segments, tiling

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first compiled
from adam_mini_tx.kernels import triton_step  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_step.available(),
                                  reason=f"triton step: {triton_step.unavailable_reason()}")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
    else "cpu"

LAYOUTS = {  # name -> layout: several blocks (and int8 groups) each
    "rows": blocks.per_row((12, 20)),
    "rows_three_groups": blocks.per_row((4, 600)),  # int8: 3 groups of 200 per row
    "heads": blocks.per_head((24, 10), 4),
    "gqa_qkv": blocks.fused_rows((48, 10), [("q", 4), ("k", 2), ("v", 12)],
                                 rows_per_segment=[24, 12, 12]),
    "qkv_bias": blocks.fused_rows((300,), [("q", 5), ("k", 5), ("v", 5)]),  # blocks span groups
    "conv1d": blocks.per_row((10, 40), transposed=True),
    "conv1d_heads": blocks.fused_rows((6, 600), [("h", 10)], transposed=True),
    "experts": blocks.per_row((3, 8, 12), row_dims=2),
    "norm": blocks.single_block((33,)),
    "matrix_one_block": blocks.single_block((5, 7)),
    "elementwise": blocks.elementwise((6, 70)),
    "elementwise_long": blocks.elementwise((300,)),
    "scalar": blocks.elementwise(()),
}
FORMATS = {  # id -> (momentum_format, stochastic_rounding)
    "fp32": ("float32", False), "bf16": ("bfloat16", False), "bf16_sr": ("bfloat16", True),
    "int8": ("int8", False), "int8_sr": ("int8", True)}
STEPS, SEED, LR, WD, BETAS, EPS, EPS_ROOT = 4, 3, 1e-2, 0.1, (0.9, 0.999), 1e-8, 1e-12
NAMES = list(LAYOUTS)
DECAYED = set(NAMES[::2])  # decay on every other parameter
GIVEN_SUMS = set(NAMES[1::3])  # row sums from a "statistics pass" (doubled: they must be used)


def run_both(momentum_format: str, stochastic: bool, dtype: torch.dtype):
    """Yield ``(step, kernel params, kernel state, chain params, chain state)`` per step."""
    torch.manual_seed(0)
    params = {n: torch.randn(lay.shape, device=DEVICE).to(dtype) for n, lay in LAYOUTS.items()}
    tx = amx.adam_mini(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, eps_root=EPS_ROOT,
                       plan=LAYOUTS, state_dtype=torch.float32,
                       decay_mask=lambda name, _: "decay" if name in DECAYED else "no_decay",
                       momentum_format=momentum_format, stochastic_rounding=stochastic,
                       seed=SEED)
    state = tx.init(params)
    mine = {n: p.clone() for n, p in params.items()}
    slots = {n: {k: t.clone() for k, t in adam_mini_slots(state, n).items()} for n in params}
    for count in range(1, STEPS + 1):
        grads = {n: (torch.randn(p.shape, device=DEVICE) * count).to(dtype)
                 for n, p in params.items()}
        sums = {n: 2 * LAYOUTS[n].row_sums_of_squares(grads[n], torch.float32)
                for n in GIVEN_SUMS}
        updates, state = tx.update(grads, state, params, row_sums=sums)
        params = amx.apply_updates(params, updates)
        members = []
        for name, layout in LAYOUTS.items():
            runs, row_numel, columns = geometry(layout)
            s = slots[name]
            members.append(KernelMember(
                name, mine[name], grads[name], s["m"], s.get("m_scale"), s["v"], sums.get(name),
                runs, row_numel, columns, name in DECAYED,
                member_noise_key(SEED, count, name) if stochastic else None))
        triton_step.step_(members, step_scalars(LR, *BETAS, EPS, EPS_ROOT, WD, count))
        yield count, mine, slots, params, state


def key_of(name: str, int8: bool) -> tuple:
    """The :func:`tiling` arguments of parameter ``name``."""
    return (LAYOUTS[name].shape, *geometry(LAYOUTS[name]), int8)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-6 relative (of the element, or of the tensor's largest for elements near 0)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: (
        f"{what}: {m}"))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of ~200 elements and loop iterations of <= 64: every tensor is cut into several
    tiles, and every loop of a program runs several times."""
    monkeypatch.setattr(tiles, "TARGET", 200)
    monkeypatch.setattr(triton_step, "CHUNK", 64)
    for cached in (tiles.tiling, tiles.tiling_on):
        cached.cache_clear()
    yield
    for cached in (tiles.tiling, tiles.tiling_on):
        cached.cache_clear()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_the_chain_at_every_step(fmt, dtype):
    check_against_chain(fmt, dtype)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_the_chain_with_many_tiles_per_tensor(fmt, small_tiles):
    check_against_chain(fmt, torch.float32)
    assert tiling(*key_of("rows", fmt == "int8")).tiles.shape[0] > 1


def check_against_chain(fmt: str, dtype: torch.dtype) -> None:
    momentum_format, stochastic = FORMATS[fmt]
    for count, mine, slots, params, state in run_both(momentum_format, stochastic, dtype):
        for name in LAYOUTS:
            where = f"step {count}, {name}"
            ref = adam_mini_slots(state, name)
            assert_fp32_close(slots[name]["v"], ref["v"], f"{where}, v")
            if momentum_format == "float32":
                assert_fp32_close(slots[name]["m"], ref["m"], f"{where}, m")
            else:  # the same fp32 m rounded by the same bits: equal, bit for bit
                assert torch.equal(slots[name]["m"], ref["m"]), f"{where}, m"
                if "m_scale" in ref:
                    assert torch.equal(slots[name]["m_scale"], ref["m_scale"]), where
            if dtype == torch.float32:
                assert_fp32_close(mine[name], params[name], f"{where}, p")
            else:  # p + bf16(-lr u): at most one bf16 rounding apart per step
                torch.testing.assert_close(mine[name].float(), params[name].float(),
                                           rtol=count * 2 ** -8, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("int8", [False, True])
def test_tiles_hold_whole_blocks_and_whole_segments(name, int8, small_tiles):
    """Tiles partition the rows, the blocks and the segments, and start where a block starts."""
    layout = LAYOUTS[name]
    runs, row_numel, columns = geometry(layout)
    t = tiling(*key_of(name, int8))
    row0, row1, block0, block1, seg0, nseg, max_len = t.tiles.T
    assert row0[0] == 0 and row1[-1] == layout.num_rows and torch.equal(row0[1:], row1[:-1])
    assert block0[0] == 0 and block1[-1] == layout.num_blocks
    assert torch.equal(t.block_rows[block0], row0) and torch.equal(t.block_rows[block1], row1)
    seg = t.segments
    numel = max(1, layout.num_rows * row_numel)
    assert int(nseg.sum()) == numel // seg.last * seg.count
    assert int(max_len.max()) == max(length for length, count in runs if count)
    if int8:
        assert seg == segments(tuple(layout.shape), 256)


@needs_triton
def test_a_member_the_kernel_cannot_compute_exactly_is_refused():
    layout = LAYOUTS["rows"]
    runs, row_numel, columns = geometry(layout)
    p = torch.zeros(20, 12).t()  # not contiguous
    member = KernelMember("rows", p, torch.zeros_like(p), torch.zeros_like(p), None,
                          torch.zeros(12), None, runs, row_numel, columns, False, None)
    with pytest.raises(ValueError, match="contiguous"):
        triton_step.step_([member], step_scalars(LR, *BETAS, EPS, 0.0, 0.0, 1))
