"""Multi-process scenarios for tests/test_distributed.py (CPU, gloo). Each scenario is a function
``(rank, world, out_dir) -> dict`` whose rank-0 result is saved to ``out_dir/<scenario>.pt``."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import adam_mini_tx as amx
from adam_mini_tx import blocks
from adam_mini_tx.demo.model import GPT, GPTConfig

# 5 heads of width 8 and 1 KV head: 40 query rows split 20/20 over 2 ranks and 14/14/12 over 3,
# so heads straddle shard boundaries; the 8 key rows split 3/3/2.
CONFIG = GPTConfig(vocab_size=32, dim=40, n_layers=2, n_heads=5, n_kv_heads=1, hidden=72, max_seq=16)
STEPS, CHECKPOINT_AT = 10, 5
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CONFIG.vocab_size, (4, 13), generator=gen)


def make_optimizer(model: torch.nn.Module, fused: bool = False,
                   momentum_format: str | None = None, native: bool | None = None
                   ) -> amx.AdamMini:
    return amx.AdamMini(model.named_parameters(), n_heads=CONFIG.n_heads,
                        n_kv_heads=CONFIG.n_kv_heads, fused=fused,
                        momentum_format=momentum_format, native=native, **HYPER)


def train(model, opt, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        model.loss(batch(step)).backward()
        opt.step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def sharded_model(mesh):
    model = make_model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def save_checkpoint(model, opt, path: str) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=path)


def load_checkpoint(model, opt, path: str) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt, options=options)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=options)


def state_placements(opt) -> set[str]:
    return {type(p).__name__ for s in opt.state.values() for t in s.values()
            if isinstance(t, DTensor) for p in t.placements}


# ----- scenarios ---------------------------------------------------------------------------------
def dtensor_layouts(rank, world, out):
    """Tensor parallel: every layout on Shard(0) (column-parallel), Shard(1) (row-parallel) and
    Replicate equals the unsharded update; no state is Partial."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    layouts = {"rows": blocks.per_row((5, 4)), "heads": blocks.per_head((6, 4), 3),
               "whole": blocks.single_block((5,)), "elementwise": blocks.elementwise((5, 3)),
               "columns": blocks.per_row((4, 6), transposed=True),
               "qkv": blocks.fused_rows((12, 4), [("q", 2), ("k", 1), ("v", 3)],
                                        rows_per_segment=[6, 3, 3]),
               "experts": blocks.per_row((3, 5, 4), row_dims=2)}
    params = {k: torch.randn(l.shape) for k, l in layouts.items()}
    grads = {k: torch.randn(l.shape) for k, l in layouts.items()}
    tx = amx.adam_mini(plan=layouts, **HYPER)
    state = tx.init(params)
    expected = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        expected.append(updates)
    errors, placements = {}, set()
    for placement in (Shard(0), Shard(1), Replicate()):
        for name, layout in layouts.items():
            if isinstance(placement, Shard) and placement.dim >= len(layout.shape):
                continue
            p = {name: distribute_tensor(params[name], mesh, [placement])}
            g = {name: distribute_tensor(grads[name], mesh, [placement])}
            sub = amx.adam_mini(plan={name: layout}, **HYPER)
            state = sub.init(p)
            worst = 0.0
            for step in range(3):
                updates, state = sub.update(g, state, p)
                worst = max(worst, (updates[name].full_tensor() - expected[step][name]).abs().max().item())
            placements.update(type(x).__name__ for t in torch.utils._pytree.tree_leaves(state)
                              if isinstance(t, DTensor) for x in t.placements)
            errors[f"{placement}/{name}"] = worst
    return {"errors": errors, "placements": placements}


def fsdp_train_and_checkpoint(rank, world, out):
    """FSDP2: 10 steps; a DCP checkpoint at step 5; a fresh model and optimizer resumed from it
    (with ``fused=True``: DTensor parameters take the eager path, so it must resume exactly)."""
    mesh = init_device_mesh("cpu", (world,))
    model = sharded_model(mesh)
    opt = make_optimizer(model)
    train(model, opt, range(CHECKPOINT_AT))
    path = os.path.join(out, f"ckpt_{world}ranks")
    save_checkpoint(model, opt, path)
    train(model, opt, range(CHECKPOINT_AT, STEPS))
    uninterrupted = full_params(model)
    placements = state_placements(opt)

    resumed = sharded_model(mesh)
    opt2 = make_optimizer(resumed, fused=True)
    load_checkpoint(resumed, opt2, path)
    train(resumed, opt2, range(CHECKPOINT_AT, STEPS))
    return {"uninterrupted": uninterrupted, "resumed": full_params(resumed),
            "placements": placements}


LOW_PRECISION_LAYOUTS = {
    "rows": lambda: blocks.per_row((5, 300)), "heads": lambda: blocks.per_head((6, 4), 3),
    "norm": lambda: blocks.single_block((1100,)), "wide": lambda: blocks.per_row((3, 1100)),
    "tiny": lambda: blocks.elementwise((2,)), "experts": lambda: blocks.per_row((3, 5, 4), row_dims=2),
    "columns": lambda: blocks.per_row((4, 6), transposed=True)}


def dtensor_low_precision(rank, world, out):
    """Functional core on DTensors, bf16 and int8 ``m``: every layout on Shard(0), Shard(1) and
    Replicate (groups of 220 straddle the shards of the (1100,) and (3, 1100) tensors; the (2,)
    one leaves a rank empty on 3 ranks). Returns whether each stored ``m`` (codes and scales)
    equals the unsharded one bit for bit, the worst update error and the scales' placements."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    layouts = {name: make() for name, make in LOW_PRECISION_LAYOUTS.items()}
    params = {k: torch.randn(l.shape) for k, l in layouts.items()}
    grads = [{k: torch.randn(l.shape) for k, l in layouts.items()} for _ in range(3)]
    exact, errors, scale_placements = {}, {}, {}
    for fmt in ("bfloat16", "int8"):
        tx = amx.adam_mini(plan=layouts, momentum_format=fmt, **HYPER)
        state = tx.init(params)
        expected = []
        for g in grads:
            updates, state = tx.update(g, state, params)
            expected.append(updates)
        whole = state[0].mu
        for placement in (Shard(0), Shard(1), Replicate()):
            for name, layout in layouts.items():
                if isinstance(placement, Shard) and placement.dim >= len(layout.shape):
                    continue
                key = f"{fmt}/{placement}/{name}"
                p = {name: distribute_tensor(params[name], mesh, [placement])}
                sub = amx.adam_mini(plan={name: layout}, momentum_format=fmt, **HYPER)
                sub_state = sub.init(p)
                worst = 0.0
                for step, g in enumerate(grads):
                    g = {name: distribute_tensor(g[name], mesh, [placement])}
                    updates, sub_state = sub.update(g, sub_state, p)
                    worst = max(worst, (updates[name].full_tensor()
                                        - expected[step][name]).abs().max().item())
                m = sub_state[0].mu[name]
                if fmt == "int8":
                    exact[key] = (torch.equal(m.codes.full_tensor(), whole[name].codes)
                                  and torch.equal(m.scales.full_tensor(), whole[name].scales))
                    scale_placements[key] = str(m.scales.placements)
                else:
                    exact[key] = torch.equal(m.full_tensor(), whole[name])
                errors[key] = worst
    return {"exact": exact, "errors": errors, "scale_placements": scale_placements,
            **low_precision_checks(mesh)}


def low_precision_checks(mesh) -> dict[str, str]:
    """The errors AdamMini raises for a Partial parameter and for an int8 ``m`` loaded as a plain
    tensor, and the placement of scales loaded replicated (placed back as Shard(0))."""
    def error_of(action) -> str:
        try:
            action()
        except ValueError as error:
            return str(error)
        return ""

    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    refused = error_of(lambda: amx.AdamMini([("odd.weight", partial)], momentum_format="int8"))
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    opt = amx.AdamMini([("mlp.up_proj.weight", sharded)], momentum_format="int8")
    sharded.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    opt.step()
    saved = opt.state_dict()
    plain = {**saved, "state": {0: {**saved["state"][0], "m": saved["state"][0]["m"].full_tensor()}}}
    not_sharded = error_of(lambda: opt.load_state_dict(plain))
    replicated = saved["state"][0]["m_scale"].redistribute(mesh, [Replicate()])
    opt.load_state_dict({**saved, "state": {0: {**saved["state"][0], "m_scale": replicated}}})
    return {"refused": refused, "not_sharded": not_sharded,
            "reloaded_scales": str(opt.state[sharded]["m_scale"].placements)}


LOW_FORMATS = ("float32", "bfloat16", "int8")


def fsdp_low_precision(rank, world, out):
    """FSDP2 with every ``momentum_format``: 10 steps; a DCP checkpoint at step 5 (and the full
    state there); a fresh 2-rank model and optimizer resumed from it."""
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for fmt in LOW_FORMATS:
        model = sharded_model(mesh)
        opt = make_optimizer(model, momentum_format=fmt)
        train(model, opt, range(CHECKPOINT_AT))
        path = os.path.join(out, f"ckpt_{fmt}_{world}ranks")
        save_checkpoint(model, opt, path)
        state = full_state(model, opt)
        train(model, opt, range(CHECKPOINT_AT, STEPS))
        uninterrupted = full_params(model)
        resumed = sharded_model(mesh)
        opt2 = make_optimizer(resumed, fused=True, momentum_format=fmt)
        load_checkpoint(resumed, opt2, path)
        train(resumed, opt2, range(CHECKPOINT_AT, STEPS))
        placements = {name: str(opt.state[p][key].placements) for name, p in
                      model.named_parameters() for key in ("m", "m_scale") if key in opt.state[p]}
        result[fmt] = {"uninterrupted": uninterrupted, "resumed": full_params(resumed),
                       "state": state, "placements": placements}
    return result


def full_state(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's optimizer state as whole tensors, by parameter name."""
    return {name: {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
                   for k, v in opt.state[p].items()} for name, p in model.named_parameters()}


def fsdp_reshard_from_two(rank, world, out):
    """Load the 2-rank step-5 checkpoint into this world size and finish the run; also a fresh
    FSDP2 run at this world size."""
    mesh = init_device_mesh("cpu", (world,))
    model = sharded_model(mesh)
    opt = make_optimizer(model)
    train(model, opt, range(STEPS))
    fresh = full_params(model)
    resumed = sharded_model(mesh)
    opt2 = make_optimizer(resumed)
    load_checkpoint(resumed, opt2, os.path.join(out, "ckpt_2ranks"))
    train(resumed, opt2, range(CHECKPOINT_AT, STEPS))
    return {"fresh": fresh, "resumed": full_params(resumed)}


def ddp_train(rank, world, out):
    """DDP works unchanged: the same batch on every rank gives the single-process run, with
    fp32 and with int8 momentum."""
    out = {}
    for key, momentum_format in (("params", None), ("int8", "int8")):
        model = DistributedDataParallel(make_model())
        opt = make_optimizer(model.module, momentum_format=momentum_format)
        for step in range(STEPS):
            opt.zero_grad()
            _ddp_loss(model, step).backward()
            opt.step()
        out[key] = full_params(model.module)
    return out


def _ddp_loss(model, step):
    tokens = batch(step)
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))


def fsdp_native_one_rank(rank, world, out):
    """FSDP2 on a one-rank mesh (every DTensor all local): the native kernel steps it."""
    model = sharded_model(init_device_mesh("cpu", (world,)))
    opt = make_optimizer(model)
    backend, calls = opt._backends.native, []
    step = backend.step
    backend.step = lambda members, scalars: (calls.append(len(members)), step(members, scalars))
    train(model, opt, range(STEPS))
    return {"params": full_params(model), "calls": len(calls), "step_kind": opt.step_kind}


SCENARIOS = {f.__name__: f for f in (dtensor_layouts, fsdp_train_and_checkpoint,
                                      fsdp_reshard_from_two, ddp_train, dtensor_low_precision,
                                      fsdp_low_precision, fsdp_native_one_rank)}


def worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            result = SCENARIOS[name](rank, world, out)
            dist.barrier()
            if rank == 0:
                torch.save(result, os.path.join(out, f"{name}_{world}.pt"))
    finally:
        dist.destroy_process_group()


__all__ = ["worker", "make_model", "make_optimizer", "train", "load_checkpoint", "full_state",
           "STEPS", "CHECKPOINT_AT", "LOW_FORMATS"]
