"""A bf16 model's optimizer step on the CPU: AdamMini (its default bf16 state, and fp32 state)
against torch's fused AdamW on the same bf16 parameters, interleaved in one process (medians).

    python benchmarks/bench_bf16_model.py --size 36m

The default state of a bf16 model is bf16 (``m`` and ``v``), computed as the chain computes it:
one bf16 rounding per operation.
"""
from __future__ import annotations

import argparse

import torch

from adam_mini_tx import AdamMini
from bench_step import llama_model
from timing import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="36m")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    model = llama_model(args.size).to(torch.bfloat16)
    named = list(model.named_parameters())
    grads = {name: torch.randn_like(p) * 1e-3 for name, p in named}

    def copies() -> list[tuple[str, torch.nn.Parameter]]:
        made = [(name, torch.nn.Parameter(p.detach().clone())) for name, p in named]
        for name, p in made:
            p.grad = grads[name]
        return made

    heads = dict(n_heads=model.config.n_heads, n_kv_heads=model.config.n_kv_heads)
    calls = {
        "torch AdamW(fused=True), bf16 state": torch.optim.AdamW(
            [p for _, p in copies()], lr=1e-4, fused=True).step,
        "AdamMini native, bf16 state (default)": AdamMini(
            copies(), lr=1e-4, nonfinite="apply", **heads).step,
        "AdamMini native, fp32 state": AdamMini(
            copies(), lr=1e-4, nonfinite="apply", state_dtype=torch.float32, **heads).step,
        "AdamMini eager, bf16 state": AdamMini(
            copies(), lr=1e-4, nonfinite="apply", native=False, **heads).step,
    }
    times = interleaved_medians(calls, args.rounds)
    base = times["torch AdamW(fused=True), bf16 state"]
    n = sum(p.numel() for _, p in named)
    print(f"{args.size}: {n / 1e6:.1f}M bf16 params, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.rounds} rounds (medians), nonfinite=\"apply\"\n")
    print("| step | ms | x AdamW fused |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
