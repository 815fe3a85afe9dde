"""AdamMini, the torch.optim wrapper: the functional core's numbers, named groups, schedulers and
the rest of the torch.optim contract. (Checkpoints: test_optim_checkpoint.py; the drop-in for the
official package: test_compat.py.)"""
import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import adam_mini_tx as amx
from adam_mini_tx.optim.backends import eager as eager_backend
from test_oracles import TinyLlama, gradient_sequence, initial_params, run_functional

HEADS = dict(n_heads=4, n_kv_heads=2)


def feed(model, opt, grads_seq):
    """Give the optimizer a fixed gradient sequence; return the final parameters."""
    named = dict(model.named_parameters())
    for grads in grads_seq:
        for k, p in named.items():
            p.grad = grads[k].clone()
        opt.step()
    return {k: p.detach().clone() for k, p in named.items()}


class LM(nn.Module):
    """A tiny causal LM on TinyLlama's weights (GQA: 4 query heads, 2 KV heads), for real training."""

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


def random_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)


# ----- one definition of the math ---------------------------------------------------------------
STEPS = pytest.mark.parametrize("native", [False, None], ids=["eager", "native"])


def assert_same(ours: torch.Tensor, ref: torch.Tensor, native: bool | None, name: str) -> None:
    """The eager step is the chain bit for bit; the native kernel, within 1e-6 relative."""
    if native is False:
        assert torch.equal(ours, ref), name
    else:
        assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-6, name


@STEPS
def test_wrapper_equals_functional_core(native):
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 20)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ours = feed(model, amx.AdamMini(model.named_parameters(), **hyper, **HEADS, native=native),
                grads_seq)
    ref = run_functional(amx.adam_mini(**hyper, **HEADS), params, grads_seq)
    for k in params:
        assert_same(ours[k], ref[k], native, k)


@STEPS
def test_named_groups_use_their_own_hyperparameters(native):
    """Each group equals the functional chain with that group's settings, run on its tensors."""
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 8, seed=1)
    attn = {k for k in params if "self_attn" in k}
    settings = [dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2),
                dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)]
    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if n in attn], **settings[0]},
              {"params": [(n, p) for n, p in named if n not in attn], **settings[1]}]
    ours = feed(model, amx.AdamMini(groups, **HEADS, native=native), grads_seq)
    plan = amx.plan_blocks(named, **HEADS)
    for subset, hyper in zip([attn, set(params) - attn], settings):
        ref = run_functional(amx.adam_mini(**hyper, plan=plan),
                             {k: params[k] for k in subset},
                             [{k: g[k] for k in subset} for g in grads_seq])
        for k in subset:
            assert_same(ours[k], ref[k], native, k)


@STEPS
def test_changed_betas_reach_the_math(native):
    """OneCycleLR cycles beta1 through group["betas"]: the next step must use the new value."""
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 6, seed=2)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99), **HEADS,
                       native=native)
    feed(model, opt, grads_seq[:3])
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    ours = feed(model, opt, grads_seq[3:])

    first, second = (amx.adam_mini(lr=1e-2, betas=b, **HEADS) for b in [(0.9, 0.99), (0.5, 0.9)])
    state = first.init(params)
    ref = params
    for t, grads in enumerate(grads_seq):
        tx = first if t < 3 else second
        updates, state = tx.update(grads, state, ref)
        ref = amx.apply_updates(ref, updates)
    for k in params:
        assert_same(ours[k], ref[k], native, k)


def step_memory(make_optimizer, layers=16, width=64):
    """(peak bytes above what the step keeps, bytes it keeps) for the first step of
    ``make_optimizer(model)`` on ``layers`` Linear(width, width), from the profiler's allocator
    timeline. Print it in units of one parameter:
    ``cd tests && python -c "import test_optim as t, adam_mini_tx as amx; print(t.step_memory(lambda m: amx.AdamMini(m.named_parameters()))[0] / 64**2 / 4)"``"""
    from torch.profiler._memory_profiler import Action

    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    random_grads(model)
    opt = make_optimizer(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True, with_stack=True) as prof:
        opt.step()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak - live, live


def test_a_step_allocates_no_temporary_of_the_models_size():
    """The eager step's only scratch is its workspace, one chunk (``CHUNK_ELEMENTS``), kept from
    step to step; nothing else of any size is allocated, though the parameters are larger than a
    chunk (they are cut into row pieces). Computing all updates at once (torch's foreach AdamW)
    needs the whole model's size."""
    width, layers = 2048, 4
    chunk_bytes = eager_backend.CHUNK_ELEMENTS * 4
    param_bytes, model_bytes = width * width * 4, layers * width * width * 4
    assert param_bytes > chunk_bytes
    transient, kept = step_memory(lambda m: amx.AdamMini(m.named_parameters(), weight_decay=0.1),
                                  layers=layers, width=width)
    assert transient <= 0.01 * param_bytes, transient / param_bytes
    state_bytes = model_bytes + layers * width * 4  # m, and v: one value per row
    assert state_bytes <= kept <= state_bytes + chunk_bytes + 4096, (kept - state_bytes)
    foreach, _ = step_memory(lambda m: torch.optim.AdamW(m.parameters(), foreach=True),
                             layers=layers, width=width)
    assert foreach >= model_bytes  # the measurement sees whole-model temporaries when they exist


# ----- the torch.optim contract ----------------------------------------------------------------
def test_one_cycle_over_two_named_groups_trains():
    torch.manual_seed(0)
    model = LM()
    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if p.dim() >= 2], "lr": 2e-2},
              {"params": [(n, p) for n, p in named if p.dim() < 2], "lr": 5e-3}]
    opt = amx.AdamMini(groups, weight_decay=0.01, **HEADS)
    steps = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 5e-3], total_steps=steps)
    seen_betas = set()
    losses = []
    for tokens in batches(steps):
        losses += train(model, opt, [tokens], sched)
        seen_betas.add(opt.param_groups[0]["betas"][0])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]
    assert len(seen_betas) > 10  # momentum was cycled as well


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 2 else 1.0),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.0),
    lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda step: 0.0),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0),
    lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.0, patience=0),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=1),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=1)],
        milestones=[1]),
], ids=["lambda", "step", "multiplicative", "cosine", "plateau", "sequential"])
def test_schedulers_drive_the_learning_rate(make_scheduler):
    """Every scheduler can bring the lr to zero; the step then leaves the parameters alone (with
    weight decay on: decay is scaled by the lr too)."""
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


def test_tensor_lr_follows_a_scheduler_and_matches_a_float_lr():
    torch.manual_seed(0)
    grads_seq = gradient_sequence(initial_params(TinyLlama()), 5, seed=4)
    runs = []
    for lr in (torch.tensor(1e-2), 1e-2):
        torch.manual_seed(0)
        model = TinyLlama()
        opt = amx.AdamMini(model.named_parameters(), lr=lr, **HEADS)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        for grads in grads_seq:
            feed(model, opt, [grads])
            sched.step()
        runs.append(initial_params(model))
        assert type(opt.param_groups[0]["lr"]) is type(lr)
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-6, atol=1e-7)


def test_closure_returns_the_loss_and_zero_grad_clears():
    torch.manual_seed(0)
    model = LM()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)
    tokens = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and first.requires_grad
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step(closure) < first
    assert opt.step() is None


def test_params_without_grad_are_skipped():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)
    frozen = model.lm_head.weight.detach().clone()
    for name, p in model.named_parameters():
        p.grad = None if name.startswith("lm_head") else torch.randn_like(p)
    opt.step()
    assert torch.equal(model.lm_head.weight, frozen)
    assert len(opt.state[model.lm_head.weight]) == 0
    assert set(opt.state[model.embed_tokens.weight]) == set(amx.optim.STATE_KEYS)
    # a parameter that joins later starts its own step count
    random_grads(model)
    opt.step()
    assert int(opt.state[model.lm_head.weight]["step"]) == 1
    assert int(opt.state[model.embed_tokens.weight]["step"]) == 2


def test_state_keys_shapes_and_dtypes():
    model = TinyLlama().to(torch.bfloat16)
    opt = amx.AdamMini(model.named_parameters(), state_dtype=torch.float32, **HEADS)
    random_grads(model)
    opt.step()
    q = opt.state[model.layers[0].self_attn.q_proj.weight]
    k = opt.state[model.layers[0].self_attn.k_proj.weight]
    norm = opt.state[model.norm.weight]
    bias = opt.state[model.lm_head.bias]
    assert (q["v"].shape, k["v"].shape, norm["v"].shape, bias["v"].shape) == \
        ((4,), (2,), (), (48,))
    assert q["step"].dtype == torch.int64 and q["step"].shape == () and int(q["step"]) == 1
    assert q["m"].shape == model.layers[0].self_attn.q_proj.weight.shape
    assert q["m"].dtype == q["v"].dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_default_decay_mask_spares_vectors_and_groups_can_switch_it():
    model = TinyLlama()
    named = list(model.named_parameters())
    vectors = [(n, p) for n, p in named if p.dim() < 2]
    matrices = [(n, p) for n, p in named if p.dim() >= 2]
    opt = amx.AdamMini([{"params": matrices}, {"params": vectors, "decay_mask": "all"}],
                       lr=0.1, weight_decay=0.5, **HEADS)
    before = {n: p.detach().clone() for n, p in named}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: the update is decay alone
    opt.step()
    for n, p in named:
        torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))
    opt2 = amx.AdamMini(named, lr=0.1, weight_decay=0.5, **HEADS)
    opt2.step()
    for n, p in vectors:  # default mask: decayed once above, not again
        torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


def test_add_param_group_extends_the_plan_and_trains_it():
    model = TinyLlama()
    named = list(model.named_parameters())
    opt = amx.AdamMini([(n, p) for n, p in named if "lm_head" not in n], **HEADS)
    opt.add_param_group({"params": [(n, p) for n, p in named if "lm_head" in n], "lr": 0.5})
    assert "lm_head.weight" in opt.plan and opt.param_groups[1]["betas"] == (0.9, 0.999)
    before = model.lm_head.weight.detach().clone()
    random_grads(model)
    opt.step()
    assert (model.lm_head.weight - before).abs().max() > 0.1
    with pytest.raises(ValueError, match="'lm_head.weight' appears twice"):
        opt.add_param_group({"params": [("lm_head.weight", model.lm_head.weight)]})
    with pytest.raises(ValueError, match=r"param group 2: invalid lr=-1"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.ones(3)))], "lr": -1.0})


def test_step_and_state_dict_hooks_run():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    random_grads(model)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


def test_deepcopy_keeps_the_plan_and_steps_independently():
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), **HEADS)
    random_grads(model)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.plan == opt.plan and twin.state_dtype is None
    q = model.layers[0].self_attn.q_proj.weight
    twin_q = twin.param_groups[0]["params"][twin.param_groups[0]["param_names"].index(
        "layers.0.self_attn.q_proj.weight")]
    assert twin_q is not q and torch.equal(twin.state[twin_q]["m"], opt.state[q]["m"])
    m_before = opt.state[q]["m"].clone()
    for p in twin.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    twin.step()
    assert int(twin.state[twin_q]["step"]) == 2 and int(opt.state[q]["step"]) == 1
    assert torch.equal(opt.state[q]["m"], m_before)


# ----- parameters: names, plans and errors -----------------------------------------------------
def test_unnamed_params_need_names_unless_the_plan_is_the_model():
    model = TinyLlama()
    with pytest.raises(ValueError, match="needs parameter names"):
        amx.AdamMini(model.parameters(), **HEADS)
    with pytest.raises(ValueError, match="plan=model"):
        amx.AdamMini(model.parameters(), plan=amx.plan_blocks(model, **HEADS))
    opt = amx.AdamMini(model.parameters(), plan=model, **HEADS)
    assert opt.param_groups[0]["param_names"][0] == "embed_tokens.weight"
    # unnamed groups (what Hugging Face's Trainer passes) are named the same way
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = amx.AdamMini(groups, plan=model, **HEADS)
    assert "norm.weight" in opt.param_groups[1]["param_names"]


def test_plan_from_a_module_also_covers_its_frozen_params():
    model = TinyLlama()
    model.embed_tokens.weight.requires_grad_(False)
    opt = amx.AdamMini(model.named_parameters(), plan=model, **HEADS)
    assert "embed_tokens.weight" in opt.plan
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    assert not opt.state[model.embed_tokens.weight]


def test_a_given_plan_must_cover_every_parameter():
    model = TinyLlama()
    plan = amx.plan_blocks([(n, p) for n, p in model.named_parameters() if "lm_head" not in n],
                           **HEADS)
    with pytest.raises(ValueError, match="'lm_head.weight' is not covered by the block plan"):
        amx.AdamMini(model.named_parameters(), plan=plan)


def test_same_param_in_two_groups_is_named():
    model = TinyLlama()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="'norm.weight' appears twice"):
        amx.AdamMini([{"params": named}, {"params": [n for n in named if n[0] == "norm.weight"]}],
                     **HEADS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), r"param group 0: invalid lr=-1"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(eps=-1e-8), r"invalid eps"),
    (dict(weight_decay=-0.1), r"invalid weight_decay"),
    (dict(decay_mask="norms"), r"invalid decay_mask='norms'"),
    (dict(lr=torch.ones(2)), r"one-element tensor"),
])
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        amx.AdamMini(TinyLlama().named_parameters(), **HEADS, **kwargs)


def test_bad_params_and_state_dtype_are_type_errors():
    model = TinyLlama()
    with pytest.raises(TypeError, match="not a single tensor"):
        amx.AdamMini(model.lm_head.weight, **HEADS)
    with pytest.raises(TypeError, match="state_dtype"):
        amx.AdamMini(model.named_parameters(), state_dtype=torch.int32, **HEADS)
    with pytest.raises(ValueError, match="sparse gradient"):
        opt = amx.AdamMini(model.named_parameters(), **HEADS)
        model.embed_tokens.weight.grad = torch.randn_like(model.embed_tokens.weight).to_sparse()
        opt.step()
