"""The Triton single-pass Adam-mini step against torch ``AdamW(fused=True)`` on CUDA.

Only the step is timed (fixed random gradients; both candidates interleaved round by round), at
the Llama-shaped sizes of ``bench_step.py``. Each step is reported as a ratio to AdamW and as a
multiple of its own bandwidth bound (Adam-mini single pass: 20 B/param, AdamW: 28). Before
timing, one Triton step is checked against the functional chain ``adam_mini(...)`` on the
model's own shapes (largest relative difference of ``p``, ``m`` and ``v``).

    python benchmarks/gpu_bench_kernel.py --sizes 125m,350m --rounds 20 --out benchmarks/out
    TRITON_INTERPRET=1 python benchmarks/gpu_bench_kernel.py --device cpu --sizes tiny --rounds 1

Writes ``kernel_results.md`` and ``kernel_results.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import adam_mini_tx as amx  # noqa: E402
from adam_mini_tx.functional.alias import adam_mini_slots, decay_matrices_only  # noqa: E402
from adam_mini_tx.kernels import triton_step  # noqa: E402
from adam_mini_tx.kernels.spec import KernelMember, geometry, step_scalars  # noqa: E402
from bench_step import (BYTES_PER_PARAM, interleaved_step_times, llama_model,  # noqa: E402
                        stream_bandwidth)

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.1


class TritonAdamMini:
    """The smallest optimizer around :func:`triton_step.step_`: fp32 ``m``, one ``v`` per block,
    decay on matrices (the ``adam_mini`` default)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], plan: dict):
        self.named, self.count = named, 0
        self.state = {}
        for name, p in named:
            geom = geometry(plan[name])
            if geom is None:
                raise ValueError(f"{name}: layout {plan[name].pattern!r} has no kernel geometry")
            self.state[name] = (torch.zeros_like(p, dtype=torch.float32),
                                p.new_zeros(plan[name].v_shape, dtype=torch.float32), geom,
                                decay_matrices_only(name, p) == "decay")

    def step(self) -> None:
        self.count += 1
        members = [KernelMember(name, p, p.grad, m, None, v, None, *geom, decay, None)
                   for (name, p), (m, v, geom, decay) in zip(self.named, self.state.values())]
        triton_step.step_(members, step_scalars(LR, *BETAS, EPS, 0.0, WD, self.count))


def checked_against_chain(model: torch.nn.Module, plan: dict, grads: list) -> float:
    """The largest relative difference of p, m and v after one step of each, from the same start."""
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    for (_, p), g in zip(named, grads):
        p.grad = g
    kernel = TritonAdamMini(named, plan)
    params = {n: p.clone() for n, p in named}
    kernel.step()
    tx = amx.adam_mini(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, plan=plan)
    updates, state = tx.update(dict(zip(params, grads)), tx.init(params), params)
    chain = amx.apply_updates(params, updates)
    worst = 0.0
    for (name, p), (m, v, _, _) in zip(named, kernel.state.values()):
        ref = adam_mini_slots(state, name)
        for mine, theirs in ((p, chain[name]), (m, ref["m"]), (v, ref["v"])):
            scale = theirs.abs().max().clamp_min(1e-30)
            worst = max(worst, ((mine - theirs).abs().max() / scale).item())
    return worst


def bench_size(size: str, rounds: int, warmup: int, device: torch.device) -> dict:
    model = llama_model(size).to(device)
    config = model.config
    plan = amx.plan_blocks(model, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads).layouts()
    n_params = sum(p.numel() for p in model.parameters())
    grads = [torch.randn_like(p) for p in model.parameters()]
    check = checked_against_chain(model, plan, grads)
    params = [p for p in model.parameters()]
    opts = {"AdamW fused": ("adamw", torch.optim.AdamW(params, lr=LR, weight_decay=WD,
                                                      fused=True)),
            "Adam-mini Triton single pass": ("adam_mini",
                                             TritonAdamMini(list(model.named_parameters()), plan))}
    bandwidth = stream_bandwidth(device)
    times = interleaved_step_times(opts, params, grads, rounds, warmup, device)
    bandwidth = max(bandwidth, stream_bandwidth(device))
    adamw = statistics.median(times["AdamW fused"])
    rows = [{"candidate": name, "step_ms": 1e3 * statistics.median(times[name]),
             "x_adamw_fused": statistics.median(times[name]) / adamw,
             "x_own_bound": statistics.median(times[name])
             / (BYTES_PER_PARAM[kind] * n_params / bandwidth)}
            for name, (kind, _) in opts.items()]
    return {"size": size, "params": n_params, "bandwidth_gbs": bandwidth / 1e9,
            "launches": len(params), "max_rel_diff_vs_chain": check, "rows": rows,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}


def markdown(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {results[0]['device']}, torch "
             f"{torch.__version__}", ""]
    for res in results:
        lines += [f"### {res['size']} ({res['params'] / 1e6:.1f}M params, {res['launches']} "
                  f"kernel launches per Triton step; streaming bandwidth "
                  f"{res['bandwidth_gbs']:.0f} GB/s; one step vs the chain: largest relative "
                  f"difference {res['max_rel_diff_vs_chain']:.1e})", "",
                  "| candidate | step ms | x AdamW fused | x own bandwidth bound |",
                  "|---|---|---|---|"]
        lines += [f"| {r['candidate']} | {r['step_ms']:.3f} | {r['x_adamw_fused']:.2f} | "
                  f"{r['x_own_bound']:.2f} |" for r in res["rows"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125m,350m")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if not triton_step.available():
        sys.exit(f"the Triton step cannot run here: {triton_step.unavailable_reason()}")
    results = [bench_size(s.strip(), args.rounds, args.warmup, torch.device(args.device))
               for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    text = markdown(results, "python " + " ".join(sys.argv))
    print(text)
    with open(os.path.join(args.out, "kernel_results.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "kernel_results.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
