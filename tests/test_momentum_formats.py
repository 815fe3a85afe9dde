"""Low-precision first moments (``momentum_format``): rounding error bounds, unbiased and
deterministic stochastic rounding, the functional core under vmap and compile, AdamMini eager
and fused, bit-exact resume, the non-finite policies, and the state's bytes."""
import copy
import io

import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx.core.lowbits import (QuantizedMoment, dequantize_int8, encode_int8, flat_index,
                                       group_absmax, group_count, group_window, quantize_int8,
                                       salt_of, to_bfloat16, uniform_noise)
from adam_mini_tx.optim.backends import eager as eager_backend
from test_oracles import TinyLlama, gradient_sequence, initial_params
from test_optim import HEADS

LOW = ["bfloat16", "int8"]


def noise(like, count=0, seed=0, salt=7):
    return uniform_noise(torch.tensor(seed), torch.tensor(count), salt, like)


def test_noise_is_uniform_and_a_function_of_its_inputs_only():
    x = torch.empty(4096, 3)
    u = noise(x)
    assert u.shape == x.shape and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch.equal(u, noise(x))  # same inputs, same bits
    for other in (noise(x, count=1), noise(x, seed=1), noise(x, salt=8)):
        assert (other != u).float().mean() > 0.99
    assert salt_of("layers.0.mlp.up_proj.weight") == salt_of("layers.0.mlp.up_proj.weight")
    assert salt_of("a") != salt_of("b")


def test_noise_is_a_function_of_the_global_index_not_of_the_cut():
    """Rows [2:5) of a (6, 7) tensor, given their first index, and a (2, 3) block of it, given
    its flat indices, draw exactly the whole tensor's bits."""
    x = torch.empty(6, 7)
    whole = noise(x)
    key = (torch.tensor(0), torch.tensor(0), 7)
    assert torch.equal(uniform_noise(*key, x[2:5], 14), whole[2:5])
    block = flat_index((2, 3), (1, 4), (6, 7))
    assert torch.equal(block, torch.arange(42).reshape(6, 7)[1:3, 4:7])
    assert torch.equal(uniform_noise(*key, x[1:3, 4:7], block), whole[1:3, 4:7])
    assert not torch.equal(noise(x[2:5]), whole[2:5])  # without its index a piece differs


@pytest.mark.parametrize("shape", [(600,), (3, 600), (5, 257), (4, 100)])
@pytest.mark.parametrize("cuts", [(0.5,), (0.23, 0.5), (0.001, 0.999)])
def test_int8_of_column_slices_with_shared_group_maxima_equals_the_whole(shape, cuts):
    """A row cut into column slices (a shard of a parameter sharded along its last axis): the
    group maxima of the slices, combined by max, and each slice's codes with its window of the
    scales equal the whole tensor's quantization bit for bit."""
    torch.manual_seed(0)
    x, u = torch.randn(shape), torch.rand(shape)
    last = shape[-1]
    bounds = [0, *(int(c * last) for c in cuts), last]
    slices = list(zip(bounds, bounds[1:]))
    whole = quantize_int8(x, u)
    maxima = torch.zeros(whole.scales.shape)
    for a, b in slices:
        window = group_window(a, b - a, last)
        maxima[..., window] = torch.maximum(maxima[..., window], group_absmax(x[..., a:b], a, last))
    scales = maxima / 127
    assert torch.equal(scales, whole.scales)
    for a, b in slices:
        window = group_window(a, b - a, last)
        codes = encode_int8(x[..., a:b], scales[..., window], u[..., a:b], a, last)
        assert torch.equal(codes, whole.codes[..., a:b])
        values = dequantize_int8(QuantizedMoment(codes, scales[..., window]), a, last)
        assert torch.equal(values, dequantize_int8(whole)[..., a:b])


@pytest.mark.parametrize("shape", [(7, 300), (5, 256), (3, 4, 513), (17,), ()])
def test_int8_error_is_within_half_a_step_to_nearest_and_one_step_stochastically(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1] if shape else 1)
    q = quantize_int8(x)
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert q.scales.shape == ((*shape[:-1], group_count(shape)) if shape else (1,))
    step = _int8_steps(q, x)
    assert ((dequantize_int8(q) - x).abs() <= step / 2 * (1 + 1e-6)).all()
    stochastic = dequantize_int8(quantize_int8(x, noise(x)))
    assert ((stochastic - x).abs() < step * (1 + 1e-6)).all()


def _int8_steps(q, x):
    """Each element's quantization step (its group's scale), broadcast to x's shape."""
    ones = quantize_int8(torch.ones_like(x))  # codes 127 everywhere: 127 * scale = 1
    step = dequantize_int8(q._replace(codes=ones.codes))
    return step / 127


def test_bf16_error_is_within_half_an_ulp_to_nearest_and_one_ulp_stochastically():
    torch.manual_seed(0)
    x = torch.randn(10000) * 1e3
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)  # bf16's spacing at x
    assert ((to_bfloat16(x).float() - x).abs() <= ulp / 2 * (1 + 1e-6)).all()
    assert ((to_bfloat16(x, noise(x)).float() - x).abs() < ulp * (1 + 1e-6)).all()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    assert torch.equal(to_bfloat16(special, noise(special)).float().isnan(), special.isnan())


@pytest.mark.parametrize("fmt", LOW)
def test_stochastic_rounding_is_unbiased(fmt):
    """A mean over 2000 draws (step counts) of the rounded values is within 4 standard errors
    of the exact values; rounding to nearest is biased by much more."""
    torch.manual_seed(0)
    x = torch.randn(64, 32) * 3
    draws = 2000
    store = ((lambda v, u: to_bfloat16(v, u).float()) if fmt == "bfloat16" else
             (lambda v, u: dequantize_int8(quantize_int8(v, u))))
    total = torch.zeros_like(x)
    for count in range(draws):
        total += store(x, noise(x, count=count))
    mean = total / draws
    step = (x.abs() * 2**-7 if fmt == "bfloat16" else _int8_steps(quantize_int8(x), x))
    standard_error = step / 2 / draws ** 0.5
    assert ((mean - x).abs() <= 4 * standard_error + 1e-7).float().mean() > 0.999
    nearest = store(x, None)
    assert (nearest - x).abs().mean() > 10 * (mean - x).abs().mean()


def run(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("fmt", LOW)
def test_resume_is_bit_exact(fmt):
    torch.manual_seed(0)
    model = TinyLlama(layers=1)
    start = copy.deepcopy(model)
    make = lambda m: amx.AdamMini(m.named_parameters(), lr=1e-2, weight_decay=0.1,  # noqa: E731
                                  momentum_format=fmt, **HEADS)
    opt = make(model)
    run(model, opt, 6)
    first = copy.deepcopy(start)
    opt1 = make(first)
    run(first, opt1, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients as steps 4-6 of the uninterrupted run
        for p in model.parameters():
            torch.randn(p.shape, generator=gen_state)
    for _ in range(3):
        for p in resumed.parameters():
            p.grad = torch.randn(p.shape, generator=gen_state)
        opt2.step()
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(opt.state[a][k], opt2.state[b][k]) for k in opt.state[a]), name


@pytest.mark.parametrize("fmt", LOW)
def test_eager_row_pieces_equal_the_whole_tensor_chain_bit_for_bit(fmt, monkeypatch):
    """With tiny chunks the eager step cuts matrices into row pieces; each piece rounds with its
    member's salt and its elements' indices in the member, so parameters and the stored ``m``
    (bf16, or int8 codes and scales) equal the pure chain's over whole tensors bit for bit."""
    monkeypatch.setattr(eager_backend, "CHUNK_ELEMENTS", 64)
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 4)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, momentum_format=fmt)
    opt = amx.AdamMini(model.named_parameters(), **hyper, **HEADS, native=False)
    work = opt._backends[0].prepare(
        [eager_backend.Member(n, p, p, {"step": torch.tensor(0)}) for n, p in
         model.named_parameters()], opt.plan.layouts(), None)
    assert any("[" in piece.name for chunk in work.chunks for piece in chunk)  # pieces cut
    tx = amx.adam_mini(**hyper, **HEADS)
    state = tx.init(params)
    for grads in grads_seq:
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = amx.apply_updates(params, updates)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        m = state[0].mu[name]
        if fmt == "int8":
            assert torch.equal(opt.state[p]["m"], m.codes), name
            assert torch.equal(opt.state[p]["m_scale"], m.scales), name
        else:
            assert torch.equal(opt.state[p]["m"], m), name


@pytest.mark.parametrize("fmt", LOW)
def test_fused_equals_eager_within_rounding(fmt):
    """Eager (row pieces) and fused (whole members) round ``m`` with the same noise: the stored
    ``m`` (bf16, int8 codes) is equal bit for bit. The compiled arithmetic differs in the last
    bits elsewhere: ``v`` (its reductions) and int8 scales (inductor divides by 127 as a
    multiplication by 1/127) within a few ulps, the parameters within 1e-5 relative."""
    torch.manual_seed(0)
    models = [TinyLlama(layers=3, dim=16, hidden=24, vocab=24) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [amx.AdamMini(m.named_parameters(), lr=1e-2, weight_decay=0.1, momentum_format=fmt,
                         fused=fused, **HEADS) for m, fused in zip(models, (False, True))]
    for model, opt in zip(models, opts):
        run(model, opt, 5)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert ((p - q).abs().max() / p.abs().max()).item() < 1e-5, name
        eager, fused = opts[0].state[p], opts[1].state[q]
        assert eager.keys() == fused.keys() and torch.equal(eager["m"], fused["m"]), name
        for key in ("m_scale", "v"):
            if key in eager:
                torch.testing.assert_close(fused[key], eager[key], rtol=5e-7, atol=0)


@pytest.mark.parametrize("fmt", LOW)
def test_functional_init_and_update_are_pure_under_vmap_and_compile(fmt):
    plan = {"w": amx.per_row((8, 300)), "b": amx.elementwise((8,))}
    tx = amx.adam_mini(lr=1e-2, plan=plan, momentum_format=fmt)
    params = {"w": torch.randn(8, 300), "b": torch.randn(8)}
    state = tx.init(params)
    grads = {"w": torch.randn(8, 300), "b": torch.randn(8)}
    before = copy.deepcopy(state)
    updates, new = tx.update(grads, state, params)
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(before),
                                                 torch.utils._pytree.tree_leaves(state)))

    def one(w, b, gw, gb):
        p, g = {"w": w, "b": b}, {"w": gw, "b": gb}
        return tx.update(g, tx.init(p), p)[0]["w"]

    batched = torch.func.vmap(one)(*(torch.stack([t] * 3) for t in (params["w"], params["b"],
                                                                      grads["w"], grads["b"])))
    assert torch.equal(batched[1], updates["w"])
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), fullgraph=True)
    c_updates, c_state = compiled(grads, state, params)
    torch.testing.assert_close(c_updates["w"], updates["w"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("policy", ["skip", "raise", "apply"])
def test_every_policy_with_every_format(fmt, policy):
    torch.manual_seed(0)
    model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, momentum_format=fmt, nonfinite=policy,
                       **HEADS)
    run(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.norm.weight.grad[0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="norm.weight"):
            opt.step()
    elif policy == "skip":
        with pytest.warns(RuntimeWarning, match="norm.weight"):
            opt.step()
    else:
        opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(model.parameters(), params)) and all(
        torch.equal(v, state[p][k]) for p, s in opt.state.items() for k, v in s.items())
    assert unchanged == (policy != "apply")
    assert torch.isnan(model.norm.weight).any() == (policy == "apply")


def test_state_bytes_per_format_against_fp32_adamw():
    """Measured on real state (a 4-layer, 256-wide Llama): int8 <= 0.135x and bf16 <= 0.26x of
    fp32 AdamW's 8 bytes per parameter; the plan's estimate agrees."""
    model = TinyLlama(vocab=1024, dim=256, layers=4, hidden=688)
    numel = sum(p.numel() for p in model.parameters())
    ratios = {}
    for fmt in (None, "bfloat16", "int8"):
        opt = amx.AdamMini(model.named_parameters(), momentum_format=fmt, **HEADS)
        run(model, opt, 1)
        bytes_ = sum(v.numel() * v.element_size() for s in opt.state.values()
                     for k, v in s.items() if k != "step")
        ratios[fmt] = bytes_ / (8 * numel)
        assert bytes_ == opt.plan.state_bytes_as(fmt)
    assert ratios["int8"] <= 0.135 and ratios["bfloat16"] <= 0.26 and ratios[None] <= 0.51


def test_a_checkpoint_of_another_format_is_refused_and_formats_are_checked():
    model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), momentum_format="int8", **HEADS)
    run(model, opt, 1)
    with pytest.raises(ValueError, match="saved with momentum_format='int8'.*same format"):
        amx.AdamMini(model.named_parameters(), **HEADS).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="invalid momentum_format='int4'"):
        amx.AdamMini(model.named_parameters(), momentum_format="int4", **HEADS)
    with pytest.raises(ValueError, match="invalid momentum_format"):
        amx.adam_mini(momentum_format="fp8")


def test_the_drop_in_takes_a_momentum_format():
    model = TinyLlama(layers=1)
    opt = amx.Adam_mini(model.named_parameters(), lr=1e-3, dim=32, n_heads=4, n_kv_heads=2,
                        verbose=False, momentum_format="int8")
    run(model, opt, 1)
    assert opt.state[model.layers[0].mlp.up_proj.weight]["m"].dtype == torch.int8
