"""Generic properties checked for every optimizer the library exports (alias.OPTIMIZERS)."""
import inspect

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.func import grad, vmap

import adam_mini_tx as amx
from adam_mini_tx.functional.alias import OPTIMIZERS
from adam_mini_tx.core.base import GradientTransformation

KWARGS = {"adam_mini": dict(n_heads=2)}


def make(name, **kw):
    return OPTIMIZERS[name](lr=1e-2, **KWARGS.get(name, {}), **kw)


def params_of(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed_tokens.weight": (6, 4), "q_proj.weight": (4, 4), "mlp.up_proj.weight": (8, 4),
              "norm.weight": (4,), "mlp.up_proj.bias": (8,)}
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def test_every_exported_optimizer_is_in_the_registry():
    exported = {n for n in amx.__all__ if inspect.isfunction(getattr(amx, n))
                and "lr" in inspect.signature(getattr(amx, n)).parameters
                and inspect.signature(getattr(amx, n)).return_annotation in
                (GradientTransformation, "GradientTransformation")
                and n not in ("scale_by_lr",)}
    assert exported == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_preserved(name, dtype):
    params = params_of(dtype)
    tx = make(name)
    state = tx.init(params)
    for seed in range(2):
        updates, state = tx.update(params_of(dtype, seed + 1), state, params)
        params = amx.apply_updates(params, updates)
    assert all(p.dtype == dtype and torch.isfinite(p.float()).all() for p in params.values())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_structure_is_stable_across_steps(name):
    params = params_of()
    tx = make(name)
    state = tx.init(params)
    leaves0, spec0 = torch.utils._pytree.tree_flatten(state)
    for seed in range(3):
        _, state = tx.update(params_of(seed=seed + 1), state, params)
        leaves, spec = torch.utils._pytree.tree_flatten(state)
        assert spec == spec0
        assert [(t.shape, t.dtype) for t in leaves] == [(t.shape, t.dtype) for t in leaves0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_second_compiled_step_does_not_recompile(name):
    params = params_of()
    tx = make(name, weight_decay=0.1)
    counter = CompileCounter()
    step = torch.compile(lambda g, s, p: tx.update(g, s, p), backend=counter, fullgraph=True)
    state = tx.init(params)
    for seed in range(3):
        _, state = step(params_of(seed=seed + 1), state, params)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_works_under_vmap(name):
    members = [params_of(seed=s) for s in range(3)]
    grads = [params_of(seed=10 + s) for s in range(3)]
    stack = lambda ds: {k: torch.stack([d[k] for d in ds]) for k in ds[0]}
    tx = make(name, weight_decay=0.1)
    step = lambda p, g: tx.update(g, tx.init(p), p)[0]
    batched = vmap(step)(stack(members), stack(grads))
    for i in range(3):
        single = step(members[i], grads[i])
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_works_under_grad(name):
    params = {k: v.double() for k, v in params_of().items()}
    grads = {k: v.double() for k, v in params_of(seed=3).items()}
    tx = make(name, weight_decay=0.1)

    def loss_after(params):
        updates, _ = tx.update(grads, tx.init(params), params)
        return sum((p ** 2).sum() for p in amx.apply_updates(params, updates).values())

    d = grad(loss_after)(params)
    assert all(torch.isfinite(t).all() for t in d.values())
