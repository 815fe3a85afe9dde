"""Property-based tests (hypothesis) over random shapes, layouts and dtypes. Together they run
MAX_EXAMPLES * PROPERTIES >= 1,000 generated cases (7 x 220 = 1,540)."""
import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adam_mini_tx as amx
from adam_mini_tx import blocks
from adam_mini_tx.core.guards import all_finite
from adam_mini_tx.optim.backends import eager as eager_backend
from adam_mini_tx.optim.members import Member

MAX_EXAMPLES = 220
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)

dims = st.integers(min_value=1, max_value=6)
shapes = st.lists(dims, min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
seeds = st.integers(min_value=0, max_value=2**16)
hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1e-1), "b1": st.floats(0.0, 0.99), "b2": st.floats(0.5, 0.999),
    "wd": st.floats(0.0, 0.2)})


@st.composite
def shape_and_layout(draw):
    """A random shape and one of the layouts that fit it."""
    shape = draw(shapes)
    options = [blocks.elementwise(shape), blocks.single_block(shape), blocks.per_row(shape)]
    if len(shape) == 2:
        options.append(blocks.per_row(shape, transposed=True))
    if len(shape) >= 2:
        options.append(blocks.per_row(shape, row_dims=2))
    divisors = [h for h in range(2, shape[0] + 1) if shape[0] % h == 0]
    if divisors:
        options.append(blocks.per_head(shape, draw(st.sampled_from(divisors))))
    if shape[0] % 2 == 0:  # a fused [q | v] projection: one block for q, one per row of v
        options.append(blocks.fused_rows(shape, [("q", 1), ("v", shape[0] // 2)]))
    if shape[0] % 4 == 0:  # the same, interleaved twice
        options.append(blocks.fused_rows(shape, [("q", 1), ("v", shape[0] // 4)], repeat=2))
    return shape, draw(st.sampled_from(options))


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def run(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = amx.apply_updates(params, updates)
    return params, state


@SETTINGS
@given(shape=shapes, h=hyper, seed=seeds)
def test_elementwise_blocks_are_adamw(shape, h, seed):
    param = torch.nn.Parameter(rand(shape, seed))
    grads_seq = [rand(shape, seed + 1 + t) for t in range(3)]
    torch_opt = torch.optim.AdamW([param], lr=h["lr"], betas=(h["b1"], h["b2"]), weight_decay=h["wd"])
    for g in grads_seq:
        param.grad = g.clone()
        torch_opt.step()
    tx = amx.adam_mini(lr=h["lr"], betas=(h["b1"], h["b2"]), weight_decay=h["wd"],
                       plan={"w": blocks.elementwise(shape)}, decay_mask="all")
    ours, _ = run(tx, {"w": rand(shape, seed)}, [{"w": g} for g in grads_seq])
    torch.testing.assert_close(ours["w"], param.detach(), rtol=1e-9, atol=1e-12)


@SETTINGS
@given(shape=shapes, h=hyper, seed=seeds)
def test_a_single_block_is_a_scalar_second_moment(shape, h, seed):
    grads_seq = [rand(shape, seed + 1 + t) for t in range(3)]
    tx = amx.adam_mini(lr=h["lr"], betas=(h["b1"], h["b2"]), plan={"w": blocks.single_block(shape)})
    ours, state = run(tx, {"w": rand(shape, seed)}, [{"w": g} for g in grads_seq])
    v = torch.zeros((), dtype=torch.float64)
    m = torch.zeros(shape, dtype=torch.float64)
    p = rand(shape, seed)
    for t, g in enumerate(grads_seq, start=1):
        m = h["b1"] * m + (1 - h["b1"]) * g
        v = h["b2"] * v + (1 - h["b2"]) * g.pow(2).mean()
        p = p - h["lr"] * (m / (1 - h["b1"] ** t)) / ((v / (1 - h["b2"] ** t)).sqrt() + 1e-8)
    assert state[1].nu["w"].shape == ()
    torch.testing.assert_close(state[1].nu["w"], v)
    torch.testing.assert_close(ours["w"], p)


@SETTINGS
@given(data=st.data(), n=st.integers(2, 4), seed=seeds)
def test_results_do_not_depend_on_parameter_order(data, n, seed):
    specs = [data.draw(shape_and_layout()) for _ in range(n)]
    names = [f"p{i}.weight" for i in range(n)]
    params = {name: rand(shape, seed + i) for i, (name, (shape, _)) in enumerate(zip(names, specs))}
    grads = {name: rand(p.shape, seed + 100 + i) for i, (name, p) in enumerate(params.items())}
    plan = {name: layout for name, (_, layout) in zip(names, specs)}
    order = data.draw(st.permutations(names))
    tx = amx.adam_mini(lr=1e-2, weight_decay=0.1, plan=plan)
    forward, _ = run(tx, params, [grads, grads])
    shuffled, _ = run(amx.adam_mini(lr=1e-2, weight_decay=0.1, plan=plan),
                      {k: params[k] for k in order}, [{k: grads[k] for k in order}] * 2)
    assert all(torch.equal(forward[k], shuffled[k]) for k in names)


@SETTINGS
@given(spec=shape_and_layout(), dtype=dtypes, seed=seeds)
def test_dtypes_are_preserved_for_every_layout(spec, dtype, seed):
    shape, layout = spec
    params = {"w": rand(shape, seed, dtype)}
    out, state = run(amx.adam_mini(lr=1e-2, plan={"w": layout}), params,
                     [{"w": rand(shape, seed + 1, dtype)}])
    assert out["w"].dtype == dtype
    assert state[0].mu["w"].dtype == dtype and state[1].nu["w"].dtype == dtype
    assert tuple(state[1].nu["w"].shape) == layout.v_shape


@SETTINGS
@given(spec=shape_and_layout(), seed=seeds, steps=st.integers(1, 3))
def test_state_dict_round_trip_is_exact(spec, seed, steps):
    shape, layout = spec
    name = "layer.weight"
    param = torch.nn.Parameter(rand(shape, seed, torch.float32))
    plan = amx.BlockPlan((amx.ParamBlocks(name, shape, layout, "rule", "rule"),))
    opt = amx.AdamMini([(name, param)], lr=1e-2, plan=plan)
    for t in range(steps):
        param.grad = rand(shape, seed + t, torch.float32)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = torch.nn.Parameter(param.detach().clone())
    fresh = amx.AdamMini([(name, twin)], lr=1e-2, plan=plan)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state[param].items():
        assert torch.equal(value, fresh.state[twin][key]) and value.dtype == fresh.state[twin][key].dtype
    param.grad = twin.grad = rand(shape, seed + 99, torch.float32)
    opt.step()
    fresh.step()
    assert torch.equal(param, twin)


@SETTINGS
@given(spec=shape_and_layout(), dtype=dtypes, seed=seeds,
       bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), where=st.data())
def test_nonfinite_guard_is_all_or_nothing(spec, dtype, seed, bad, where):
    """One bad element anywhere: zero updates, the inner state bit-for-bit unchanged and one
    skipped step; no bad element: exactly the inner transform's result."""
    shape, layout = spec
    params = {"w": rand(shape, seed, dtype), "b.bias": rand((3,), seed + 1, dtype)}
    plan = {"w": layout, "b.bias": blocks.elementwise((3,))}
    inner = amx.adam_mini(lr=1e-2, weight_decay=0.1, plan=plan)
    guarded = amx.nonfinite_guard(inner)
    warm = {k: rand(p.shape, seed + 2, dtype) for k, p in params.items()}
    _, state = guarded.update(warm, guarded.init(params), params)
    grads = {k: rand(p.shape, seed + 3, dtype) for k, p in params.items()}
    if bad is not None:
        flat = grads["w"].view(-1)
        flat[where.draw(st.integers(0, flat.numel() - 1))] = bad
    assert bool(all_finite(grads)) == all(bool(torch.isfinite(g).all()) for g in grads.values())
    updates, new_state = guarded.update(grads, state, params)
    if bad is None:
        expected, expected_inner = inner.update(grads, state.inner, params)
        assert all(torch.equal(updates[k], expected[k]) for k in params)
    else:
        expected_inner = state.inner
        assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())
    leaves = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b) for a, b in zip(leaves(new_state.inner), leaves(expected_inner)))
    assert int(new_state.skipped) == int(state.skipped) + (bad is not None)


@SETTINGS
@given(spec=shape_and_layout(), dtype=dtypes, seed=seeds, h=hyper,
       chunk=st.sampled_from([1, 4, 16, 10**6]))
def test_donated_steps_over_row_pieces_equal_pure_steps(spec, dtype, seed, h, chunk):
    """Three Adam-mini steps through donated buffers, on the row pieces the eager optimizer cuts
    (``chunk``: elements per chunk; pieces hold whole blocks), are bit for bit the pure steps on
    the whole tensor, state included. In bf16 a piece boundary can move elements between ATen's
    vectorised loop and its scalar tail, which round differently: the parameter may then differ
    by up to one bf16 rounding per step (the state still matches exactly)."""
    shape, layout = spec
    plan = {"w": layout}
    tx = amx.adam_mini(h["lr"], (h["b1"], h["b2"]), weight_decay=h["wd"], plan=plan)
    pure = {"w": rand(shape, seed, dtype)}
    param = rand(shape, seed, dtype)
    state = tx.init(pure)
    slots = {"step": state[0].count, "m": state[0].mu["w"].clone(), "v": state[1].nu["w"].clone()}
    old = eager_backend.CHUNK_ELEMENTS
    for t in range(3):
        grad = rand(shape, seed + 1 + t, dtype)
        updates, state = tx.update({"w": grad}, state, pure)
        pure = amx.apply_updates(pure, updates)
        param.grad = grad
        try:
            eager_backend.CHUNK_ELEMENTS = chunk
            pieces = eager_backend.row_pieces(Member("w", param, grad, slots), layout)
        finally:
            eager_backend.CHUNK_ELEMENTS = old
        for piece, piece_layout in pieces:
            plan[piece.name] = piece_layout  # the plan tx reads
            new, new_slots = donated_chain_step(tx, piece)
            piece.param.add_(new[piece.name].to(dtype))
        slots["step"] = new_slots[piece.name]["step"]
    if dtype == torch.bfloat16:  # up to one bf16 rounding (2**-7 relative) per step
        torch.testing.assert_close(param, pure["w"], rtol=3 * 2**-7, atol=0)
    else:
        assert torch.equal(param, pure["w"])
    assert torch.equal(slots["m"], state[0].mu["w"]) and torch.equal(slots["v"], state[1].nu["w"])


def donated_chain_step(tx, piece):
    from adam_mini_tx.core.donation import donating
    from adam_mini_tx.optim.state import chain_step

    with donating():
        return chain_step(tx, {piece.name: piece.param}, {piece.name: piece.grad},
                          {piece.name: piece.state})


PROPERTIES = 7
assert MAX_EXAMPLES * PROPERTIES >= 1000
