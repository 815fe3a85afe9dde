"""Fused vs eager AdamMini on one device: the largest relative difference after a few steps, and
the fused mode's compile time. The first thing to run on a new device (e.g. a CUDA GPU, where the
fused step goes through Triton) before timing it with ``bench_step.py``.

    python benchmarks/check_fused.py --device cuda
"""
from __future__ import annotations

import argparse
import copy

import torch

from adam_mini_tx import AdamMini
from adam_mini_tx.demo.model import GPT, GPTConfig


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    eager_model = GPT(GPTConfig(256, 64, 2, 4, 2, 176, max_seq=16)).to(device)
    fused_model = copy.deepcopy(eager_model)
    opts = [AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, n_heads=4,
                     n_kv_heads=2, fused=fused)
            for model, fused in ((eager_model, False), (fused_model, True))]
    for _ in range(args.steps):
        grads = [torch.randn_like(p) for p in eager_model.parameters()]
        for model, opt in zip((eager_model, fused_model), opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    worst = max(max_relative_difference(p, q)
                for p, q in zip(eager_model.parameters(), fused_model.parameters()))
    moments = max(max_relative_difference(opts[0].state[p]["m"], opts[1].state[q]["m"])
                  for p, q in zip(eager_model.parameters(), fused_model.parameters()))
    print(f"device {device}: after {args.steps} steps, fused vs eager max relative difference "
          f"{worst:.2e} (parameters), {moments:.2e} (m); compile {opts[1].compile_seconds:.1f} s")
    if not (worst < 1e-5 and moments < 1e-5):
        raise SystemExit("fused and eager disagree")


if __name__ == "__main__":
    main()
