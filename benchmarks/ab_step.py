"""A/B: the AdamMini step of this checkout against the same step at another git commit, in
one process (interleaved rounds, medians, ratios to ``AdamW(fused=True)``), so that a change is
measured without the +-10% drift between separate runs on a shared machine.

    python benchmarks/ab_step.py --base bb96b2e                 # 25M and 36M models
    python benchmarks/ab_step.py --base HEAD~3 --sizes 125m --rounds 20
    python benchmarks/ab_step.py --base HEAD --mode eager       # the eager step (fused=False)

The base commit's ``adam_mini_tx`` is extracted with ``git archive`` into a temporary folder and
imported under another name (the package uses relative imports only).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adam_mini_tx

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import SIZES, llama_model  # noqa: E402


def import_at(commit: str, folder: Path):
    """``adam_mini_tx`` as it was at ``commit``, imported as ``adam_mini_tx_<commit>``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", commit, "adam_mini_tx"], cwd=root, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    name = f"adam_mini_tx_{commit.replace('~', '_').replace('^', '_')}"
    (folder / "adam_mini_tx").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git commit to compare against")
    parser.add_argument("--sizes", default="25m,36m", help=f"comma-separated from {list(SIZES)}")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--mode", choices=("fused", "eager"), default="fused")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = import_at(args.base, Path(folder))
        mode = args.mode
        print(f"| size | AdamW fused ms | {args.base} {mode} | this {mode} | {args.base} {mode}, "
              f"skip | this {mode}, skip | this / {args.base} | this / {args.base}, skip |\n"
              f"|---|---|---|---|---|---|---|---|")
        for size in args.sizes.split(","):
            model = llama_model(size)
            named = list(model.named_parameters())
            for _, param in named:
                param.grad = torch.randn_like(param)
            common = dict(lr=1e-4, n_heads=model.config.n_heads,
                          n_kv_heads=model.config.n_kv_heads, fused=mode == "fused")
            optimizers = [torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True)] + [
                package.AdamMini(named, nonfinite=policy, **common)
                for policy in ("apply", "skip") for package in (base, adam_mini_tx)]
            times = [[] for _ in optimizers]
            for round_ in range(args.rounds + 3):  # 3 warm-up rounds (fused steps compile)
                for optimizer, samples in zip(optimizers, times):
                    start = time.perf_counter()
                    optimizer.step()
                    if round_ >= 3:
                        samples.append(time.perf_counter() - start)
            medians = [statistics.median(samples) for samples in times]
            print(f"| {size} | {medians[0] * 1e3:.1f} | "
                  + " | ".join(f"{m / medians[0]:.2f}x" for m in medians[1:])
                  + f" | {medians[2] / medians[1]:.3f} | {medians[4] / medians[3]:.3f} |")


if __name__ == "__main__":
    main()
