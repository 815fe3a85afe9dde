"""What bounds a CPU step here: the bytes it reads. Each pass's time against its read and write
bytes per parameter, interleaved in one process (medians), on the benchmark's Llama-shaped model.

    python benchmarks/read_bound.py --size 36m
    python benchmarks/read_bound.py --size 125m --rounds 6

Passes: torch's fused AdamW (reads p, g, m, v; writes p, m, v); the native kernel's single pass
(reads p, g, m; writes p, m), its statistics pass alone (reads g: the non-finite check), the
update given those sums (as the single pass), and the two in a row (the default
``nonfinite="skip"`` step); two plain torch passes for the machine: a read-only ``g.sum()`` and an
in-place ``g.mul_(1)``. The "read GB/s" column is read bytes / time: where it is about the same
for every pass, the step time is set by what it reads, and a step that reads as much as AdamW
cannot be faster than AdamW.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from adam_mini_tx import AdamMini
from adam_mini_tx.kernels import native
from adam_mini_tx.optim.backends.kernel import scalars_for
from adam_mini_tx.optim.hyperparams import read_hyperparameters
from adam_mini_tx.optim.members import Member
from bench_step import llama_model
from timing import interleaved_medians


def kernel_passes(model: torch.nn.Module) -> dict[str, tuple[Callable[[], object], int, int]]:
    """name -> (call, read bytes, written bytes per fp32 parameter) of the native kernel's
    passes on ``model``'s parameters, after one step."""
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamMini(named, lr=1e-4, n_heads=model.config.n_heads,
                   n_kv_heads=model.config.n_kv_heads, native=True, nonfinite="apply")
    opt.step()
    hyper = read_hyperparameters(opt.param_groups[0], "")
    members = [Member(name, p, p.grad, opt.state[p]) for name, p in named]
    [(count, pairs)] = opt._backends.native.prepare(members, opt._layouts(), hyper).by_count.items()
    kernel_members, scalars = [k for _, k in pairs], scalars_for(hyper, count)
    sums, _ = native.row_sums_(kernel_members)
    given = [k._replace(row_sums=s) for k, s in zip(kernel_members, sums)]

    def checked() -> None:
        row_sums, _ = native.row_sums_(kernel_members)
        native.step_([k._replace(row_sums=s) for k, s in zip(kernel_members, row_sums)], scalars)

    return {"native single pass": (lambda: native.step_(kernel_members, scalars), 12, 8),
            "native statistics pass (the check)": (lambda: native.row_sums_(kernel_members), 4, 0),
            "native update given the sums": (lambda: native.step_(given, scalars), 12, 8),
            "native statistics + update (skip)": (checked, 16, 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="36m")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if not native.load():
        raise SystemExit(f"the native kernel is needed: {native.status()}")
    model = llama_model(args.size)
    passes = kernel_passes(model)
    params = [p for p in model.parameters()]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy, p in zip(copies, params):
        copy.grad = p.grad.clone()
    adamw = torch.optim.AdamW(copies, lr=1e-4, fused=True)
    adamw.step()
    grads = [p.grad for p in copies]
    passes = {"torch AdamW(fused=True)": (adamw.step, 16, 12), **passes,
              "torch g.sum() (read only)": (lambda: [g.sum() for g in grads], 4, 0),
              "torch g.mul_(1) (in place)": (lambda: [g.mul_(1.0) for g in grads], 4, 4)}
    times = interleaved_medians({name: call for name, (call, _, _) in passes.items()},
                                args.rounds)
    n = sum(p.numel() for p in params)
    base = times["torch AdamW(fused=True)"]
    print(f"{args.size}: {n / 1e6:.1f}M fp32 params, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.rounds} rounds (medians)\n")
    print("| pass | reads B/param | writes B/param | ms | x AdamW fused | read GB/s |")
    print("|---|---|---|---|---|---|")
    for name, (_, reads, writes) in passes.items():
        median = times[name]
        print(f"| {name} | {reads} | {writes} | {1e3 * median:.1f} | {median / base:.2f} | "
              f"{reads * n / median / 1e9:.1f} |")


if __name__ == "__main__":
    main()
