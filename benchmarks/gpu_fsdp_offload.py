"""FSDP2 with ``CPUOffloadPolicy`` on one GPU: AdamMini trains, and its host-side step is timed.

The forward and backward run on CUDA; the sharded parameters, their gradients, the optimizer state
and the step live on the host (a CPU-only torch cannot run this: FSDP2's offload needs an
accelerator). Two checks, then a benchmark:

1. training: 6 steps of AdamMini under FSDP2 + CPU offload equal 6 steps of AdamMini on the same
   model without FSDP on the GPU (1e-4 relative: GPU vs host arithmetic), and the loss falls;
2. the step is timed against torch ``AdamW`` (``foreach``, on the same offloaded DTensors),
   interleaved, medians of ``--rounds``.

    python -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu_fsdp_offload.py --size 125m
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from adam_mini_tx import AdamMini
from bench_step import llama_model

STEPS = 6


def offloaded(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.layers:
        fully_shard(layer, offload_policy=CPUOffloadPolicy())
    fully_shard(model, offload_policy=CPUOffloadPolicy())
    return model


def make(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    cfg = model.config
    if kind == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    return AdamMini(model.named_parameters(), lr=1e-3, weight_decay=0.1, n_heads=cfg.n_heads,
                    n_kv_heads=cfg.n_kv_heads)


def batches(vocab: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (4, 65), generator=generator).cuda() for _ in range(count)]


def train_check(size: str) -> None:
    base = llama_model(size)
    reference = copy.deepcopy(base).cuda()
    sharded = offloaded(copy.deepcopy(base).cuda())
    opts = [make(reference, "AdamMini"), make(sharded, "AdamMini")]
    losses = []
    for batch in batches(base.config.vocab_size, STEPS):
        for model, opt in zip((reference, sharded), opts):
            opt.zero_grad()
            loss = model.loss(batch)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    worst = 0.0
    for (name, p), q in zip(reference.named_parameters(), sharded.parameters()):
        full = q.to_local().to("cuda")  # one rank: its shard is the whole tensor
        worst = max(worst, ((p - full).abs().max() / p.abs().max()).item())
    print(f"training check: {STEPS} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"largest relative difference to the unsharded GPU run {worst:.2e}, "
          f"step: {opts[1].step_kind}")
    assert worst < 1e-4 and losses[-1] < losses[0], (worst, losses)


def benchmark(size: str, rounds: int, warmup: int) -> None:
    base = llama_model(size)
    runs = {}
    for kind in ("AdamW", "AdamMini"):
        model = offloaded(copy.deepcopy(base).cuda())
        runs[kind] = (model, make(model, kind), [])
    for round_, batch in enumerate(batches(base.config.vocab_size, warmup + rounds)):
        for model, opt, times in runs.values():
            opt.zero_grad()
            model.loss(batch).backward()
            start = time.perf_counter()
            opt.step()
            if round_ >= warmup:
                times.append(time.perf_counter() - start)
    anchor = statistics.median(runs["AdamW"][2])
    n = sum(p.numel() for p in base.parameters())
    print(f"\nFSDP2 + CPUOffloadPolicy, {n / 1e6:.0f}M params, host step on "
          f"{torch.get_num_threads()} threads, {rounds} rounds (medians)\n")
    print("| optimizer (host step) | step ms | x AdamW foreach |\n|---|---|---|")
    for kind, (_, _, times) in runs.items():
        step = statistics.median(times)
        print(f"| {kind} | {1e3 * step:.1f} | {step / anchor:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="125m")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "FSDP2's CPU offload needs a GPU"
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl")  # host tensors: gloo
    assert torch.distributed.get_world_size() == 1, "run it with --nproc_per_node 1"
    torch.cuda.set_device(0)
    train_check("36m")
    benchmark(args.size, args.rounds, args.warmup)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
