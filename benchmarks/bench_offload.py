"""DeepSpeed ZeRO-Offload on the CPU: AdamMini's step against DeepSpeedCPUAdam in one configuration.

ZeRO stage 2 with ``offload_optimizer: {device: cpu}``, fp32, one process (gloo). Four engines
on copies of the benchmark's Llama-shaped model train side by side, round by round; the time of
the client optimizer's own ``step()`` (between its step pre- and post-hooks) is the number, as a
ratio to DeepSpeedCPUAdam's, and the whole ``engine.step()`` besides.

    python -m torch.distributed.run --nproc_per_node 1 benchmarks/bench_offload.py --size 36m
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import deepspeed
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from adam_mini_tx import AdamMini
from bench_step import llama_model


def config() -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": 0.0, "steps_per_print": 10**9}


def timed(opt: torch.optim.Optimizer, times: list[float]) -> None:
    """Record the wall time of every ``opt.step()`` into ``times``."""
    start = [0.0]
    opt.register_step_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))
    opt.register_step_post_hook(lambda *_: times.append(time.perf_counter() - start[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="36m")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    base = llama_model(args.size)
    heads, kv = base.config.n_heads, base.config.n_kv_heads
    makers = {
        "DeepSpeedCPUAdam": lambda m: DeepSpeedCPUAdam(m.parameters(), lr=1e-4),
        "AdamMini native": lambda m: AdamMini(m.named_parameters(), lr=1e-4, n_heads=heads,
                                              n_kv_heads=kv, native=True),
        'AdamMini native, nonfinite="apply"': lambda m: AdamMini(
            m.named_parameters(), lr=1e-4, n_heads=heads, n_kv_heads=kv, native=True,
            nonfinite="apply"),
        "AdamMini eager": lambda m: AdamMini(m.named_parameters(), lr=1e-4, n_heads=heads,
                                             n_kv_heads=kv, native=False),
    }
    engines, step_times, engine_times = {}, {}, {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        opt = make(model)
        step_times[name], engine_times[name] = [], []
        timed(opt, step_times[name])
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=opt, config=config())
    tokens = torch.randint(0, base.config.vocab_size, (1, 17),
                           generator=torch.Generator().manual_seed(0))
    for round_ in range(args.warmup + args.rounds):
        for name, engine in engines.items():
            loss = engine.module.loss(tokens)
            engine.backward(loss)
            start = time.perf_counter()
            engine.step()
            if round_ >= args.warmup:
                engine_times[name].append(time.perf_counter() - start)
    anchor = statistics.median(step_times["DeepSpeedCPUAdam"][args.warmup:])
    anchor_engine = statistics.median(engine_times["DeepSpeedCPUAdam"])
    n = sum(p.numel() for p in base.parameters())
    print(f"ZeRO-2 + offload_optimizer cpu, fp32, {n / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)\n")
    print("| optimizer | optimizer.step ms | x DeepSpeedCPUAdam | engine.step ms | x |")
    print("|---|---|---|---|---|")
    for name in engines:
        step = statistics.median(step_times[name][args.warmup:])
        whole = statistics.median(engine_times[name])
        print(f"| {name} | {1e3 * step:.1f} | {step / anchor:.2f} | {1e3 * whole:.1f} | "
              f"{whole / anchor_engine:.2f} |")


if __name__ == "__main__":
    main()
