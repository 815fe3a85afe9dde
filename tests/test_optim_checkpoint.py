"""AdamMini checkpoints: bit-exact resume through torch.save / torch.load(weights_only=True), state
dtypes kept on load, the plan and names checked, and torch.distributed.checkpoint's state-dict API."""
import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import adam_mini_tx as amx
from test_optim import HEADS, LM, batches, random_grads, train
from test_oracles import TinyLlama


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def two_groups(model):
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if "mlp" in n], "lr": 2e-2, "betas": (0.8, 0.95)},
            {"params": [(n, p) for n, p in named if "mlp" not in n]}]


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None),
                                                (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-params-fp32-state"])
def test_resume_is_bit_exact(dtype, state_dtype):
    torch.manual_seed(0)
    data = batches(12)
    model = LM(dtype)
    init = roundtrip(model.state_dict())
    make = lambda m: amx.AdamMini(two_groups(m), lr=1e-2, weight_decay=0.1,
                                  state_dtype=state_dtype, **HEADS)
    opt = make(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 1e-2], total_steps=12)
    train(model, opt, data[:6], sched)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict()})
    uninterrupted = train(model, opt, data[6:], sched)

    resumed = LM(dtype)
    resumed.load_state_dict(init)  # other weights until the checkpoint is loaded
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=[2e-2, 1e-2], total_steps=12)
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    for p in resumed.parameters():
        assert opt2.state[p]["m"].dtype == opt2.state[p]["v"].dtype == (state_dtype or dtype)
    assert train(resumed, opt2, data[6:], sched2) == uninterrupted
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert all(torch.equal(opt.state[a][k], opt2.state[b][k]) for k in amx.optim.STATE_KEYS)


def test_bf16_params_keep_fp32_state_through_a_round_trip():
    torch.manual_seed(0)
    model = LM(torch.bfloat16)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, state_dtype=torch.float32, **HEADS)
    train(model, opt, batches(2))
    saved = roundtrip(opt.state_dict())
    fresh = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)  # no state_dtype given
    fresh.load_state_dict(saved)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert fresh.state[p]["m"].dtype == fresh.state[p]["v"].dtype == torch.float32
        assert fresh.state[p]["step"].dtype == torch.int64
        assert torch.equal(fresh.state[p]["m"], opt.state[p]["m"])


def stepped(model, **kwargs):
    opt = amx.AdamMini(model.named_parameters(), **{**HEADS, **kwargs})
    random_grads(model)
    opt.step()
    return opt


def test_checkpoint_from_another_model_is_refused_without_changes():
    small, other = TinyLlama(), TinyLlama(hidden=96)
    opt_small, opt_other = stepped(small), stepped(other)
    up = other.layers[0].mlp.up_proj.weight
    before = {k: v.clone() for k, v in opt_other.state[up].items()}
    with pytest.raises(ValueError, match=r"another block plan: parameter "
                       r"'layers.0.mlp.gate_proj.weight' is shape \[64, 32\]"):
        opt_other.load_state_dict(roundtrip(opt_small.state_dict()))
    assert all(torch.equal(before[k], opt_other.state[up][k]) for k in before)


def test_checkpoint_with_another_plan_is_refused():
    model = TinyLlama()
    saved = stepped(model, n_heads=4, n_kv_heads=2).state_dict()  # q: 4 blocks, k: 2
    with pytest.raises(ValueError, match="'layers.0.self_attn.q_proj.weight' is shape "
                                         r"\[32, 32\] blocked '\(h d\)"):
        amx.AdamMini(model.named_parameters(), n_heads=2, n_kv_heads=1).load_state_dict(saved)


def test_plans_that_block_alike_are_compatible():
    """Only the layout matters: a plan made from the module (source 'structure') loads a
    checkpoint of a plan made from the names (source 'name') when the blocks agree."""
    model = TinyLlama()
    saved = stepped(model).state_dict()
    assert amx.AdamMini(model.named_parameters(), plan=model, **HEADS).plan.to_dict() != saved["plan"]
    amx.AdamMini(model.named_parameters(), plan=model, **HEADS).load_state_dict(saved)


def test_parameters_in_another_order_are_refused():
    model = TinyLlama()
    saved = stepped(model).state_dict()
    reordered = list(reversed(list(model.named_parameters())))
    with pytest.raises(ValueError, match=r"group 0 holds 'embed_tokens.weight' at position 0 "
                                         r"where this optimizer has 'lm_head.bias'"):
        amx.AdamMini(reordered, **HEADS).load_state_dict(saved)


def test_state_without_a_plan_is_checked_by_shape():
    """torch.distributed.checkpoint drops the extra 'plan' key: shapes still guard the load."""
    model = TinyLlama()
    saved = stepped(model).state_dict()
    del saved["plan"]
    other = amx.AdamMini(model.named_parameters(), n_heads=2, n_kv_heads=1)
    with pytest.raises(ValueError, match=r"state 'v' of parameter 'layers.0.self_attn.q_proj.weight'"
                                         r" has shape \(4,\), expected \(2,\)"):
        other.load_state_dict(saved)
    fresh = amx.AdamMini(model.named_parameters(), **HEADS)
    fresh.load_state_dict(saved)
    assert int(fresh.state[model.norm.weight]["step"]) == 1


@pytest.mark.parametrize("bad, message", [
    ({"state": {}}, "not an optimizer state dict"),
    (lambda sd: {**sd, "param_groups": sd["param_groups"][:0]}, "0 param groups but"),
    (lambda sd: {**sd, "state": {**sd["state"], 0: {"step": torch.tensor(1.0),
                                                     "exp_avg": torch.zeros(48, 32),
                                                     "exp_avg_sq": torch.zeros(48, 32)}}},
     r"has keys \['exp_avg', 'exp_avg_sq', 'step'\]"),
])
def test_damaged_or_foreign_state_dicts_are_refused(bad, message):
    model = TinyLlama()
    opt = stepped(model)
    state_dict = bad(opt.state_dict()) if callable(bad) else bad
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)


@pytest.mark.parametrize("flatten", [False, True])
def test_distributed_checkpoint_state_dict_api(flatten):
    """get/set_optimizer_state_dict (single process): lazy state is created by a step with zero
    grads and lr=0 that leaves the parameters alone; the state survives keyed by parameter name."""
    torch.manual_seed(0)
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, **HEADS)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    lazy = get_optimizer_state_dict(model, opt, options=options)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert opt.param_groups[0]["lr"] == 1e-2 and all(p.grad is None for p in model.parameters())
    assert set(opt.state[model.norm.weight]) == set(amx.optim.STATE_KEYS) and lazy
    random_grads(model)
    opt.step()
    saved = get_optimizer_state_dict(model, opt, options=options)
    twin = TinyLlama()
    twin.load_state_dict(model.state_dict())
    opt2 = amx.AdamMini(twin.named_parameters(), lr=1e-2, weight_decay=0.1, **HEADS)
    set_optimizer_state_dict(twin, opt2, roundtrip(saved), options=options)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert all(torch.equal(opt.state[a][k], opt2.state[b][k]) for k in amx.optim.STATE_KEYS)
