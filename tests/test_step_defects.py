"""Regression tests for the step rebuild: one per defect found by trying the optimizer as a user
would (duplicate names, fp16 and overflowing statistics, half-installed groups, recompiles,
unchecked tensor hyperparameters, half-applied steps, the guard's gradient, load hooks, wrapper
prefixes, the fused statistics of many buckets, Python-int steps), and that a failing step,
``add_param_group`` or ``load_state_dict`` changes nothing."""
import copy
import io

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from test_oracles import TinyLlama, gradient_sequence, initial_params
from test_optim import HEADS, LM, batches, feed, random_grads, train


def snapshot(opt):
    """Every parameter, state tensor and group value, copied."""
    params = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: (list(v) if k in ("params", "param_names") else copy.deepcopy(v))
               for k, v in group.items()} for group in opt.param_groups]
    return params, state, groups, opt.plan


def assert_unchanged(opt, before):
    params, state, groups, plan = before
    now = [p.detach() for group in opt.param_groups for p in group["params"]]
    assert len(now) == len(params) and all(torch.equal(a, b) for a, b in zip(now, params))
    assert {id(p) for p in opt.state} == set(state)
    for p, slots in opt.state.items():
        assert set(slots) == set(state[id(p)])
        assert all(torch.equal(slots[k], state[id(p)][k]) for k in slots)
    assert len(opt.param_groups) == len(groups)
    for group, saved in zip(opt.param_groups, groups):
        assert set(group) == set(saved)
        for key, value in saved.items():
            if key == "params":
                assert all(a is b for a, b in zip(group[key], value))
            else:
                assert same(group[key], value), key
    assert opt.plan is plan


def stepped():
    """A TinyLlama, an AdamMini after one step, and its state dict."""
    model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    random_grads(model)
    opt.step()
    return model, opt, opt.state_dict()


def same(a, b) -> bool:
    """Equal values, tensors (NaN included) and tuples of them alike."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b) or bool(a.isnan().all() and b.isnan().all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# 1. one name for two tensors ----------------------------------------------------------------
def test_duplicate_names_are_refused_naming_both_owners():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"two different tensors are named 'weight'.*group 0.*"
                                         r"group 0.*prefix them.*plan="):
        amx.AdamMini(list(a.named_parameters()) + list(b.named_parameters()))
    gen, disc = nn.Linear(4, 8), nn.Linear(8, 1)
    with pytest.raises(ValueError, match=r"named 'weight': one of shape \(8, 4\) in param group 0 "
                                         r"and one of shape \(1, 8\) in param group 1"):
        amx.AdamMini([{"params": gen.named_parameters()}, {"params": disc.named_parameters()}])
    opt = amx.AdamMini([{"params": [("gen." + n, p) for n, p in gen.named_parameters()]}])
    before = snapshot(opt)
    with pytest.raises(ValueError, match="two different tensors are named 'gen.weight'"):
        opt.add_param_group({"params": [("gen.weight", disc.weight)]})
    assert_unchanged(opt, before)


# 2. fp16 statistics --------------------------------------------------------------------------
def test_fp16_rows_whose_sum_of_squares_overflows_fp16_still_train():
    """|g| = 4 on 4096-wide rows: the sum of squares (65536) overflows fp16; it is accumulated
    in fp32, so v stays finite and the layer moves every step, as under AdamW."""
    torch.manual_seed(0)
    layer = nn.Linear(4096, 8, bias=False).to(torch.float16)
    start = layer.weight.detach().clone()
    opt = amx.AdamMini(layer.named_parameters(), lr=1e-2)
    for _ in range(3):
        layer.weight.grad = torch.full_like(layer.weight, 4.0)
        moved = layer.weight.detach().clone()
        opt.step()
        assert not torch.equal(layer.weight, moved)
    v = opt.state[layer.weight]["v"]
    assert v.dtype == torch.float16 and torch.isfinite(v).all()
    torch.testing.assert_close(v.float(), torch.full((8,), 16 * (1 - 0.999 ** 3)), rtol=1e-2,
                               atol=0)
    assert (layer.weight < start).all()
    amx.AdamMini(layer.named_parameters()).load_state_dict(opt.state_dict())


# 3. finite but huge gradients ----------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_a_finite_huge_gradient_keeps_v_finite_and_the_state_dict_loads(fused):
    """One element of 3e19 in fp32: its square overflows fp32, (1 - b2) g**2 does not (AdamW
    holds it); v stays finite, training goes on, and the state dict loads back."""
    torch.manual_seed(0)
    model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-3, fused=fused, **HEADS)
    grads_seq = gradient_sequence(initial_params(model), 3, seed=1)
    grads_seq[1]["layers.0.mlp.down_proj.weight"][2, 0] = 3e19
    feed(model, opt, grads_seq)
    v = opt.state[model.layers[0].mlp.down_proj.weight]["v"]
    assert torch.isfinite(v).all() and v[2] > 1e30
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {int(s["step"]) for s in opt.state.values()} == {3}
    fresh = amx.AdamMini(model.named_parameters(), lr=1e-3, **HEADS)
    fresh.load_state_dict(opt.state_dict())


def test_an_infinite_v_left_by_an_older_overflow_still_loads():
    model, _, saved = stepped()
    first = next(iter(saved["state"]))
    saved["state"][first]["v"].fill_(float("inf"))
    amx.AdamMini(model.named_parameters(), **HEADS).load_state_dict(saved)


# 4. add_param_group with a bad value ---------------------------------------------------------
def test_a_refused_param_group_leaves_the_optimizer_as_it_was():
    torch.manual_seed(0)
    model, extra = TinyLlama(layers=1), nn.Linear(32, 32)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)
    random_grads(model)
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1: invalid lr=-1.0"):
        opt.add_param_group({"params": [("extra.weight", extra.weight)], "lr": -1.0})
    assert_unchanged(opt, before)
    opt.add_param_group({"params": [("extra.weight", extra.weight)], "lr": 1e-3})
    extra.weight.grad = torch.randn_like(extra.weight)
    opt.step()
    assert int(opt.state[extra.weight]["step"]) == 1
    fresh = amx.AdamMini([{"params": list(zip(g["param_names"], g["params"]))}
                          for g in opt.param_groups], **HEADS)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[1]["lr"] == 1e-3


# 5. schedulers that rewrite betas ------------------------------------------------------------
def test_one_cycle_with_momentum_and_a_reload_never_recompile():
    """OneCycleLR rewrites betas every step and load_state_dict replaces the groups: the fused
    step compiles once (hyperparameters are tensor arguments, not constants)."""
    torch.manual_seed(0)
    model = LM()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, fused=True, **HEADS)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8,
                                                   cycle_momentum=True)
    data = batches(8)
    train(model, opt, data[:1], scheduler)
    compiled = opt.compile_seconds
    betas = []
    for tokens in data[1:6]:
        train(model, opt, [tokens], scheduler)
        betas.append(opt.param_groups[0]["betas"][0])
    opt.load_state_dict(opt.state_dict())
    losses = train(model, opt, data[6:], scheduler)
    assert len(set(betas)) == 5  # beta1 moved every step
    assert opt.compile_seconds == compiled and losses[-1] < losses[0] * 1.5
    eager = amx.AdamMini(LM().named_parameters(), lr=1e-2, **HEADS)
    assert eager.compile_seconds == 0.0


# 6. tensor hyperparameters -------------------------------------------------------------------
BAD_TENSORS = [
    (dict(lr=torch.tensor(float("nan"))), r"invalid lr=nan"),
    (dict(lr=torch.tensor(-1.0)), r"invalid lr=-1.0"),
    (dict(betas=(torch.tensor(1.0), 0.999)), r"invalid betas\[0\]=1.0"),
    (dict(eps=torch.tensor(-1e-8, dtype=torch.float64)), r"invalid eps=-1e-08"),
    (dict(weight_decay=torch.tensor(float("nan"))), r"invalid weight_decay=nan"),
]


@pytest.mark.parametrize("kwargs, message", BAD_TENSORS)
def test_tensor_hyperparameters_are_checked_like_floats(kwargs, message):
    model = TinyLlama(layers=1)
    with pytest.raises(ValueError, match=message):
        amx.AdamMini(model.named_parameters(), **kwargs, **HEADS)
    with pytest.raises(ValueError, match=message):
        amx.adam_mini(**kwargs, **HEADS)
    model, opt, saved = stepped()
    for key, value in kwargs.items():
        saved["param_groups"][0][key] = value
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert_unchanged(opt, before)
    for key, value in kwargs.items():  # a scheduler (or a user) writing the group
        opt.param_groups[0][key] = value
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(opt, before)


# 7. a one-element lr and a 0-d parameter -----------------------------------------------------
def test_a_one_element_lr_tensor_steps_a_0d_parameter_like_a_float_lr():
    params = [{"scale": nn.Parameter(torch.tensor(2.0)), "w": nn.Parameter(torch.ones(3, 4))}
              for _ in range(2)]
    opts = [amx.AdamMini(list(p.items()), lr=lr)
            for p, lr in zip(params, (torch.tensor([1e-2]), 1e-2))]
    for _ in range(3):
        for p, opt in zip(params, opts):
            for t in p.values():
                t.grad = torch.full_like(t, 0.5)
            opt.step()
    for name in ("scale", "w"):
        assert torch.equal(params[0][name], params[1][name]), name
        assert int(opts[0].state[params[0][name]]["step"]) == 3


# 8. nonfinite_guard sees the raw gradient ----------------------------------------------------
def test_a_guard_inside_a_chain_takes_and_checks_the_raw_gradient():
    plan = {"w": amx.per_row((3, 4))}
    params = {"w": torch.randn(3, 4)}
    grads = [{"w": torch.randn(3, 4)} for _ in range(3)]
    plain = amx.chain(amx.momentum(0.9), amx.blockwise_mean_square(0.999, plan))
    guarded = amx.chain(amx.momentum(0.9),
                        amx.nonfinite_guard(amx.blockwise_mean_square(0.999, plan), "skip"))
    states = [plain.init(params), guarded.init(params)]
    for g in grads:
        (u1, states[0]), (u2, states[1]) = (plain.update(g, states[0], params),
                                            guarded.update(g, states[1], params))
        assert torch.equal(u1["w"], u2["w"])
    assert torch.equal(states[0][1].nu["w"], states[1][1].inner.nu["w"])
    nan = {"w": torch.full((3, 4), float("nan"))}
    _, after = guarded.update(nan, states[1], params)
    assert int(after[1].skipped) == 1
    assert torch.equal(after[1].inner.nu["w"], states[1][1].inner.nu["w"])


# 9. load hooks -------------------------------------------------------------------------------
def test_load_hooks_run_where_torch_runs_them():
    """A pre-hook sees the dict before any check (it may repair it); a post-hook's changes
    stay."""
    model, opt, saved = stepped()
    saved["param_groups"][0]["lr"] = "broken"  # the hook repairs it before the checks

    def repair(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 5e-3
        return state_dict

    def after(optimizer):
        optimizer.param_groups[0]["lr"] = 7e-3

    fresh = amx.AdamMini(model.named_parameters(), **HEADS)
    fresh.register_load_state_dict_pre_hook(repair)
    fresh.register_load_state_dict_post_hook(after)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 7e-3
    assert torch.equal(fresh.state[model.norm.weight]["v"], opt.state[model.norm.weight]["v"])


# 10. resume across wrappers ------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_a_checkpoint_saved_through_a_wrapper_resumes_into_the_plain_model_and_back(prefix):
    torch.manual_seed(0)
    model = TinyLlama(layers=1)
    wrapped = amx.AdamMini([(prefix + n, p) for n, p in model.named_parameters()], **HEADS)
    random_grads(model)
    wrapped.step()
    plain = amx.AdamMini(model.named_parameters(), **HEADS)
    plain.load_state_dict(wrapped.state_dict())
    assert plain.param_groups[0]["param_names"][0] == "embed_tokens.weight"
    for p in model.parameters():
        assert torch.equal(plain.state[p]["m"], wrapped.state[p]["m"])
    again = amx.AdamMini([(prefix + n, p) for n, p in model.named_parameters()], **HEADS)
    again.load_state_dict(plain.state_dict())
    assert int(again.state[model.norm.weight]["step"]) == 1


def test_a_compiled_model_checkpoint_resumes_into_the_plain_model():
    model = TinyLlama(layers=1)
    compiled = torch.compile(model)
    opt = amx.AdamMini(compiled.named_parameters(), **HEADS)
    assert opt.param_groups[0]["param_names"][0].startswith("_orig_mod.")
    random_grads(model)
    opt.step()
    amx.AdamMini(model.named_parameters(), **HEADS).load_state_dict(opt.state_dict())


def test_names_that_differ_otherwise_say_which_prefix():
    model = TinyLlama(layers=1)
    named = list(model.named_parameters())
    mixed = [(("module." if i % 2 else "") + n, p) for i, (n, p) in enumerate(named)]
    opt = amx.AdamMini(mixed, **HEADS)
    with pytest.raises(ValueError, match=r"holds 'module.layers.0.self_attn.q_proj.weight'.*"
                                         r"prefix 'module.', but not all of them alike"):
        amx.AdamMini(named, **HEADS).load_state_dict(opt.state_dict())


# 12. Python-int steps ------------------------------------------------------------------------
def test_a_python_int_step_loads_as_a_count():
    model, _, saved = stepped()
    for slots in saved["state"].values():
        slots["step"] = 4
    fresh = amx.AdamMini(model.named_parameters(), **HEADS)
    fresh.load_state_dict(saved)
    random_grads(model)
    fresh.step()
    assert {int(s["step"]) for s in fresh.state.values()} == {5}
    assert all(s["step"].dtype == torch.int64 for s in fresh.state.values())


# a failing step changes nothing --------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_a_failing_step_changes_nothing(fused):
    torch.manual_seed(0)
    model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, nonfinite="raise", fused=fused,
                       **HEADS)
    random_grads(model)
    model.norm.weight.grad = None  # its state is created by a later step
    opt.step()
    failures = [
        (lambda: setattr(model.layers[0].mlp.up_proj.weight, "grad",
                         torch.randn(64, 32).to_sparse()), ValueError,
         "'layers.0.mlp.up_proj.weight' has a sparse gradient"),
        (lambda: model.layers[0].mlp.up_proj.weight.grad.__setitem__((0, 0), float("nan")),
         FloatingPointError, "non-finite gradient in .*up_proj"),
        (lambda: opt.param_groups[0].update(eps=float("inf")), ValueError, "invalid eps=inf"),
        (lambda: opt.param_groups[0]["params"].append(nn.Parameter(torch.ones(2))), ValueError,
         r"\d+ parameters but \d+ param_names"),
    ]
    for break_it, error, message in failures:
        random_grads(model)
        before = snapshot(opt)
        groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                       for g in opt.param_groups])
        break_it()
        with pytest.raises(error, match=message):
            opt.step()
        assert {id(p) for p in opt.state} == set(before[1])  # no state made for norm.weight
        params, state, _, _ = before
        assert all(torch.equal(a, b) for a, b in zip(
            [p for g in opt.param_groups for p in g["params"]], params))
        for p, slots in opt.state.items():
            assert all(torch.equal(slots[k], state[id(p)][k]) for k in slots)
        opt.param_groups[:] = [{**g, "params": g["params"][:len(g["param_names"])]}
                               for g in opt.param_groups]
        for group, saved in zip(opt.param_groups, groups_before):
            group.update(saved)


# issue 21's small gaps on the optimizer side -------------------------------------------------
def test_an_empty_group_is_a_clear_error():
    model = TinyLlama(layers=1)
    with pytest.raises(ValueError, match="a param group has no parameters"):
        amx.AdamMini([{"params": model.named_parameters()}, {"params": []}], **HEADS)


def test_meta_device_parameters_step_under_the_default_policy():
    with torch.device("meta"):
        model = TinyLlama(layers=1)
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    assert opt.state[model.norm.weight]["v"].device.type == "meta"


def test_a_functional_update_without_a_parameter_names_it():
    tx = amx.adam_mini(plan={"w": amx.per_row((3, 4)), "b": amx.elementwise((3,))})
    params = {"w": torch.ones(3, 4), "b": torch.ones(3)}
    state = tx.init(params)
    grads = {"w": torch.ones(3, 4), "b": torch.ones(3)}
    with pytest.raises(ValueError, match=r"missing from params: \['b'\]"):
        tx.update(grads, state, {"w": params["w"]})


@pytest.mark.parametrize("explicit", [torch.float32, None])
def test_a_loaded_state_dtype_follows_an_explicit_state_dtype(explicit):
    model = TinyLlama(layers=1).to(torch.bfloat16)
    opt = amx.AdamMini(model.named_parameters(), state_dtype=torch.bfloat16, **HEADS)
    random_grads(model)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = amx.AdamMini(model.named_parameters(), state_dtype=explicit, **HEADS)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    state = fresh.state[model.layers[0].mlp.up_proj.weight]
    assert state["m"].dtype == state["v"].dtype == (explicit or torch.bfloat16)
