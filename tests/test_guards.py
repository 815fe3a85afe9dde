"""nonfinite_guard: the non-finite-gradient policy of the functional core."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import adam_mini_tx as amx
from adam_mini_tx.core.guards import all_finite, nonfinite_guard

PARAMS = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}


def grads(bad=None):
    g = {k: torch.ones_like(v) for k, v in PARAMS.items()}
    if bad is not None:
        g["a.bias"] = g["a.bias"].clone()
        g["a.bias"][1] = bad
    return g


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_leaves_params_and_state_untouched_and_counts(bad):
    tx = nonfinite_guard(amx.adam_mini(lr=0.1, weight_decay=0.1))
    state = tx.init(PARAMS)
    _, state = tx.update(grads(), state, PARAMS)
    updates, skipped = tx.update(grads(bad), state, PARAMS)
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())
    before = torch.utils._pytree.tree_leaves(state.inner)
    after = torch.utils._pytree.tree_leaves(skipped.inner)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert int(skipped.skipped) == 1
    # the next finite step continues exactly as if the bad step never happened
    resumed, _ = tx.update(grads(), skipped, PARAMS)
    reference, _ = tx.update(grads(), state, PARAMS)
    assert all(torch.equal(resumed[k], reference[k]) for k in PARAMS)


def test_raise_names_the_parameter():
    tx = nonfinite_guard(amx.adam_mini(), policy="raise")
    with pytest.raises(FloatingPointError, match=r"\['a.bias'\]"):
        tx.update(grads(float("nan")), tx.init(PARAMS), PARAMS)


def test_apply_counts_but_applies():
    tx = nonfinite_guard(amx.adam_mini(lr=0.1), policy="apply")
    updates, state = tx.update(grads(float("nan")), tx.init(PARAMS), PARAMS)
    assert torch.isnan(updates["a.bias"]).any() and int(state.skipped) == 1


def test_skip_compiles_to_one_graph():
    tx = nonfinite_guard(amx.adam_mini(lr=0.1))
    counter = CompileCounter()
    step = torch.compile(lambda g, s: tx.update(g, s, PARAMS), backend=counter, fullgraph=True)
    state = tx.init(PARAMS)
    for bad in (None, float("nan"), None):
        _, state = step(grads(bad), state)
    assert counter.frame_count == 1 and int(state.skipped) == 1


def test_skip_under_vmap_skips_only_the_members_with_a_bad_gradient():
    """An ensemble of 4 members under vmap; members 1 and 3 get a NaN / Inf gradient."""
    tx = nonfinite_guard(amx.adam_mini(lr=0.1, weight_decay=0.1))
    stacked = {k: torch.stack([v + i for i in range(4)]) for k, v in PARAMS.items()}
    grads_ = {k: torch.randn(4, *v.shape) for k, v in PARAMS.items()}
    grads_["a.bias"][1, 0] = float("nan")
    grads_["a.weight"][3, 2, 1] = float("inf")

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return amx.apply_updates(params, updates), state

    states = torch.func.vmap(tx.init)(stacked)
    new_params, new_states = torch.func.vmap(step)(stacked, grads_, states)
    assert new_states.skipped.tolist() == [0, 1, 0, 1]
    for member in range(4):
        alone = {k: v[member] for k, v in stacked.items()}
        expected, _ = step(alone, {k: v[member] for k, v in grads_.items()}, tx.init(alone))
        for name in PARAMS:
            assert torch.equal(new_params[name][member], expected[name]), (member, name)
        if member in (1, 3):
            assert all(torch.equal(new_params[k][member], alone[k]) for k in PARAMS)


def test_all_finite_on_large_finite_values_and_dtypes():
    """The sum-based check must not call large but finite float64 values non-finite."""
    assert bool(all_finite({"w": torch.full((4,), 1e300, dtype=torch.float64)}))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.ones(5, dtype=dtype)
        assert bool(all_finite({"w": t}))
        t[2] = float("nan")
        assert not bool(all_finite({"ok": torch.ones(3), "w": t}))
    mixed = {"half": torch.ones(3, dtype=torch.bfloat16), "big": torch.full((2,), 1e300,
             dtype=torch.float64), "single": torch.ones(4)}
    assert bool(all_finite(mixed))
    mixed["half"][0] = float("inf")
    assert not bool(all_finite(mixed))


def test_unknown_policy():
    with pytest.raises(ValueError, match="nonfinite policy 'drop'"):
        nonfinite_guard(amx.adam_mini(), policy="drop")
