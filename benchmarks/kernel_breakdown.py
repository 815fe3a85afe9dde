"""Where the fused step's time goes: one bucket of per-row (MLP-like) weights, timed piece by piece
against ``AdamW(fused=True)`` on the same tensors (all candidates interleaved, medians).

    python benchmarks/kernel_breakdown.py                      # 6 x (1376, 512), as in 25M/36M
    python benchmarks/kernel_breakdown.py --rows 8000 --count 2  # two 8000 x 512 embeddings

Rows reported (ratios to AdamW fused on the same tensors):

* ``AdamMini fused step``: ``optimizer.step()`` with ``fused=True, nonfinite="apply"``, and
  ``(skip)``: the same with the default ``nonfinite="skip"`` (two passes: the statistics, which
  the check reads, then the update).
* ``update call, reading g``: the round's compiled call alone with ``"apply"`` (no optimizer
  bookkeeping); ``statistics pass call`` and ``update call, given statistics``: its two calls
  with ``"skip"``.
* ``update call, tiny tensors``: the update call on (16, 8) tensors: the per-call wrapper cost,
  right after the streaming kernels above (as between the buckets of a step), and ``again``: the
  same call once more straight after it, with the wrapper's memory back in cache.
* ``row sums of squares only``: a compiled ``(g * g).sum(1)`` per tensor: the statistic's pass.
* ``update with a given denominator``: a compiled ``p, m`` update whose per-row denominator is an
  input. It is a hand-written experiment, not the library's math: the time a single-pass kernel
  (statistic and update in one read of ``g``) could approach.
* ``nonfinite check``: ``guards.all_finite`` on the gradients (what ``nonfinite="skip"`` adds).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from adam_mini_tx import AdamMini
from adam_mini_tx.core.guards import all_finite
from adam_mini_tx.optim.backends.compiled import _bucket_args
from adam_mini_tx.optim.hyperparams import read_hyperparameters, scalar_arguments
from adam_mini_tx.optim.members import Member


def bucket(rows: int, cols: int, count: int) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(f"model.layers.{i}.mlp.up_proj.weight", torch.nn.Parameter(torch.randn(rows, cols)))
             for i in range(count)]
    for _, param in named:
        param.grad = torch.randn_like(param)
    return named


def compiled_calls(optimizer: AdamMini) -> dict[str, Callable[[], None]]:
    """The compiled calls of the optimizer's (single) round, bound to its tensors: with
    ``nonfinite="apply"`` the update reading ``g`` for its statistics, otherwise the statistics
    pass and the update taking them."""
    fused = optimizer._backends[1]
    hyper = read_hyperparameters(optimizer.param_groups[0], "")
    members = [Member(name, param, param.grad, optimizer.state[param])
               for group in optimizer.param_groups
               for name, param in zip(group["param_names"], group["params"])]
    work = fused.prepare(members, optimizer.plan.layouts(), hyper)
    [(_, signature, buckets)] = work.rounds
    args = [_bucket_args(bucket) for bucket in buckets]
    scalars = scalar_arguments(hyper, members[0].param.device)
    if optimizer.nonfinite == "apply":
        update = fused._apply_fns[(signature, False)]
        return {"update call, reading g": lambda: update(scalars, args, [[] for _ in buckets])}
    grads = [[member.grad for member in bucket] for bucket in buckets]
    sums = [[fused._sums[member.name] for member in bucket] for bucket in buckets]
    statistics, update = fused._sums_fns[signature], fused._apply_fns[(signature, True)]
    return {"statistics pass call": lambda: statistics(grads, sums),
            "update call, given statistics": lambda: update(scalars, args, sums)}


def stepped(named: list, nonfinite: str = "apply") -> AdamMini:
    optimizer = AdamMini(named, lr=1e-4, weight_decay=0.1, fused=True, nonfinite=nonfinite)
    optimizer.step()
    return optimizer


def row_sums(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(g * g).sum(1) for g in grads]


def update_given_denominator(params, grads, moments, denominators, correction, lr, wd) -> None:
    for p, g, m, d in zip(params, grads, moments, denominators):
        m_new = m.lerp(g, 0.1)
        p.add_((m_new / correction / d[:, None] + wd * p) * -lr)
        m.copy_(m_new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1376)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    named = bucket(args.rows, args.cols, args.count)
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    mini, mini_skip = stepped(named), stepped(named, "skip")
    tiny = stepped(bucket(16, 8, args.count))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy, grad in zip(reference, grads):
        copy.grad = grad
    adamw = torch.optim.AdamW(reference, lr=1e-4, weight_decay=0.1, fused=True)
    moments = [torch.zeros_like(p) for p in params]
    denominators = [torch.rand(args.rows) + 1 for _ in params]
    scalars = [torch.tensor(x, dtype=torch.float32) for x in (0.1, 1e-4, 0.1)]
    compile_ = lambda f: torch.compile(f, fullgraph=True, dynamic=False)  # noqa: E731
    reduce_only, update_only = compile_(row_sums), compile_(update_given_denominator)
    candidates = {
        "AdamW fused": adamw.step,
        "AdamMini fused step": mini.step,
        "AdamMini fused step (skip)": mini_skip.step,
        **compiled_calls(mini),
        **compiled_calls(mini_skip),
        "update call, tiny tensors": compiled_calls(tiny)["update call, reading g"],
        "same call, tiny tensors, again": compiled_calls(tiny)["update call, reading g"],
        "row sums of squares only": lambda: reduce_only(grads),
        "update with a given denominator": lambda: update_only(
            params, grads, moments, denominators, *scalars),
        "nonfinite check": lambda: bool(all_finite({n: p.grad for n, p in named})),
    }
    times = {name: [] for name in candidates}
    with torch.no_grad():
        for run in candidates.values():
            for _ in range(3):
                run()
        for _ in range(args.rounds):
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["AdamW fused"])
    numel = sum(p.numel() for p in params)
    print(f"bucket: {args.count} x ({args.rows}, {args.cols}) = {numel / 1e6:.2f}M fp32 params, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| piece | ms | x AdamW fused |\n|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
