"""AdamMini (torch.optim wrapper) and Adam_mini (drop-in for the official package)."""
import io
import logging

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from test_oracles import TinyLlama, gradient_sequence, initial_params, run_functional

HEADS = dict(n_heads=4, n_kv_heads=2)


def feed(model, opt, grads_seq):
    named = dict(model.named_parameters())
    for grads in grads_seq:
        for k, p in named.items():
            p.grad = grads[k].clone()
        opt.step()
    return {k: p.detach().clone() for k, p in named.items()}


class LM(nn.Module):
    """A tiny causal LM built from TinyLlama's weights (enough structure for real training)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.inner = TinyLlama(vocab=32, dim=32, layers=1, hidden=48).to(dtype)

    def forward(self, tokens):
        m = self.inner
        x = m.embed_tokens(tokens)
        layer = m.layers[0]
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        k, v = k.repeat(1, 1, 2), v.repeat(1, 1, 2)
        scores = (q @ k.transpose(1, 2)) / 8 ** 0.5
        mask = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        x = x + attn.o_proj(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v)
        h = layer.post_attention_layernorm(x)
        x = x + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        return m.lm_head(m.norm(x))


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 32, (n, 4, 1), generator=gen)
    return list((starts + torch.arange(9)) % 32)  # counting sequences: learnable


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       tokens[:, 1:].reshape(-1))


def train(model, opt, data, scheduler=None):
    losses = []
    for tokens in data:
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# ----- the same math as the functional core, and as the official package ---------------------
def test_wrapper_equals_functional_core_bit_for_bit():
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 20)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ours = feed(model, amx.AdamMini(model.named_parameters(), **hyper, **HEADS), grads_seq)
    ref = run_functional(amx.adam_mini(**hyper, **HEADS), params, grads_seq)
    for k in params:
        assert torch.equal(ours[k], ref[k]), k


def test_drop_in_matches_official_package_with_gqa():
    official = pytest.importorskip("adam_mini")
    torch.manual_seed(0)
    model = TinyLlama()
    twin = TinyLlama()
    twin.load_state_dict(model.state_dict())
    grads_seq = gradient_sequence(initial_params(model), 50, seed=3)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, dim=32, **HEADS)
    ours = feed(model, amx.Adam_mini(model.named_parameters(), **hyper, verbose=False), grads_seq)
    theirs = feed(twin, official.Adam_mini(twin.named_parameters(), **hyper, verbose=False),
                  grads_seq)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_drop_in_logs_instead_of_printing(capsys, caplog):
    model = TinyLlama()
    with caplog.at_level(logging.INFO, logger="adam_mini_tx"):
        amx.Adam_mini(model.named_parameters(), dim=32, **HEADS)
    assert capsys.readouterr().out == ""
    assert "q_proj" in caplog.text


# ----- the torch.optim contract ----------------------------------------------------------------
def test_one_cycle_over_two_named_groups_trains():
    torch.manual_seed(0)
    model = LM()
    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if p.dim() >= 2], "lr": 2e-2},
              {"params": [(n, p) for n, p in named if p.dim() < 2], "lr": 5e-3}]
    opt = amx.AdamMini(groups, weight_decay=0.01, **HEADS)
    steps = 60
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 5e-3], total_steps=steps)
    losses = train(model, opt, batches(steps), sched)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 2 else 1.0),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.0),
    lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda step: 0.0),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0),
    lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.0, patience=0),
], ids=["lambda", "step", "multiplicative", "cosine", "plateau"])
def test_schedulers_drive_the_learning_rate(make_scheduler):
    """Every scheduler can bring the lr to zero; the step then leaves the parameters alone."""
    torch.manual_seed(0)
    model = LM()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, **HEADS)
    sched = make_scheduler(opt)
    for tokens in batches(2):
        opt.zero_grad()
        lm_loss(model, tokens).backward()
        opt.step()
        sched.step(1.0) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) \
            else sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()
    lm_loss(model, batches(1, seed=5)[0]).backward()
    opt.step()
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k


def test_tensor_lr_and_closure_and_zero_grad():
    torch.manual_seed(0)
    model = LM()
    lr = torch.tensor(1e-2)
    opt = amx.AdamMini(model.named_parameters(), lr=lr, **HEADS)
    tokens = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step(closure) < first


def test_params_without_grad_are_skipped():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)
    frozen = model.lm_head.weight.detach().clone()
    for name, p in model.named_parameters():
        p.grad = None if name.startswith("lm_head") else torch.randn_like(p)
    opt.step()
    assert torch.equal(model.lm_head.weight, frozen)
    assert len(opt.state[model.lm_head.weight]) == 0
    assert set(opt.state[model.embed_tokens.weight]) == {"step", "m", "v"}


def test_state_keys_and_shapes():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    q = opt.state[model.layers[0].self_attn.q_proj.weight]
    k = opt.state[model.layers[0].self_attn.k_proj.weight]
    norm = opt.state[model.norm.weight]
    bias = opt.state[model.lm_head.bias]
    assert (q["v"].shape, k["v"].shape, norm["v"].shape, bias["v"].shape) == \
        ((4,), (2,), (), (48,))
    assert q["step"].dtype == torch.int64 and int(q["step"]) == 1
    assert q["m"].shape == model.layers[0].self_attn.q_proj.weight.shape


def test_add_param_group_extends_the_plan_and_trains_it():
    model = TinyLlama()
    named = list(model.named_parameters())
    opt = amx.AdamMini([(n, p) for n, p in named if "lm_head" not in n], **HEADS)
    opt.add_param_group({"params": [(n, p) for n, p in named if "lm_head" in n], "lr": 0.5})
    assert "lm_head.weight" in opt.plan
    before = model.lm_head.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert (model.lm_head.weight - before).abs().max() > 0.1


def test_step_and_state_dict_hooks_run():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state_dict()
    assert calls == ["pre", "post", "sd"]


def test_unnamed_params_need_names_unless_the_plan_is_the_model():
    model = TinyLlama()
    with pytest.raises(ValueError, match="needs parameter names"):
        amx.AdamMini(model.parameters(), **HEADS)
    opt = amx.AdamMini(model.parameters(), plan=model, **HEADS)
    assert opt.param_groups[0]["param_names"][0] == "embed_tokens.weight"


def test_same_param_in_two_groups_is_named():
    model = TinyLlama()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="'norm.weight' appears twice"):
        amx.AdamMini([{"params": named}, {"params": [n for n in named if n[0] == "norm.weight"]}],
                     **HEADS)


# ----- checkpoints -------------------------------------------------------------------------------
def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_is_bit_exact():
    torch.manual_seed(0)
    data = batches(12)
    model = LM()
    init = roundtrip(model.state_dict())
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, **HEADS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    train(model, opt, data[:6], sched)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict()})
    train(model, opt, data[6:], sched)

    resumed = LM()
    resumed.load_state_dict(init)  # different weights until the checkpoint is loaded
    resumed.load_state_dict(checkpoint["model"])
    opt2 = amx.AdamMini(resumed.named_parameters(), lr=1e-2, weight_decay=0.1, **HEADS)
    opt2.load_state_dict(checkpoint["opt"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=12)
    sched2.load_state_dict(checkpoint["sched"])
    train(resumed, opt2, data[6:], sched2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_bf16_params_keep_fp32_state_through_a_round_trip():
    torch.manual_seed(0)
    model = LM(torch.bfloat16)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, state_dtype=torch.float32, **HEADS)
    train(model, opt, batches(2))
    saved = roundtrip(opt.state_dict())
    fresh = amx.AdamMini(model.named_parameters(), lr=1e-2, state_dtype=torch.float32, **HEADS)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert fresh.state[p]["m"].dtype == torch.float32
        assert fresh.state[p]["v"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["m"], opt.state[p]["m"])


def test_checkpoint_from_another_model_is_refused_without_changes():
    small = TinyLlama()
    other = TinyLlama(hidden=96)
    for m in (small, other):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
    opt_small = amx.AdamMini(small.named_parameters(), **HEADS)
    opt_small.step()
    opt_other = amx.AdamMini(other.named_parameters(), **HEADS)
    opt_other.step()
    before = {k: v.clone() for k, v in opt_other.state[other.layers[0].mlp.up_proj.weight].items()}
    with pytest.raises(ValueError, match=r"another block plan: parameter 'layers.0.mlp.gate_proj.weight' "
                       r"is shape \[64, 32\]"):
        opt_other.load_state_dict(roundtrip(opt_small.state_dict()))
    after = opt_other.state[other.layers[0].mlp.up_proj.weight]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_without_plan_is_refused():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    sd = opt.state_dict()
    del sd["plan"]
    with pytest.raises(ValueError, match="no 'plan'"):
        opt.load_state_dict(sd)
