"""Every bad input the reliability issue lists gives a ValueError/TypeError that names the
parameter (or the argument) and says what to do; none leaks an IndexError/KeyError."""

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from test_oracles import TinyLlama

HEADS = dict(n_heads=4, n_kv_heads=2)


def stepped(model, **kw):
    opt = amx.AdamMini(model.named_parameters(), **HEADS, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def sparse_grad():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    model.embed_tokens.weight.grad = torch.randn(48, 32).to_sparse()
    opt.step()


def functional_wrong_grad_shape():
    params = {"w.weight": torch.zeros(4, 3)}
    tx = amx.adam_mini()
    tx.update({"w.weight": torch.zeros(3, 4)}, tx.init(params), params)


def functional_sparse_grad():
    params = {"w.weight": torch.zeros(4, 3)}
    tx = amx.adam_mini()
    tx.update({"w.weight": torch.randn(4, 3).to_sparse()}, tx.init(params), params)


def functional_complex_grad():
    params = {"w.weight": torch.zeros(4, 3)}
    tx = amx.adam_mini()
    tx.update({"w.weight": torch.randn(4, 3, dtype=torch.complex64)}, tx.init(params), params)


def functional_state_from_another_plan():
    params = {"w.weight": torch.zeros(4, 3)}
    other = amx.adam_mini(plan={"w.weight": amx.single_block((4, 3))})
    amx.adam_mini().update({"w.weight": torch.ones(4, 3)}, other.init(params), params)


def complex_param():
    amx.AdamMini([("z.weight", nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64)))])


def integer_param():
    amx.plan_blocks({"counts.weight": torch.zeros(3, 3, dtype=torch.int64)})


def zero_size_param():
    amx.AdamMini([("empty.weight", nn.Parameter(torch.zeros(0, 4)))])


def same_param_twice():
    model = TinyLlama()
    named = list(model.named_parameters())
    amx.AdamMini([{"params": named[:3]}, {"params": named[2:4]}], **HEADS)


def same_param_added_again():
    model = TinyLlama()
    named = list(model.named_parameters())
    opt = amx.AdamMini(named[:3], **HEADS)
    opt.add_param_group({"params": named[2:4]})


def plan_missing_param():
    model = TinyLlama()
    plan = amx.plan_blocks([(n, p) for n, p in model.named_parameters() if n != "norm.weight"], **HEADS)
    amx.AdamMini(model.named_parameters(), plan=plan)


def checkpoint_from_other_model():
    a, b = TinyLlama(), TinyLlama(vocab=64)
    stepped(b).load_state_dict(stepped(a).state_dict())


def unnamed_params():
    amx.AdamMini(TinyLlama().parameters(), **HEADS)


def heads_not_dividing():
    amx.AdamMini(TinyLlama().named_parameters(), n_heads=5)


def kv_heads_not_dividing_heads():
    amx.plan_blocks(TinyLlama(), n_heads=4, n_kv_heads=3)


def group_with_bad_lr():
    model = TinyLlama()
    amx.AdamMini([{"params": list(model.named_parameters()), "lr": -1.0}], **HEADS)


def bad_decay_mask():
    amx.AdamMini(TinyLlama().named_parameters(), decay_mask="some", **HEADS)


def bad_nonfinite_policy():
    amx.AdamMini(TinyLlama().named_parameters(), nonfinite="ignore", **HEADS)


def plan_of_wrong_type():
    amx.AdamMini(TinyLlama().named_parameters(), plan={"a": 1})


def single_tensor_params():
    amx.AdamMini(torch.zeros(3, requires_grad=True))


CASES = [
    (sparse_grad, ValueError, r"'embed_tokens.weight' has a sparse gradient.*dense"),
    (functional_wrong_grad_shape, ValueError, r"'w.weight'.*shape"),
    (complex_param, TypeError, r"'z.weight' is complex.*view_as_real"),
    (integer_param, TypeError, r"'counts.weight' has dtype torch.int64"),
    (zero_size_param, ValueError, r"'empty.weight' has no elements.*leave it out"),
    (same_param_twice, ValueError, r"appears twice.*one group"),
    (same_param_added_again, ValueError, r"appears twice"),
    (plan_missing_param, ValueError, r"'norm.weight' is not covered by the block plan"),
    (checkpoint_from_other_model, ValueError, r"another block plan: parameter 'embed_tokens.weight'"),
    (unnamed_params, ValueError, r"needs parameter names.*named_parameters"),
    (heads_not_dividing, ValueError, r"'layers.0.self_attn.q_proj.weight': n_heads=5 does not divide"),
    (kv_heads_not_dividing_heads, ValueError, r"n_heads=4 is not a multiple of n_kv_heads=3"),
    (group_with_bad_lr, ValueError, r"lr=-1.0"),
    (bad_decay_mask, ValueError, r"decay_mask='some'"),
    (bad_nonfinite_policy, ValueError, r"nonfinite policy 'ignore'"),
    (plan_of_wrong_type, TypeError, r"plan must be a BlockPlan"),
    (single_tensor_params, TypeError, r"named_parameters"),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), lr=-1e-3, **HEADS), ValueError, "lr="),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), betas=(0.9, 1.0), **HEADS), ValueError,
     r"betas\[1\]"),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), eps=-1.0, **HEADS), ValueError, "eps="),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), weight_decay=-1.0, **HEADS), ValueError,
     "weight_decay="),
    (lambda: amx.clip_by_global_norm(-1.0), ValueError, "max_norm=-1.0"),
    (lambda: amx.plan_blocks([("a", 1)]), TypeError, "named parameters"),
    (functional_sparse_grad, ValueError, r"'w.weight' has a sparse gradient.*dense"),
    (functional_complex_grad, TypeError, r"'w.weight' has a gradient of dtype torch.complex64"),
    (functional_state_from_another_plan, ValueError,
     r"'w.weight': the second-moment state has shape \(\) but its block layout needs \(4,\)"),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), lr=float("nan"), **HEADS), ValueError,
     r"lr=nan: it must be a finite number"),
    (lambda: amx.adam_mini(eps=float("inf")), ValueError, r"eps=inf: it must be a finite number"),
    (lambda: amx.adamw(weight_decay=float("nan")), ValueError, r"weight_decay=nan"),
    (lambda: amx.adam_mini(lr="1e-3"), TypeError, r"lr='1e-3': pass a Python number"),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), betas=0.9, **HEADS), ValueError,
     r"betas=0.9: pass a pair"),
    (lambda: amx.plan_blocks(TinyLlama(), n_heads=0), ValueError, r"n_heads=0: pass a positive int"),
    (lambda: amx.AdamMini(TinyLlama().named_parameters(), lr=torch.ones(2), **HEADS), ValueError,
     r"lr must be a float or a one-element tensor"),
]


@pytest.mark.parametrize("make,error,message", CASES, ids=[
    getattr(c[0], "__name__", f"case{i}") if getattr(c[0], "__name__", "") != "<lambda>" else f"range{i}"
    for i, c in enumerate(CASES)])
def test_bad_input_is_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


def snapshot(model, opt):
    """Copies of every parameter and its optimizer state, by name."""
    return {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            for n, p in model.named_parameters()}


def assert_unchanged(model, opt, before):
    for name, p in model.named_parameters():
        param, state = before[name]
        assert torch.equal(p, param), name
        assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items()), name


def test_a_bad_gradient_anywhere_changes_nothing():
    """The step validates every gradient before it touches any parameter or state."""
    model = TinyLlama()
    opt = stepped(model)
    before = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.lm_head.bias.grad = torch.randn(48).to_sparse()  # the last parameter
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_count_of_covered_bad_inputs():
    assert len(CASES) >= 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_are_skipped_with_a_warning_by_default(bad):
    model = TinyLlama()
    opt = stepped(model)
    before = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.norm.weight.grad[3] = bad
    with pytest.warns(RuntimeWarning, match=r"skipped a step: non-finite gradient in \['norm.weight'\]"):
        opt.step()
    assert_unchanged(model, opt, before)
    assert opt.state_dict()["param_groups"][0]["nonfinite_skipped"] == 1


def test_nonfinite_policy_raise_and_apply():
    model = TinyLlama()
    opt = stepped(model, nonfinite="raise")
    model.norm.weight.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="norm.weight"):
        opt.step()
    model = TinyLlama()
    opt = stepped(model, nonfinite="apply")
    model.norm.weight.grad[0] = float("nan")
    opt.step()
    assert torch.isnan(model.norm.weight).any()
