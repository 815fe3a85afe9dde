"""AdamMini(fused=True): the same chain compiled over buckets of same-layout parameters, writing in
place. One module-scoped run compiles every bucket once; the tests read its record."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

import adam_mini_tx as amx
from adam_mini_tx.optim.hyperparams import read_hyperparameters
from adam_mini_tx.optim.members import Member
from test_oracles import TinyLlama, gradient_sequence, initial_params

HEADS = dict(n_heads=4, n_kv_heads=2)
STEPS = 8


def two_runs(seed: int = 0, skip: dict | None = None):
    """Eager and fused AdamMini on copies of one TinyLlama under a StepLR schedule (lr changes
    every 2 steps) with weight decay. ``skip[step]`` names parameters left without a gradient at
    that step. Returns the models, optimizers and what the fused run compiled after step 1."""
    torch.manual_seed(seed)
    eager_model = TinyLlama(layers=2)
    fused_model = copy.deepcopy(eager_model)
    grads_seq = gradient_sequence(initial_params(eager_model), STEPS, seed)
    opts = [amx.AdamMini(m.named_parameters(), lr=3e-2, weight_decay=0.1, fused=fused, **HEADS)
            for m, fused in ((eager_model, False), (fused_model, True))]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in opts]
    record = {}
    for t, grads in enumerate(grads_seq):
        for model, opt, scheduler in zip((eager_model, fused_model), opts, schedulers):
            for name, p in model.named_parameters():
                p.grad = None if name in (skip or {}).get(t, ()) else grads[name].clone()
            opt.step()
            scheduler.step()
        if t == 0:
            record["compile_seconds"] = opts[1].compile_seconds
            record["frames"] = counters["frames"]["ok"]
            record["pointers"] = {name: (p.data_ptr(), opts[1].state[p]["m"].data_ptr(),
                                         opts[1].state[p]["v"].data_ptr())
                                  for name, p in fused_model.named_parameters()}
    record["frames_after"] = counters["frames"]["ok"]
    return eager_model, fused_model, opts, record


@pytest.fixture(scope="module")
def runs():
    return two_runs()


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def test_fused_equals_eager_parameters_and_state(runs):
    eager_model, fused_model, (eager, fused), _ = runs
    for (name, p), q in zip(eager_model.named_parameters(), fused_model.parameters()):
        assert max_relative_error(p, q) < 1e-6, name
        for key in ("m", "v"):
            assert max_relative_error(eager.state[p][key], fused.state[q][key]) < 1e-6, (name, key)
        assert int(fused.state[q]["step"]) == STEPS
    # and the run moved the parameters: the comparison is not between two untouched models
    start = TinyLlama(layers=2)
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), fused_model.parameters()))


def test_fused_writes_in_place_and_never_recompiles(runs):
    _, fused_model, (_, fused), record = runs
    assert record["compile_seconds"] > 0
    assert fused.compile_seconds == record["compile_seconds"]  # nothing compiled after step 1
    assert record["frames_after"] == record["frames"]  # lr changed 3 times: no new frame
    for name, p in fused_model.named_parameters():
        assert record["pointers"][name] == (p.data_ptr(), fused.state[p]["m"].data_ptr(),
                                            fused.state[p]["v"].data_ptr()), name


def test_fused_step_allocates_less_than_one_parameter(runs):
    _, fused_model, (_, fused), _ = runs
    for p in fused_model.parameters():
        p.grad = torch.randn_like(p)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fused.step()
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    largest = max(p.numel() * p.element_size() for p in fused_model.parameters())
    assert allocated < largest, (allocated, largest)


def test_fused_with_parameters_that_skip_steps_matches_eager():
    # the lm_head misses steps 1 and 2, a norm step 3: step counts diverge inside a bucket
    skip = {1: {"lm_head.weight", "lm_head.bias"}, 2: {"lm_head.weight"},
            3: {"layers.0.input_layernorm.weight"}}
    eager_model, fused_model, (eager, fused), _ = two_runs(seed=1, skip=skip)
    for (name, p), q in zip(eager_model.named_parameters(), fused_model.parameters()):
        assert max_relative_error(p, q) < 1e-6, name
        assert int(eager.state[p]["step"]) == int(fused.state[q]["step"]), name
    assert int(fused.state[fused_model.lm_head.weight]["step"]) == STEPS - 2


def test_fused_checkpoint_resumes_in_eager_and_back(runs):
    eager_model, fused_model, (eager, fused), _ = runs
    clone = copy.deepcopy(fused_model)
    resumed = amx.AdamMini(clone.named_parameters(), lr=3e-2, weight_decay=0.1, **HEADS)
    checkpoint = fused.state_dict()
    resumed.load_state_dict(checkpoint)
    # the loaded state is the optimizer's own: fused steps write in place and must not reach it
    first = next(clone.parameters())
    assert all(resumed.state[first][key].data_ptr() != checkpoint["state"][0][key].data_ptr()
               for key in ("step", "m", "v"))
    grads = gradient_sequence(initial_params(clone), 1, seed=7)[0]
    for model, opt in ((fused_model, fused), (clone, resumed)):
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
    for (name, p), q in zip(fused_model.named_parameters(), clone.parameters()):
        assert max_relative_error(p, q) < 1e-6, name


def test_fused_rejects_a_non_boolean():
    with pytest.raises(TypeError, match="fused must be True or False"):
        amx.AdamMini(TinyLlama(layers=1).named_parameters(), fused="yes", **HEADS)


def test_compiled_bias_correction_equals_the_eager_one_also_under_vmap():
    from adam_mini_tx.functional.transforms import _bias_correction
    counts = torch.arange(0, 60)
    expected = 1 - torch.tensor(0.999, dtype=torch.float64) ** counts.to(torch.float64)
    eager = torch.stack([_bias_correction(0.999, c) for c in counts])
    assert eager.dtype == torch.float64
    # ATen's vectorised pow over all counts at once may differ from the 0-d one in the last bit
    torch.testing.assert_close(eager, expected, rtol=1e-14, atol=0)
    compiled = torch.compile(_bias_correction, fullgraph=True, dynamic=False)
    # the compiled step computes the correction in its own small loop, with the same bits
    assert torch.equal(torch.stack([compiled(0.999, c) for c in counts]), eager)
    beta = torch.tensor(0.9)
    assert torch.equal(torch.stack([compiled(beta, c) for c in counts[:5]]),
                       torch.stack([_bias_correction(beta, c) for c in counts[:5]]))
    batched = torch.compile(torch.vmap(lambda c: _bias_correction(0.999, c)), fullgraph=True)
    torch.testing.assert_close(batched(counts), expected, rtol=1e-14, atol=0)


def test_per_block_denominator_computed_once_keeps_values_and_gradients():
    # under compile the denominator goes through an exact amax over copies (its own loop);
    # values and gradients through it must equal the eager ones
    tx = amx.blockwise_mean_square(0.999, {"w": amx.blocks.per_row((6, 4))}, eps=1e-3)
    grads = {"w": torch.randn(6, 4)}
    state = tx.init(grads)

    def loss(scale):
        out, _ = tx.update({"w": grads["w"] * scale}, state, grads=grads)
        return out["w"].square().sum()

    scale = torch.tensor(1.5, requires_grad=True)
    eager_value = loss(scale)
    (eager_grad,) = torch.autograd.grad(eager_value, scale)
    compiled_value = torch.compile(loss, backend="aot_eager", fullgraph=True)(scale)
    (compiled_grad,) = torch.autograd.grad(compiled_value, scale)
    assert torch.equal(compiled_value, eager_value)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=0)


def test_buckets_split_near_equally_and_keep_the_order():
    from adam_mini_tx.optim.backends.compiled import near_equal_split
    for n in range(1, 40):
        items = list(range(n))
        lists = near_equal_split(items, 8)
        lengths = [len(part) for part in lists]
        assert sum(lists, []) == items
        assert max(lengths) <= 8 and max(lengths) - min(lengths) <= 1
        assert len(lists) == -(-n // 8)


def test_rounds_hold_the_i_th_bucket_of_every_layout_and_a_failing_round_counts_only_earlier_ones(
        monkeypatch):
    """Buckets run in rounds (one compiled call each); step counts are bumped once per step, but
    only for the rounds that ran. The rounds run uncompiled here: this tests the bookkeeping."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    torch.manual_seed(0)
    model = TinyLlama(layers=5)  # 10 gate/up weights and 11 norms: two buckets each, 5 + 5, 6 + 5
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, fused=True, nonfinite="apply", **HEADS)
    opt.step()
    fused = opt._backends[1]
    hyper = read_hyperparameters(opt.param_groups[0], "")
    members = [Member(name, p, p.grad, opt.state[p]) for name, p in named.items()]
    rounds = fused.prepare(members, opt.plan.layouts(), hyper).rounds
    # round (1, 0): every layout that fits one bucket; rounds (2, 0) and (2, 1): the first and
    # the second bucket of the gate/up weights and of the norms
    assert len(rounds) == 3
    first, middle, last = ([member.name for bucket in buckets for member in bucket]
                           for _, _, buckets in rounds)
    assert sorted(first + middle + last) == sorted(named)
    assert [kind[:-1] for kind in rounds[1][1]] == [kind[:-1] for kind in rounds[2][1]]
    late_norms = [f"layers.{i}.{n}_layernorm.weight" for i in (3, 4) for n in ("input",
                                                                              "post_attention")]
    late_mlp = [f"layers.{i}.mlp.{n}_proj.weight" for i in (3, 4) for n in ("gate", "up")]
    assert sorted(last) == sorted(late_norms + ["norm.weight", "layers.2.mlp.up_proj.weight"]
                                    + late_mlp)

    def fail(scalars, args, sums):
        raise RuntimeError("kernel failed")

    fused._apply_fns[(rounds[2][1], False)] = fail
    before = {name: (p.detach().clone(), int(opt.state[p]["step"])) for name, p in named.items()}
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    for name, p in named.items():
        value, step = before[name]
        assert int(opt.state[p]["step"]) == step + (name not in last), name
        assert torch.equal(p, value) == (name in last), name


def test_fused_matches_eager_for_bf16_matrices_fp32_norms_and_fp32_state():
    """Mixed dtypes share a round (the matrices in bf16, the norms in fp32, state in fp32).
    ``nonfinite="apply"``: one pass per round that reads ``g`` for its statistics itself (the
    module's runs use the default check, with the statistics pass before the update)."""
    torch.manual_seed(2)
    eager_model = TinyLlama(layers=1)
    for name, p in eager_model.named_parameters():
        if p.dim() == 2:
            p.data = p.data.to(torch.bfloat16)
    fused_model = copy.deepcopy(eager_model)
    opts = [amx.AdamMini(m.named_parameters(), lr=1e-2, weight_decay=0.1, fused=fused,
                         state_dtype=torch.float32, nonfinite="apply", **HEADS)
            for m, fused in ((eager_model, False), (fused_model, True))]
    grads_seq = gradient_sequence(initial_params(eager_model), 3, seed=3)
    for grads in grads_seq:
        for model, opt in zip((eager_model, fused_model), opts):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            opt.step()
    dtypes = {p.dtype for p in fused_model.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}
    for (name, p), q in zip(eager_model.named_parameters(), fused_model.parameters()):
        assert q.dtype == p.dtype, name
        # a bf16 rounding step or two apart (the fp32 updates agree to ~1e-7); a wrong update
        # would be off by about lr = 1e-2
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-2, atol=1e-3)
        for key in ("m", "v"):
            eager_state, fused_state = opts[0].state[p][key], opts[1].state[q][key]
            assert fused_state.dtype == eager_state.dtype == torch.float32, (name, key)
            assert max_relative_error(eager_state, fused_state) < 1e-6, (name, key)
    start = TinyLlama(layers=1)
    assert any(not torch.equal(p.float(), q.float())
               for p, q in zip(start.parameters(), fused_model.parameters()))


def test_fused_skips_a_nonfinite_step_from_its_statistics_and_applies_overflowing_finite_ones():
    """The fused check reads the statistics pass: a NaN on the first step is skipped like the
    eager step does (warning, parameters and moments untouched), and finite gradients whose
    squares overflow fp32 (|g| = 1e30) are applied, as eagerly, not skipped."""
    torch.manual_seed(4)
    eager_model = TinyLlama(layers=1)
    fused_model = copy.deepcopy(eager_model)
    start = copy.deepcopy(eager_model)
    opts = [amx.AdamMini(m.named_parameters(), lr=1e-2, weight_decay=0.1, fused=fused, **HEADS)
            for m, fused in ((eager_model, False), (fused_model, True))]
    grads_seq = gradient_sequence(initial_params(eager_model), 3, seed=5)
    grads_seq[0]["layers.0.mlp.up_proj.weight"][3, 1] = float("nan")
    grads_seq[2]["layers.0.mlp.down_proj.weight"][2, 0] = 1e30
    for t, grads in enumerate(grads_seq):
        for model, opt in zip((eager_model, fused_model), opts):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            if t == 0:
                with pytest.warns(RuntimeWarning, match=r"non-finite gradient in "
                                                        r"\['layers.0.mlp.up_proj.weight'\]"):
                    opt.step()
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                             start.parameters()))
            else:
                opt.step()
    for opt in opts:
        assert opt.param_groups[0]["nonfinite_skipped"] == 1
    for (name, p), q in zip(eager_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
        assert int(opts[1].state[q]["step"]) == int(opts[0].state[p]["step"]) == 2, name
        for key in ("m", "v"):
            torch.testing.assert_close(opts[1].state[q][key], opts[0].state[p][key],
                                       rtol=1e-5, atol=1e-7)
    overflowed = opts[1].state[fused_model.layers[0].mlp.down_proj.weight]["v"]
    assert torch.isinf(overflowed[2]) and torch.isfinite(overflowed[3:]).all()
    # the statistics pass keeps one fp32 sum per row of every parameter, and nothing else
    rows = sum(amx.plan_blocks(fused_model, **HEADS)[name].layout.num_rows
               for name, _ in fused_model.named_parameters())
    assert opts[1].scratch_bytes == 4 * rows
