"""The native single-pass CPU kernel against the functional chain, its one definition of the math.

Kernel level: every layout kind the kernel takes (rows, heads with GQA, fused QKV, transposed
Conv1D rows and heads, 3-D experts, norms, whole matrices, elementwise, a 0-d tensor), several
members per call, tensors larger than a tile (so blocks, tiles and int8 groups meet at their
edges), many steps, every first-moment format, decay on and off, row sums given by the
statistics pass or summed in the kernel. Optimizer level: ``AdamMini`` with the native step
equals ``native=False`` (the eager chain) for whole models, non-finite policies, decay masks,
schedules, resume and bf16 parameters; and it falls back, saying so, when the kernel is off.
"""
import copy
import logging

import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx.core import blocks
from adam_mini_tx.functional.alias import adam_mini_slots
from adam_mini_tx.kernels import native
from adam_mini_tx.kernels.spec import KernelMember, geometry, member_noise_key, step_scalars
from adam_mini_tx.optim.backends import kernel as kernel_backend
from test_oracles import TinyLlama, gradient_sequence, initial_params

pytestmark = pytest.mark.skipif(not native.load(), reason=f"native kernel: {native.status()}")

LR, BETAS, EPS, WD, SEED = 3e-2, (0.9, 0.99), 1e-8, 0.1, 5
STEPS = 5


def layouts() -> dict[str, blocks.BlockLayout]:
    """One of every kind, several of them larger than a tile (65,536 elements)."""
    return {
        "rows": blocks.per_row((300, 512)),  # 3 tiles
        "heads_gqa": blocks.fused_rows((6 * 16, 40), [("h", 6)]),  # 6 heads of 16 rows
        "kv_heads": blocks.per_head((2 * 16, 40), 2),
        "qkv": blocks.fused_rows((160, 48), [("q", 4), ("k", 2), ("v", 32)],
                                 rows_per_segment=[64, 64, 32]),
        "interleaved": blocks.fused_rows((48, 40), [("o", 8), ("h", 2)], rows_per_segment=[8, 16],
                                         repeat=2),  # rows, heads, rows, heads: 1, 8, 1, 8 rows
        "conv1d": blocks.per_row((512, 384), transposed=True),  # int8: 2 groups of 192 a row
        "conv1d_heads": blocks.fused_rows((64, 3 * 96), [("q", 3), ("k", 3), ("v", 96)],
                                          transposed=True),
        "experts": blocks.per_row((4, 64, 300), row_dims=2),  # int8: groups of 150
        "norm": blocks.single_block((1000,)),
        "matrix": blocks.single_block((64, 70)),
        "bias": blocks.elementwise((100_000,)),  # elementwise, 2 tiles, 391 int8 groups
        "adam_matrix": blocks.elementwise((40, 70)),
        "scalar": blocks.single_block(()),
    }


def tensors(shape, generator, steps):
    p = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) * (1 + t) for t in range(steps)]
    return p, grads


def decayed(name: str) -> bool:
    return len(name) % 2 == 0  # about half of them


def chain_run(layout, p, grads, name, fmt, rounding, eps_root):
    tx = amx.adam_mini(LR, BETAS, EPS, WD, plan={name: layout}, eps_root=eps_root,
                       decay_mask=lambda n, t: "decay" if decayed(n) else "no_decay",
                       momentum_format=fmt, stochastic_rounding=rounding, seed=SEED)
    p = p.clone()
    state = tx.init({name: p})
    for g in grads:
        updates, state = tx.update({name: g}, state, {name: p})
        p = p + updates[name]
    return p, adam_mini_slots(state, name)


def kernel_run(members, steps, fmt, rounding, eps_root, given_sums):
    """``members``: name -> (layout, p, grads); all stepped together, one kernel call a step."""
    params, slots = {}, {}
    for name, (layout, p, _) in members.items():
        tx = amx.adam_mini(plan={name: layout}, momentum_format=fmt, seed=SEED)
        params[name] = p.clone()
        slots[name] = adam_mini_slots(tx.init({name: params[name]}), name)
    low = fmt in ("bfloat16", "int8")
    for t in range(1, steps + 1):
        batch = []
        for name, (layout, _, grads) in members.items():
            g = grads[t - 1]
            runs, row_numel, columns = geometry(layout)
            sums = layout.row_sums_of_squares(g).reshape(-1) if given_sums else None
            batch.append(KernelMember(
                name, params[name], g, slots[name]["m"], slots[name].get("m_scale"),
                slots[name]["v"], sums, runs, row_numel, columns, decayed(name),
                member_noise_key(SEED, t, name) if low and rounding else None, not low))
        native.step_(batch, step_scalars(LR, *BETAS, EPS, eps_root, WD, t))
    return params, slots


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fmt,rounding", [(None, True), ("bfloat16", True),
                                          ("bfloat16", False), ("int8", True), ("int8", False)])
@pytest.mark.parametrize("given_sums", [False, True])
def test_kernel_equals_the_chain_for_every_layout_and_format(fmt, rounding, given_sums):
    generator = torch.Generator().manual_seed(0)
    eps_root = 1e-12 if given_sums else 0.0
    members = {name: (layout, *tensors(layout.shape, generator, STEPS))
               for name, layout in layouts().items()}
    params, slots = kernel_run(members, STEPS, fmt, rounding, eps_root, given_sums)
    for name, (layout, p0, grads) in members.items():
        p, state = chain_run(layout, p0, grads, name, fmt, rounding, eps_root)
        assert relative(p, params[name]) < 1e-6, name
        assert relative(state["v"], slots[name]["v"]) < 1e-6, name
        if fmt is None:
            assert relative(state["m"], slots[name]["m"]) < 1e-6, name
        else:  # m depends on g and m alone: the rounded formats agree bit for bit
            assert torch.equal(state["m"], slots[name]["m"]), name
            if fmt == "int8":
                assert torch.equal(state["m_scale"], slots[name]["m_scale"]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_pass_equals_torch_row_sums_and_finds_a_nan_in_every_layout(dtype):
    """``row_sums_`` (the non-finite check's pass) against ``BlockLayout.row_sums_of_squares`` for
    every layout kind in one call (Conv1D columns over several bands); a NaN in any one member's
    gradient makes it report non-finite."""
    generator = torch.Generator().manual_seed(3)
    members = {name: (layout, torch.randn(layout.shape, generator=generator).to(dtype))
               for name, layout in layouts().items()}

    def kernel_members(grads):
        return [KernelMember(name, g, g, g, None, g, None, *geometry(layout), False, None)
                for name, (layout, _), g in zip(members, members.values(), grads)]

    grads = [g for _, g in members.values()]
    sums, finite = native.row_sums_(kernel_members(grads))
    assert finite
    for (name, (layout, g)), got in zip(members.items(), sums):
        expected = layout.row_sums_of_squares(g.double(), torch.float64).reshape(-1)
        assert relative(expected, got) < 1e-6, name  # fp32 partial sums of at most 1024 terms
    for index, name in enumerate(members):
        poisoned = [g.clone() for g in grads]
        poisoned[index].view(-1)[poisoned[index].numel() // 2] = float("nan")
        assert not native.row_sums_(kernel_members(poisoned))[1], name


@pytest.mark.parametrize("rounding", [True, False])
def test_bf16_m_rounds_nan_infinities_overflow_and_subnormals_as_the_chain(rounding):
    """The kernel's bf16 rounding (a branch-free copy of c10's) on the values it must get right:
    NaN, infinities, finite values that round up to infinity, subnormals; ``m``'s bits equal
    the chain's (a NaN's payload aside), and ``p`` is NaN in the same places."""
    layout = blocks.per_row((4, 64))
    generator = torch.Generator().manual_seed(5)
    p0, grads = tensors(layout.shape, generator, 3)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-40,
                            -1e-40, 3.3e38])
    grads[-1].view(-1)[:special.numel()] = special  # the last step: m keeps the infinities
    grads[-1].view(-1)[-special.numel():] = special / 0.1  # overflows in the lerp's product
    params, slots = kernel_run({"w": (layout, p0, grads)}, 3, "bfloat16", rounding, 0.0, False)
    p, state = chain_run(layout, p0, grads, "w", "bfloat16", rounding, 0.0)
    expected, got = state["m"], slots["w"]["m"]
    assert torch.equal(expected.isnan(), got.isnan()) and expected.isinf().any()
    finite = ~expected.isnan()
    assert torch.equal(expected[finite].view(torch.int16), got[finite].view(torch.int16))
    assert torch.equal(p.isnan(), params["w"].isnan()) and p.isnan().any()


# ----- AdamMini with the native step against AdamMini(native=False), the eager chain -----------
def gpt2_with_experts():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=40, n_positions=16))  # Conv1D, fused QKV
    model.experts = torch.nn.Parameter(torch.randn(3, 8, 5))  # 3-D experts, one block per row
    return model


def llama():
    torch.manual_seed(0)
    return TinyLlama(layers=2, dim=32, hidden=48, vocab=40)


def plan_for(model):
    if isinstance(model, TinyLlama):
        return amx.plan_blocks(list(model.named_parameters()), n_heads=4, n_kv_heads=2)
    return model


def groups(model, mask):
    named = list(model.named_parameters())
    return [{"params": named[::2], "decay_mask": mask, "lr": 2e-2},
            {"params": named[1::2], "decay_mask": "matrices"}]


def run(model, native_choice, steps, fmt=None, nonfinite="skip", mask="all", bad_step=None,
        dtype=torch.float32, **kwargs):
    model = copy.deepcopy(model).to(dtype)
    opt = amx.AdamMini(groups(model, mask), lr=1e-2, betas=BETAS, weight_decay=WD, plan=plan_for(model),
                       nonfinite=nonfinite, momentum_format=fmt, native=native_choice, **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=steps)
    for t, grads in enumerate(gradient_sequence(initial_params(model), steps, seed=1)):
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
            if t == bad_step and name.endswith("experts" if "experts" in grads else "lm_head.weight"):
                p.grad[0, 0] = float("nan")
        if t == bad_step and nonfinite == "skip":
            with pytest.warns(RuntimeWarning, match="skipped a step"):
                opt.step()
        else:
            opt.step()
        scheduler.step()
    return model, opt


def assert_same_run(a, b, exact_m: bool, tolerance=1e-6):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert relative(p, q) < tolerance, name
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert int(state_a["step"]) == int(state_b["step"]), name
        assert relative(state_a["v"], state_b["v"]) < tolerance, name
        if exact_m:
            assert torch.equal(state_a["m"], state_b["m"]), name
        else:
            assert relative(state_a["m"], state_b["m"]) < tolerance, name


@pytest.mark.parametrize("make", [llama, gpt2_with_experts])
@pytest.mark.parametrize("fmt", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("nonfinite,mask", [("skip", "official"), ("apply", "all")])
def test_native_step_equals_the_eager_chain_on_whole_models(make, fmt, nonfinite, mask):
    model = make()
    eager = run(model, False, 7, fmt, nonfinite, mask, bad_step=3 if nonfinite == "skip" else None)
    fast = run(model, True, 7, fmt, nonfinite, mask, bad_step=3 if nonfinite == "skip" else None)
    assert fast[1].step_kind.startswith("native") and eager[1].step_kind == "eager"
    assert_same_run(eager, fast, exact_m=fmt is not None)
    assert fast[1].param_groups[0]["nonfinite_skipped"] == (nonfinite == "skip")


def test_native_step_raises_before_any_write():
    model = llama()
    _, opt = run(model, True, 2, "int8")
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    trained = opt.param_groups[0]["params"]
    for p in trained:
        p.grad = torch.ones_like(p)
    trained[0].grad[0] = float("inf")
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    for key, state in before["state"].items():
        assert all(torch.equal(state[k], after["state"][key][k]) for k in state)


@pytest.mark.parametrize("fmt", [None, "bfloat16", "int8"])
def test_native_resume_is_bit_exact(fmt):
    def optimizer(model):
        return amx.AdamMini(groups(model, "official"), lr=1e-2, betas=BETAS, weight_decay=WD,
                            plan=plan_for(model), momentum_format=fmt, native=True)

    def train(model, opt, grads_seq):
        for grads in grads_seq:
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            opt.step()

    model = gpt2_with_experts()
    grads_seq = gradient_sequence(initial_params(model), 6, seed=1)
    straight = copy.deepcopy(model)
    straight_opt = optimizer(straight)
    train(straight, straight_opt, grads_seq)
    first = copy.deepcopy(model)
    first_opt = optimizer(first)
    train(first, first_opt, grads_seq[:3])
    resumed = copy.deepcopy(first)
    resumed_opt = optimizer(resumed)
    resumed_opt.load_state_dict(copy.deepcopy(first_opt.state_dict()))
    train(resumed, resumed_opt, grads_seq[3:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(straight_opt.state[p][k], resumed_opt.state[q][k])
                   for k in straight_opt.state[p])


def test_native_bf16_state_is_the_chains_bf16_arithmetic_bit_for_bit():
    """A bf16 model's default bf16 state (``m`` and ``v``) over 5 steps under OneCycleLR: ``p``,
    ``m`` and ``v`` equal the eager chain's bit for bit (TinyLlama's tensors are whole multiples
    of ATen's bf16 vector, so its loops have no scalar tail; see optimizer.md)."""
    eager = run(llama(), False, 5, dtype=torch.bfloat16, nonfinite="apply")
    fast = run(llama(), True, 5, dtype=torch.bfloat16, nonfinite="apply")
    for (name, p), q in zip(eager[0].named_parameters(), fast[0].parameters()):
        assert p.dtype == torch.bfloat16 and eager[1].state[p]["v"].dtype == torch.bfloat16
        assert torch.equal(p, q), name
        assert all(torch.equal(eager[1].state[p][k], fast[1].state[q][k]) for k in ("m", "v"))


@pytest.mark.parametrize("fmt,state_dtype", [(None, None), (None, torch.float32),
                                              ("int8", None)])
def test_native_bf16_parameters_within_one_bf16_rounding_a_step(fmt, state_dtype):
    model, steps = llama(), 5
    eager = run(model, False, steps, fmt, dtype=torch.bfloat16, state_dtype=state_dtype)
    fast = run(model, True, steps, fmt, dtype=torch.bfloat16, state_dtype=state_dtype)
    for (name, p), q in zip(eager[0].named_parameters(), fast[0].parameters()):
        assert p.dtype == q.dtype == torch.bfloat16
        ulps = ((p.float() - q.float()).abs() / (p.float().abs() * 2**-8).clamp_min(1e-30))
        assert ulps.max() <= steps, (name, ulps.max())


def test_native_step_allocates_nothing_of_a_parameters_size():
    from test_optim import step_memory
    width = 1024
    transient, kept = step_memory(lambda m: amx.AdamMini(m.named_parameters(), weight_decay=0.1,
                                                         native=True), layers=2, width=width)
    assert transient <= 0.01 * width * width * 4, transient
    assert kept <= 2 * (width * width + width) * 4 + 4096  # m and v: nothing kept besides


def test_members_the_kernel_cannot_take_run_eagerly_in_the_same_step():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 6)})
    model.proj.weight = torch.nn.Parameter(torch.randn(8, 6).t())  # not contiguous
    plan = amx.plan_blocks(dict(model.named_parameters()))
    opts = [amx.AdamMini(model.named_parameters(), plan=plan, native=choice)
            for choice in (False, None)]
    members = [amx.optim.members.Member(n, p, p, {"step": torch.tensor(0), "m": p, "v": p})
               for n, p in model.named_parameters()]
    chosen = {type(backend).__name__: [m.name for m in ms] for backend, ms in
              amx.optim.backends.assign(members, False, opts[1]._backends, plan.layouts())}
    assert chosen == {"KernelBackend": ["proj.bias"], "EagerBackend": ["proj.weight"]}


def test_without_the_kernel_the_optimizer_says_so_and_runs_eagerly(monkeypatch, caplog):
    monkeypatch.setenv("ADAM_MINI_TX_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    model = llama()
    with caplog.at_level(logging.WARNING, logger="adam_mini_tx.kernels.native"):
        amx.AdamMini(model.named_parameters(), plan=plan_for(model))
        _, opt = run(model, None, 3)
    assert [r.message for r in caplog.records if "unavailable" in r.message] == [
        "adam_mini_tx: the native CPU step is unavailable (ADAM_MINI_TX_NATIVE=0); AdamMini "
        "runs its eager step"]  # once, though two optimizers were made
    assert "Step: eager (native kernel unavailable: ADAM_MINI_TX_NATIVE=0)" in repr(opt)
    with pytest.raises(RuntimeError, match="native=True, but the native CPU step is unavailable"):
        amx.AdamMini(model.named_parameters(), plan=plan_for(model), native=True)
    with pytest.raises(ValueError, match="two different steps"):
        amx.AdamMini(model.named_parameters(), native=True, fused=True)
    with pytest.raises(TypeError, match="native must be None, True or False"):
        amx.AdamMini(model.named_parameters(), native="yes")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("ADAM_MINI_TX_NATIVE")
    assert native.load() and "loaded" in native.status()


def test_parameters_that_skip_steps_match_the_eager_chain():
    """Members with other step counts in one step (a gradient missing now and then) run as
    separate kernel calls with their own bias corrections."""
    model = llama()
    runs = []
    for choice in (False, True):
        copy_ = copy.deepcopy(model)
        opt = amx.AdamMini(copy_.named_parameters(), lr=1e-2, weight_decay=WD,
                           plan=amx.plan_blocks(list(copy_.named_parameters()), n_heads=4,
                                                n_kv_heads=2), native=choice)
        for t, grads in enumerate(gradient_sequence(initial_params(copy_), 6, seed=2)):
            for i, (name, p) in enumerate(copy_.named_parameters()):
                p.grad = None if i % 3 == 0 and t % 2 else grads[name].clone()
            opt.step()
        runs.append((copy_, opt))
    assert_same_run(*runs, exact_m=False)
    steps = {int(runs[1][1].state[p]["step"]) for p in runs[1][0].parameters()}
    assert len(steps) > 1  # the counts really differ


def test_a_kernel_call_that_raises_leaves_earlier_calls_counted_and_later_members_unwritten():
    """One kernel call per step count: a call that raises writes nothing, and the members of the
    calls before it are reported written (their step counts get bumped), none after it."""
    calls = []

    def kernel(members, scalars):
        if calls:
            raise RuntimeError("second call")
        calls.append([m.name for m in members])

    model = llama()
    layouts = plan_for(model).layouts()
    named = list(model.named_parameters())
    members = [amx.optim.members.Member(
        n, p, torch.zeros_like(p), {"step": torch.tensor(i % 2), "m": torch.zeros_like(p),
                                    "v": torch.zeros(layouts[n].v_shape)})
        for i, (n, p) in enumerate(named)]
    backend = kernel_backend.KernelBackend(kernel)
    hyper = amx.optim.hyperparams.read_hyperparameters(
        amx.AdamMini(named, plan=plan_for(model)).param_groups[0], "")
    written = []
    with pytest.raises(RuntimeError, match="second call"):
        backend.apply(backend.prepare(members, layouts, hyper), hyper, None, written)
    assert [m.name for m in written] == calls[0] == [n for i, (n, _) in enumerate(named)
                                                     if i % 2 == 0]
