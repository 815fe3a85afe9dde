"""Each public transform on its own: its docstring math, its state, its errors."""
import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx import blocks

torch.manual_seed(0)
PARAMS = {"a.weight": torch.randn(6, 4, dtype=torch.float64),
          "a.bias": torch.randn(6, dtype=torch.float64)}
GRADS = [{k: torch.randn_like(v) for k, v in PARAMS.items()} for _ in range(3)]
ROWS_PLAN = {"a.weight": blocks.per_row((6, 4)), "a.bias": blocks.single_block((6,))}


def run(tx, grads_seq, params=PARAMS):
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        out, state = tx.update(g, state, params)
        outs.append(out)
    return outs, state


def test_momentum_is_bias_corrected_ema():
    b1 = 0.8
    outs, state = run(amx.momentum(b1), GRADS)
    m = {k: torch.zeros_like(v) for k, v in PARAMS.items()}
    for t, g in enumerate(GRADS, start=1):
        for k in m:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            torch.testing.assert_close(outs[t - 1][k], m[k] / (1 - b1 ** t))
    assert int(state.count) == 3
    torch.testing.assert_close(state.mu["a.weight"], m["a.weight"])


def test_nesterov_momentum_looks_one_step_ahead():
    b1 = 0.9
    outs, _ = run(amx.momentum(b1, nesterov=True), GRADS[:2])
    m1 = (1 - b1) * GRADS[0]["a.weight"]
    m2 = b1 * m1 + (1 - b1) * GRADS[1]["a.weight"]
    expected = b1 * m2 / (1 - b1 ** 3) + (1 - b1) * GRADS[1]["a.weight"] / (1 - b1 ** 2)
    torch.testing.assert_close(outs[1]["a.weight"], expected)


def test_blockwise_mean_square_alone_divides_by_block_rms_ema():
    b2, eps = 0.9, 1e-8
    outs, state = run(amx.blockwise_mean_square(b2, ROWS_PLAN, eps=eps), GRADS[:2])
    v_rows = torch.zeros(6, dtype=torch.float64)
    for t, g in enumerate(GRADS[:2], start=1):
        v_rows = b2 * v_rows + (1 - b2) * g["a.weight"].pow(2).mean(1)
        denom = (v_rows / (1 - b2 ** t)).sqrt()[:, None] + eps
        torch.testing.assert_close(outs[t - 1]["a.weight"], g["a.weight"] / denom)
    assert state.nu["a.weight"].shape == (6,)
    assert state.nu["a.bias"].shape == ()


def test_adam_mini_and_laprop_differ_only_in_order():
    """chain(momentum, bms) divides the momentum; chain(bms, momentum) is LaProp."""
    b1, b2 = 0.9, 0.99
    mini, _ = run(amx.chain(amx.momentum(b1), amx.blockwise_mean_square(b2, ROWS_PLAN, eps=0.0)),
                  GRADS[:2])
    laprop, _ = run(amx.chain(amx.blockwise_mean_square(b2, ROWS_PLAN, eps=0.0), amx.momentum(b1)),
                    GRADS[:2])
    g1, g2 = GRADS[0]["a.weight"], GRADS[1]["a.weight"]
    v1 = (1 - b2) * g1.pow(2).mean(1, keepdim=True)
    v2 = b2 * v1 + (1 - b2) * g2.pow(2).mean(1, keepdim=True)
    r1, r2 = (v1 / (1 - b2)).sqrt(), (v2 / (1 - b2 ** 2)).sqrt()
    m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
    torch.testing.assert_close(mini[1]["a.weight"], m2 / (1 - b1 ** 2) / r2)
    n2 = b1 * (1 - b1) * g1 / r1 + (1 - b1) * g2 / r2
    torch.testing.assert_close(laprop[1]["a.weight"], n2 / (1 - b1 ** 2))


def test_decoupled_decay_adds_wd_times_param_and_follows_a_schedule():
    outs, _ = run(amx.decoupled_decay(lambda count: 0.1 * count), GRADS[:2])
    for t in (1, 2):
        torch.testing.assert_close(outs[t - 1]["a.weight"],
                                   GRADS[t - 1]["a.weight"] + 0.1 * t * PARAMS["a.weight"])


def test_decoupled_decay_needs_params():
    tx = amx.decoupled_decay(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(GRADS[0], tx.init(PARAMS))


def test_scale_by_lr_float_schedule_and_tensor():
    outs, _ = run(amx.scale_by_lr(0.5), GRADS[:1])
    torch.testing.assert_close(outs[0]["a.bias"], -0.5 * GRADS[0]["a.bias"])
    outs, _ = run(amx.scale_by_lr(lambda count: 1.0 / count.double()), GRADS[:2])
    torch.testing.assert_close(outs[1]["a.bias"], -0.5 * GRADS[1]["a.bias"])
    lr = torch.tensor(0.25, dtype=torch.float64)
    tx = amx.scale_by_lr(lr)
    state = tx.init(PARAMS)
    lr.fill_(0.125)  # changed in place after construction: the next update sees it
    out, _ = tx.update(GRADS[0], state, PARAMS)
    torch.testing.assert_close(out["a.bias"], -0.125 * GRADS[0]["a.bias"])


def test_partition_routes_each_parameter_and_its_state():
    tx = amx.partition({"big": amx.scale_by_lr(1.0), "small": amx.identity()},
                       lambda name, p: "big" if p.dim() == 2 else "small")
    outs, state = run(tx, GRADS[:1])
    torch.testing.assert_close(outs[0]["a.weight"], -GRADS[0]["a.weight"])
    torch.testing.assert_close(outs[0]["a.bias"], GRADS[0]["a.bias"])
    assert list(outs[0]) == list(PARAMS)
    assert set(state.inner) == {"big", "small"}


def test_partition_rejects_unknown_labels():
    tx = amx.partition({"x": amx.identity()}, {"a.weight": "x", "a.bias": "y"})
    with pytest.raises(ValueError, match="'a.bias' has label 'y'"):
        tx.init(PARAMS)


def test_chain_passes_raw_gradient_to_every_transform():
    seen = {}

    def spy() -> amx.GradientTransformation:
        def update(updates, state, params=None, grads=None):
            seen["grads"] = grads
            return updates, state
        return amx.GradientTransformation(lambda p: (), update)

    tx = amx.chain(amx.scale_by_lr(2.0), spy())
    tx.update(GRADS[0], tx.init(PARAMS), PARAMS)
    assert seen["grads"] is GRADS[0]


def test_chain_rejects_foreign_state():
    tx = amx.chain(amx.identity(), amx.identity())
    with pytest.raises(ValueError, match="chain state has 1 entries"):
        tx.update(GRADS[0], ((),), PARAMS)


def test_apply_updates_adds_and_keeps_dtype():
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    new = amx.apply_updates(params, {"w": torch.full((3,), 0.5)})
    assert new["w"].dtype == torch.bfloat16
    assert torch.equal(new["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(params["w"], torch.ones(3, dtype=torch.bfloat16))


def test_safe_sqrt_has_finite_gradient_at_zero():
    x = torch.tensor([0.0, 4.0], requires_grad=True)
    y = amx.safe_sqrt(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 0.25]))


def test_safe_sqrt_is_the_plain_root_where_no_derivative_can_be_taken():
    x = torch.tensor([0.0, 4.0, 2.0])
    with torch.no_grad():
        assert torch.equal(amx.safe_sqrt(x.requires_grad_()), torch.sqrt(x))
    x = x.detach()
    assert torch.equal(amx.safe_sqrt(x), torch.sqrt(x))
    meta = torch.func.grad(lambda t: amx.safe_sqrt(t).sum())(torch.tensor([0.0, 4.0]))
    assert torch.equal(meta, torch.tensor([0.0, 0.25]))  # inside torch.func: still safe at 0
