"""Optimizer-step benchmark: adam_mini_tx vs torch.optim.AdamW vs the official adam-mini 1.1.1.

AdamMini runs with fp32, bf16 and int8 first moments (``momentum_format``), eager and fused;
torchao's ``AdamW8bit`` joins when torchao is installed.

Only ``optimizer.step()`` is timed, with fixed random gradients assigned before each step. All
candidates are interleaved round by round in one process and reported as ratios to
``AdamW(fused=True)``; each step is also compared with its own memory-bandwidth bound (bytes it
must move / the machine's measured streaming bandwidth). The fused AdamMini compiles during the
warm-up rounds; its compile time is reported.

    python benchmarks/bench_step.py              # 25M, 36M, 125M and 349M params (~15 min, 2 cores)
    python benchmarks/bench_step.py --sizes 25m  # one size (~1 min once compiled)

Writes ``results.md`` (table), ``results.json`` and ``results.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

from adam_mini_tx import AdamMini
from adam_mini_tx.demo.model import GPT, GPTConfig
from timing import interleaved_times

SIZES = {  # name -> (vocab, dim, layers, heads, kv heads, mlp hidden): Llama-shaped
    "25m": (8000, 512, 6, 8, 4, 1376),
    "36m": (8192, 512, 8, 8, 8, 1536),
    "125m": (32000, 768, 12, 12, 4, 2048),
    "350m": (32000, 1024, 24, 16, 8, 2816),
    "tiny": (64, 16, 8, 8, 8, 32),  # 36m's 76 tensors, tiny: Python work per step (ab_step.py)
}
DEFAULT_SIZES = "25m,36m,125m,350m"
# bytes an fp32 step must move per parameter: AdamW reads p, g, m, v and writes p, m, v; Adam-mini
# has no per-element v (reads p, g, m, writes p, m). A step that checks every gradient for NaN/Inf
# before it writes anything (nonfinite="skip") must read g a second time: 24. A bf16 m moves
# 2 + 2 bytes instead of 4 + 4 (16), an int8 m 1 + 1 (14, its scales 4 bytes per 256 elements
# aside); torchao's AdamW8bit reads and writes 8-bit m and v (16).
BYTES_PER_PARAM = {"adamw": 28, "adam_mini": 20, "adam_mini_checked": 24, "adam_mini_bf16": 16,
                   "adam_mini_int8": 14, "adamw8bit": 16}


def candidates(model: GPT, heads: int, kv_heads: int, device: torch.device) -> dict:
    named = list(model.named_parameters())
    params = [p for _, p in named]
    made = {
        "AdamW fused": ("adamw", lambda: torch.optim.AdamW(params, lr=1e-4, fused=True)),
        "AdamW foreach": ("adamw", lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True)),
        "adam_mini_tx AdamMini eager": ("adam_mini", lambda: AdamMini(
            named, lr=1e-4, n_heads=heads, n_kv_heads=kv_heads, nonfinite="apply",
            native=False)),
        "adam_mini_tx AdamMini fused": ("adam_mini", lambda: AdamMini(
            named, lr=1e-4, n_heads=heads, n_kv_heads=kv_heads, nonfinite="apply", fused=True)),
        "adam_mini_tx AdamMini fused (nonfinite=skip)": ("adam_mini_checked", lambda: AdamMini(
            named, lr=1e-4, n_heads=heads, n_kv_heads=kv_heads, fused=True)),
    }
    if device.type == "cpu":  # the native kernel and DeepSpeed's CPU Adam run on the CPU only
        made["adam_mini_tx AdamMini native"] = ("adam_mini", lambda: AdamMini(
            named, lr=1e-4, n_heads=heads, n_kv_heads=kv_heads, nonfinite="apply", native=True))
        made["adam_mini_tx AdamMini native (nonfinite=skip)"] = (
            "adam_mini_checked", lambda: AdamMini(named, lr=1e-4, n_heads=heads,
                                                  n_kv_heads=kv_heads, native=True))
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            made["DeepSpeedCPUAdam"] = ("adamw", lambda: DeepSpeedCPUAdam(params, lr=1e-4))
        except Exception as error:  # not installed, or its extension does not build
            warnings.warn(f"DeepSpeedCPUAdam is not compared: {error}")
    for fmt, short in (("bfloat16", "bf16"), ("int8", "int8")):
        for fused in (False, True):
            step = "fused" if fused else "native" if device.type == "cpu" else "eager"
            made[f"adam_mini_tx AdamMini {short} m {step}"] = (
                f"adam_mini_{short}", lambda fmt=fmt, fused=fused: AdamMini(
                    named, lr=1e-4, n_heads=heads, n_kv_heads=kv_heads, nonfinite="apply",
                    fused=fused, momentum_format=fmt))
    try:
        from torchao.optim import AdamW8bit

        made["torchao AdamW8bit"] = ("adamw8bit", lambda: AdamW8bit(params, lr=1e-4))
    except ImportError:
        warnings.warn("torchao is not installed: its AdamW8bit is not compared")
    try:
        import adam_mini

        made["official adam-mini 1.1.1"] = ("adam_mini", lambda: adam_mini.Adam_mini(
            named, lr=1e-4, dim=model.config.dim, n_heads=heads, n_kv_heads=kv_heads,
            verbose=False))
    except ImportError:
        warnings.warn("adam-mini is not installed: the official package is not compared")
    return {name: (kind, make()) for name, (kind, make) in made.items()}


def stream_bandwidth(device: torch.device, numel: int = 64 * 2**20, repeats: int = 10) -> float:
    """Best bytes/s over simple streaming kernels on 256 MiB fp32 tensors, counting the bytes each
    must move as the optimizer bounds do: ``b.copy_(a)`` (8 B/element), ``a.mul_(s)`` (8) and
    ``a.lerp_(b, w)`` (12)."""
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    kernels = ((lambda: b.copy_(a), 8), (lambda: a.mul_(1.0), 8), (lambda: a.lerp_(b, 0.5), 12))
    best = 0.0
    for kernel, bytes_per_element in kernels:
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            kernel()
            synchronize(device)
            best = max(best, bytes_per_element * numel / (time.perf_counter() - start))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(t) for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``, or of the tensors inside a tensor subclass (torchao's 8-bit states)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def allocated_during_step(opt: torch.optim.Optimizer, device: torch.device) -> tuple[float, float]:
    """``(total, peak)``: bytes the allocator handed out during one step (CPU only; NaN on CUDA),
    and the most held at once beyond what was held before the step (temporaries, and new state
    allocated before the old state it replaces is freed)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt.step()
        torch.cuda.synchronize(device)
        return float("nan"), float(torch.cuda.max_memory_allocated(device) - before)
    # two steps: the profiler sees only frees of blocks allocated while it runs, and the eager
    # step replaces state tensors that the step before allocated
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        opt.step()
        with torch.profiler.record_function("measured step"):
            opt.step()
    with tempfile.TemporaryDirectory() as folder:  # the trace has every allocation and free
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)["traceEvents"]
    span = next(e for e in trace if e.get("name") == "measured step")
    held = peak = total = before = 0
    for event in sorted(trace, key=lambda e: e.get("ts", 0)):
        if event.get("name") != "[memory]" or event["ts"] > span["ts"] + span["dur"]:
            continue
        change = event["args"]["Bytes"]
        held += change
        if event["ts"] < span["ts"]:
            before = held
            continue
        peak = max(peak, held - before)
        total += max(change, 0)
    return float(total), float(peak)


def interleaved_step_times(opts: dict, params: list, grads: list, rounds: int, warmup: int,
                           device: torch.device) -> dict[str, list[float]]:
    """Seconds of each ``opts[name][1].step()``, the candidates interleaved round by round, the
    gradients ``grads`` assigned before each step; the first ``warmup`` rounds are not kept."""
    def assign() -> None:
        for p, g in zip(params, grads):
            p.grad = g

    return interleaved_times({name: opt.step for name, (_, opt) in opts.items()}, rounds,
                             warmup, assign, lambda: synchronize(device))


def llama_model(size: str) -> GPT:
    """The benchmark's Llama-shaped model of ``size`` (a key of :data:`SIZES`), seeded."""
    vocab, dim, layers, heads, kv, hidden = SIZES[size]
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab, dim, layers, heads, kv, hidden, max_seq=64))


def bench_size(size: str, rounds: int, warmup: int, device: torch.device) -> dict:
    model = llama_model(size).to(device)
    heads, kv = model.config.n_heads, model.config.n_kv_heads
    n_params = sum(p.numel() for p in model.parameters())
    grads = [torch.randn_like(p) for p in model.parameters()]
    opts = candidates(model, heads, kv, device)
    bandwidth = stream_bandwidth(device)
    times = interleaved_step_times(opts, list(model.parameters()), grads, rounds, warmup, device)
    bandwidth = max(bandwidth, stream_bandwidth(device))
    adamw = statistics.median(times["AdamW fused"])
    adamw_state = state_bytes(opts["AdamW fused"][1])
    rows = []
    for name, (kind, opt) in opts.items():
        step = statistics.median(times[name])
        bound = BYTES_PER_PARAM[kind] * n_params / bandwidth
        total, peak = allocated_during_step(opt, device)
        rows.append({"candidate": name, "step_ms": 1e3 * step, "x_adamw_fused": step / adamw,
                     "x_own_bound": step / bound, "state_bytes": state_bytes(opt),
                     "state_x_adamw": state_bytes(opt) / adamw_state,
                     "scratch_mib": getattr(opt, "scratch_bytes", 0) / 2**20,
                     "allocated_mib": total / 2**20, "peak_extra_mib": peak / 2**20,
                     "compile_s": getattr(opt, "compile_seconds", 0.0)})
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"size": size, "params": n_params, "bandwidth_gbs": bandwidth / 1e9,
            "largest_param_mib": largest / 2**20, "rows": rows,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads"}


def markdown(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Machine: {results[0]['device']} "
             f"({platform.machine()}), torch {torch.__version__}", ""]
    for res in results:
        lines += [f"### {res['size']} ({res['params'] / 1e6:.1f}M params; streaming bandwidth "
                  f"{res['bandwidth_gbs']:.1f} GB/s; largest tensor {res['largest_param_mib']:.1f} "
                  f"MiB)", "",
                  "| candidate | step ms | x AdamW fused | x own bandwidth bound | state x AdamW "
                  "| scratch MiB kept | MiB allocated in a step | peak extra MiB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['candidate']} | {r['step_ms']:.1f} | {r['x_adamw_fused']:.2f} | "
                         f"{r['x_own_bound']:.2f} | {r['state_x_adamw']:.3f} | "
                         f"{r['scratch_mib']:.1f} | "
                         f"{r['allocated_mib']:.0f} | {r['peak_extra_mib']:.1f} | "
                         f"{r['compile_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(results))
    rows = -(-len(results) // columns)
    height = 0.3 * max(len(res["rows"]) for res in results) + 1.2
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, height * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, res in zip(axes.flat, results):
        names = [r["candidate"].replace("adam_mini_tx ", "").replace("nonfinite=", "")
                 for r in res["rows"]]
        ax.barh(names, [r["x_adamw_fused"] for r in res["rows"]], color="C0")
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(0.8, color="C3", lw=0.8, ls="--", label="0.8x: issue 20's target")
        ax.set_xlabel("step time / AdamW(fused=True) (log scale)")
        ax.set_title(f"{res['size']}: {res['params'] / 1e6:.0f}M params")
        ax.tick_params(axis="y", labelsize=8)
    axes.flat[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated from {list(SIZES)}")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [bench_size(s.strip(), args.rounds, args.warmup, torch.device(args.device))
               for s in args.sizes.split(",")]
    command = "python benchmarks/bench_step.py " + " ".join(
        f"--{k} {v}" for k, v in (("sizes", args.sizes), ("rounds", args.rounds)))
    table = markdown(results, command)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    plot(results, os.path.join(args.out, "results.png"))
    print(table)


if __name__ == "__main__":
    main()
