"""torch.distributed on CPU (gloo), for real: spawned processes, batched into few spawns.

- tensor parallel: every layout sharded on dim 0 or 1 equals the unsharded update; no Partial state;
- FSDP2 with 2 and 3 ranks (heads straddle shard boundaries) equals the single-process run;
- a DCP checkpoint at step 5 resumes exactly; it reshards 2 -> 1 and 2 -> 3;
- DDP works unchanged.
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
    return out, spawn(2, out, "dtensor_layouts", "fsdp_train_and_checkpoint", "ddp_train")


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


def test_three_ranks_and_reshard_two_to_three(two_ranks):
    out, _ = two_ranks
    run = spawn(3, out, "fsdp_reshard_from_two")["fsdp_reshard_from_two"]
    reference = single_process_run()
    assert_params_close(run["fresh"], reference)
    assert_params_close(run["resumed"], reference)


def test_reshard_two_to_one_process(two_ranks):
    out, _ = two_ranks
    model = w.make_model()
    opt = w.make_optimizer(model)
    w.load_checkpoint(model, opt, str(out / "ckpt_2ranks"))
    assert_params_close(single_process_run(range(w.CHECKPOINT_AT, w.STEPS), model, opt),
                        single_process_run())
