"""torch.distributed on CPU (gloo), for real: spawned processes, batched into few spawns.

- tensor parallel: every layout sharded on dim 0 or 1 equals the unsharded update; no Partial state;
- FSDP2 with 2 and 3 ranks (heads straddle shard boundaries) equals the single-process run;
- a DCP checkpoint at step 5 resumes exactly; it reshards 2 -> 1 and 2 -> 3;
- DDP works unchanged;
- low-precision momentum (bf16, int8) on DTensors: the stored ``m`` equals the unsharded one bit
  for bit for every layout on Shard(0), Shard(1) and Replicate, with int8 groups straddling
  shards and uneven and empty shards on 3 ranks; FSDP2 with every ``momentum_format`` equals the
  single-process run, resumes from DCP exactly and reshards 2 -> 1.
"""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker as w

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not built")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out, *scenarios: str) -> dict:
    mp.spawn(w.worker, args=(world, free_port(), str(out), list(scenarios)), nprocs=world,
             join=True)
    return {name: torch.load(out / f"{name}_{world}.pt", weights_only=False) for name in scenarios}


def single_process_run(steps=range(w.STEPS), model=None, opt=None):
    model = model or w.make_model()
    opt = opt or w.make_optimizer(model)
    w.train(model, opt, steps)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(got, expected, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    return out, spawn(2, out, "dtensor_layouts", "fsdp_train_and_checkpoint", "ddp_train",
                      "dtensor_low_precision", "fsdp_low_precision")


def test_tensor_parallel_layouts_equal_unsharded(two_ranks):
    _, results = two_ranks
    layouts = results["dtensor_layouts"]
    assert max(layouts["errors"].values()) < 1e-6, layouts["errors"]
    assert any(k.startswith("S(1)") for k in layouts["errors"])  # row-parallel covered
    assert "Partial" not in layouts["placements"]


def test_fsdp2_two_ranks_equals_single_process(two_ranks):
    _, results = two_ranks
    run = results["fsdp_train_and_checkpoint"]
    assert_params_close(run["uninterrupted"], single_process_run())
    assert "Partial" not in run["placements"] and "Shard" in run["placements"]


def test_dcp_checkpoint_resumes_exactly(two_ranks):
    _, results = two_ranks
    run = results["fsdp_train_and_checkpoint"]
    assert_params_close(run["resumed"], run["uninterrupted"], atol=0)


def test_dcp_lazy_state_init_leaves_params_unchanged():
    """DCP creates missing optimizer state by stepping with zero gradients and lr=0."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = w.make_model()
    opt = w.make_optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _init_optim_state(opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(set(opt.state[p]) == {"step", "m", "v"} for p in model.parameters())
    assert opt.param_groups[0]["lr"] == w.HYPER["lr"]


def test_ddp_works_unchanged(two_ranks):
    _, results = two_ranks
    assert_params_close(results["ddp_train"]["params"], single_process_run())
    model = w.make_model()
    int8 = single_process_run(model=model, opt=w.make_optimizer(model, momentum_format="int8"))
    assert_params_close(results["ddp_train"]["int8"], int8)


@pytest.fixture(scope="module")
def three_ranks(two_ranks):
    out, _ = two_ranks
    return spawn(3, out, "fsdp_reshard_from_two", "dtensor_low_precision")


def test_three_ranks_and_reshard_two_to_three(three_ranks):
    run = three_ranks["fsdp_reshard_from_two"]
    reference = single_process_run()
    assert_params_close(run["fresh"], reference)
    assert_params_close(run["resumed"], reference)


@pytest.mark.parametrize("world", [2, 3])
def test_low_precision_dtensor_moment_equals_the_unsharded_one_bit_for_bit(two_ranks,
                                                                            three_ranks, world):
    run = (two_ranks[1] if world == 2 else three_ranks)["dtensor_low_precision"]
    assert len(run["exact"]) == 38 and all(run["exact"].values()), \
        [key for key, same in run["exact"].items() if not same]
    assert max(run["errors"].values()) < 1e-6, run["errors"]
    placements = run["scale_placements"]  # scales follow the rows, replicated where cut
    assert placements["int8/S(0)/wide"] == "(Shard(dim=0),)"
    assert placements["int8/S(0)/norm"] == placements["int8/S(1)/wide"] == "(Replicate(),)"
    assert placements["int8/S(1)/experts"] == "(Shard(dim=1),)"
    assert "'odd.weight'" in run["refused"] and "Shard or Replicate" in run["refused"]
    assert "'m' of parameter 'mlp.up_proj.weight' is not a DTensor" in run["not_sharded"]
    assert run["reloaded_scales"] == "(Shard(dim=0),)"


def single_process_state(fmt, steps=range(w.CHECKPOINT_AT)):
    """The state of one process stepping eagerly, as FSDP2's DTensors are stepped (the native
    CPU kernel equals the chain within 1e-6, and training feeds that back into the gradients, so
    a low-precision m compared bit for bit must come from the same step)."""
    model = w.make_model()
    opt = w.make_optimizer(model, momentum_format=fmt, native=False)
    w.train(model, opt, steps)
    return w.full_state(model, opt)


@pytest.mark.parametrize("fmt", w.LOW_FORMATS)
def test_fsdp2_every_momentum_format_equals_single_process(two_ranks, fmt):
    """Parameters within 1e-6 (as fp32 state: a sharded norm's statistic is summed in another
    order); the stored low-precision ``m`` at step 5 equal bit for bit, since ``m`` depends on
    the gradients only and each shard rounds with its elements' global indices."""
    run = two_ranks[1]["fsdp_low_precision"][fmt]
    model = w.make_model()
    assert_params_close(run["uninterrupted"],
                        single_process_run(model=model, opt=w.make_optimizer(
                            model, momentum_format=fmt, native=False)))
    if fmt != "float32":
        expected = single_process_state(fmt)
        for name, state in expected.items():
            for key in ("m", "m_scale"):
                if key in state:
                    assert torch.equal(run["state"][name][key], state[key]), (name, key)
    if fmt == "int8":
        assert run["placements"]["norm.weight"] == "(Replicate(),)"  # m_scale: a cut group
        assert run["placements"]["lm_head.weight"] == "(Shard(dim=0),)"


@pytest.mark.parametrize("fmt", w.LOW_FORMATS)
def test_dcp_resume_and_reshard_two_to_one_with_every_momentum_format(two_ranks, fmt):
    """2 -> 2 (fused, eager for DTensors) resumes bit for bit; 2 -> 1 loads the gathered state
    bit for bit (moving data only) and finishes the run as the 2-rank one did, within 1e-6: the
    2-rank run sums a sharded norm's statistic in another order (the only difference the math
    allows; the low-precision ``m`` rounds with the same noise on 1 and 2 ranks)."""
    out, results = two_ranks
    run = results["fsdp_low_precision"][fmt]
    assert_params_close(run["resumed"], run["uninterrupted"], atol=0)
    model = w.make_model()
    opt = w.make_optimizer(model, momentum_format=fmt, native=False)  # as FSDP2 steps
    w.load_checkpoint(model, opt, str(out / f"ckpt_{fmt}_2ranks"))
    loaded = w.full_state(model, opt)
    assert loaded.keys() == run["state"].keys()
    for name, state in loaded.items():
        assert state.keys() == run["state"][name].keys()
        for key, value in state.items():
            assert torch.equal(value, run["state"][name][key]), (name, key)
    continued = single_process_run(range(w.CHECKPOINT_AT, w.STEPS), model, opt)
    assert_params_close(continued, run["uninterrupted"])


def test_reshard_two_to_one_process(two_ranks):
    out, _ = two_ranks
    model = w.make_model()
    opt = w.make_optimizer(model)
    w.load_checkpoint(model, opt, str(out / "ckpt_2ranks"))
    assert_params_close(single_process_run(range(w.CHECKPOINT_AT, w.STEPS), model, opt),
                        single_process_run())


def test_fsdp2_on_one_rank_steps_through_the_native_kernel(tmp_path):
    """One rank holds every value of its DTensors (FSDP2 on one GPU with CPU offload keeps them on
    the host): the native kernel steps their local tensors, and the run equals one process's.
    With more ranks (the tests above) the shards go through the eager chain."""
    from adam_mini_tx.kernels import native
    if not native.load():
        pytest.skip(f"native kernel: {native.status()}")
    result = spawn(1, tmp_path, "fsdp_native_one_rank")["fsdp_native_one_rank"]
    assert result["calls"] >= w.STEPS and result["step_kind"].startswith("native")
    assert_params_close(result["params"], single_process_run())
