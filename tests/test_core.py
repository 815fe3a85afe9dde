"""Purity, torch.func smoke tests, dtypes and input validation of the functional core."""
import pytest
import torch
from torch.func import grad, vmap

import adam_mini_tx as amx

PLAN_KW = dict(n_heads=2, n_kv_heads=1)


def llama_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (10, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
              "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8),
              "model.layers.0.input_layernorm.weight": (8,), "lm_head.bias": (10,)}
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def test_update_never_mutates_its_inputs():
    params = llama_params()
    grads = llama_params(seed=1)
    tx = amx.adam_mini(lr=0.1, weight_decay=0.1, **PLAN_KW)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # a non-zero state
    snapshot = [t.clone() for t in torch.utils._pytree.tree_leaves((params, grads, state))]
    tx.update(grads, state, params)
    after = torch.utils._pytree.tree_leaves((params, grads, state))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_step_count_lives_in_the_state_as_a_tensor():
    tx = amx.adam_mini(**PLAN_KW)
    params = llama_params()
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(llama_params(seed=2), state, params)
    counts = [s.count for s in state if "count" in getattr(s, "_fields", ())]
    assert counts and all(isinstance(c, torch.Tensor) and c.dim() == 0 and int(c) == 3
                          for c in counts)


def test_runs_under_torch_func_grad():
    """Differentiate the loss after one update with respect to the learning rate."""
    params = llama_params(torch.float64)
    grads = llama_params(torch.float64, seed=3)

    def loss_after_step(lr):
        tx = amx.adam_mini(lr=lr, **PLAN_KW)
        updates, _ = tx.update(grads, tx.init(params), params)
        new = amx.apply_updates(params, updates)
        return sum((p ** 2).sum() for p in new.values())

    lr = torch.tensor(0.01, dtype=torch.float64)
    d_lr = grad(loss_after_step)(lr)
    h = 1e-6
    fd = (loss_after_step(lr + h) - loss_after_step(lr - h)) / (2 * h)
    torch.testing.assert_close(d_lr, fd, rtol=1e-6, atol=1e-8)


def test_runs_under_vmap_like_separate_runs():
    members = [llama_params(seed=s) for s in range(3)]
    grads = [llama_params(seed=10 + s) for s in range(3)]
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
    tx = amx.adam_mini(lr=0.1, weight_decay=0.1, **PLAN_KW)

    def step(params, g):
        updates, _ = tx.update(g, tx.init(params), params)
        return amx.apply_updates(params, updates)

    batched = vmap(step)(stack(members), stack(grads))
    for i, (p, g) in enumerate(zip(members, grads)):
        single = step(p, g)
        for k in p:
            torch.testing.assert_close(batched[k][i], single[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_their_dtype_and_state_follows(dtype):
    params = llama_params(dtype)
    tx = amx.adam_mini(lr=1e-2, **PLAN_KW)
    state = tx.init(params)
    updates, state = tx.update(llama_params(dtype, seed=4), state, params)
    new = amx.apply_updates(params, updates)
    assert all(p.dtype == dtype for p in new.values())
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if t.is_floating_point()]
    assert leaves and all(t.dtype == dtype for t in leaves)
    assert all(torch.isfinite(p.float()).all() for p in new.values())


def test_fp32_state_for_bf16_params():
    params = llama_params(torch.bfloat16)
    tx = amx.adam_mini(lr=1e-2, state_dtype=torch.float32, **PLAN_KW)
    state = tx.init(params)
    updates, state = tx.update(llama_params(torch.bfloat16, seed=4), state, params)
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if t.is_floating_point()]
    assert leaves and all(t.dtype == torch.float32 for t in leaves)
    new = amx.apply_updates(params, updates)
    assert all(p.dtype == torch.bfloat16 for p in new.values())
    # fp32 state computes the same first step as an fp32 run, up to the final bf16 rounding
    ref_params = {k: v.float() for k, v in params.items()}
    ref_tx = amx.adam_mini(lr=1e-2, **PLAN_KW)
    ref_updates, _ = ref_tx.update({k: v.float() for k, v in llama_params(torch.bfloat16, seed=4).items()},
                                   ref_tx.init(ref_params), ref_params)
    for k in params:
        torch.testing.assert_close(updates[k], ref_updates[k])


# ----- bad input -----------------------------------------------------------------------------
def test_n_heads_that_does_not_divide_names_the_parameter():
    params = llama_params()
    with pytest.raises(ValueError, match=r"q_proj.*n_heads=3 does not divide"):
        amx.adam_mini(n_heads=3).init(params)


def test_missing_n_heads_for_attention_is_a_clear_error():
    with pytest.raises(ValueError, match=r"q_proj.*pass n_heads="):
        amx.adam_mini().init(llama_params())


def test_grads_with_other_keys_or_shapes_name_the_parameter():
    params = llama_params()
    tx = amx.adam_mini(**PLAN_KW)
    state = tx.init(params)
    grads = llama_params(seed=1)
    missing = {k: v for k, v in grads.items() if k != "lm_head.bias"}
    with pytest.raises(ValueError, match="lm_head.bias"):
        tx.update(missing, state, params)
    wrong = dict(grads, **{"lm_head.bias": torch.zeros(11)})
    with pytest.raises(ValueError, match=r"'lm_head.bias'.*shape \(11,\)"):
        tx.update(wrong, state, params)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]=1.0"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]=-0.1"),
    (dict(betas=0.9), "pair"),
    (dict(eps=-1.0), "eps=-1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
])
@pytest.mark.parametrize("alias", [amx.adam_mini, amx.adamw])
def test_out_of_range_hyperparameters_raise(alias, kwargs, message):
    with pytest.raises(ValueError, match=message):
        alias(**kwargs)


def test_plan_that_misses_a_parameter_is_a_clear_error():
    params = llama_params()
    plan = amx.plan_blocks({k: v for k, v in params.items() if "lm_head" not in k}, **PLAN_KW)
    with pytest.raises(ValueError, match="'lm_head.bias' is not covered by the block plan"):
        amx.adam_mini(plan=plan).init(params)


def test_plan_for_other_shapes_is_a_clear_error():
    params = llama_params()
    plan = amx.plan_blocks(params, **PLAN_KW)
    params["lm_head.bias"] = torch.zeros(12)
    with pytest.raises(ValueError, match=r"'lm_head.bias' has shape \(12,\).*rebuild the plan"):
        amx.adam_mini(plan=plan).init(params)
