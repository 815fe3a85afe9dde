"""A model's optimizer step on the CPU, by architecture and parameter dtype: AdamMini against
torch's fused AdamW on the same parameters, interleaved in one process (medians).

    python benchmarks/bench_models.py --arch gpt2 --size 30m            # HF GPT-2: Conv1D columns
    python benchmarks/bench_models.py --arch llama --size 36m --dtype bfloat16

``llama`` is the step benchmark's Llama-shaped model (``--size`` a key of its sizes); ``gpt2``
is HF ``GPT2LMHeadModel`` (transposed ``Conv1D`` weights, fused QKV), 30M (512 wide, 8 layers,
8192 tokens) or 124M (GPT-2 small). A bf16 model's default state is bf16 (``m`` and ``v``),
computed as the chain computes it, one bf16 rounding per operation.
"""
from __future__ import annotations

import argparse

import torch

from adam_mini_tx import AdamMini
from bench_step import llama_model
from timing import interleaved_medians

GPT2 = {"30m": dict(n_embd=512, n_layer=8, n_head=8, vocab_size=8192),
        "124m": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)}


def build(arch: str, size: str) -> tuple[torch.nn.Module, dict]:
    """The model and the ``AdamMini`` arguments that plan it."""
    if arch == "gpt2":
        import transformers
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64,
                                                                     **GPT2[size]))
        return model, {"plan": model}
    model = llama_model(size)
    return model, {"n_heads": model.config.n_heads, "n_kv_heads": model.config.n_kv_heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="gpt2")
    parser.add_argument("--size", default="30m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    model, planning = build(args.arch, args.size)
    model = model.to(getattr(torch, args.dtype))
    named = list(model.named_parameters())
    grads = {name: torch.randn_like(p) * 1e-3 for name, p in named}

    def copies() -> list[tuple[str, torch.nn.Parameter]]:
        made = [(name, torch.nn.Parameter(p.detach().clone())) for name, p in named]
        for name, p in made:
            p.grad = grads[name]
        return made

    calls = {
        "torch AdamW(fused=True)": torch.optim.AdamW(
            [p for _, p in copies()], lr=1e-4, fused=True).step,
        'AdamMini native, nonfinite="apply"': AdamMini(
            copies(), lr=1e-4, nonfinite="apply", **planning).step,
        'AdamMini native, "skip" (default)': AdamMini(copies(), lr=1e-4, **planning).step,
        'AdamMini eager, "apply"': AdamMini(
            copies(), lr=1e-4, nonfinite="apply", native=False, **planning).step,
    }
    if args.dtype == "bfloat16":
        calls['AdamMini native, fp32 state, "apply"'] = AdamMini(
            copies(), lr=1e-4, nonfinite="apply", state_dtype=torch.float32, **planning).step
    times = interleaved_medians(calls, args.rounds)
    base = times["torch AdamW(fused=True)"]
    n = sum(p.numel() for _, p in named)
    print(f"{args.arch} {args.size}: {n / 1e6:.1f}M {args.dtype} params, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds "
          f"(medians); the state is in the parameters' dtype unless said\n")
    print("| step | ms | x AdamW fused |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
