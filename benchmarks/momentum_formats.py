"""Adam-mini's loss and state with ``m`` stored as fp32, bf16 and int8, on the demo (the small GPT
on Shakespeare), over seeds; optionally the validation curves in one plot.

    python benchmarks/momentum_formats.py                       # 3 seeds x 600 steps, a table
    python benchmarks/momentum_formats.py --seeds 0 --steps 2000 --plot formats.png
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from adam_mini_tx import AdamMini
from adam_mini_tx.demo.data import load_corpus
from adam_mini_tx.demo.train import DemoConfig, run_one

FORMATS = (None, "bfloat16", "int8")


def builder(momentum_format: str | None):
    def build(model, cfg: DemoConfig) -> AdamMini:
        return AdamMini(model.named_parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8,
                        weight_decay=cfg.weight_decay, n_heads=model.config.n_heads,
                        n_kv_heads=model.config.n_kv_heads, momentum_format=momentum_format)
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--plot", help="write the validation curves to this PNG")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    corpus = load_corpus(DemoConfig.max_chars)
    results = {fmt: [run_one(f"{fmt or 'fp32'}", replace(DemoConfig(), seed=seed,
                                                           steps=args.steps, device="cpu"),
                             corpus, progress=False, build=builder(fmt))
                     for seed in seeds] for fmt in FORMATS}
    base = statistics.mean(r.val_loss for r in results[None])
    print(f"| m stored as | val loss, mean over seeds {seeds} (min-max) | vs fp32 m | "
          f"optimizer state MB | step ms |\n|---|---|---|---|---|")
    for fmt, runs in results.items():
        losses = [r.val_loss for r in runs]
        mean = statistics.mean(losses)
        print(f"| {fmt or 'fp32 (default)'} | {mean:.4f} ({min(losses):.4f}-{max(losses):.4f}) | "
              f"{mean / base:.4f}x | {runs[0].state_bytes / 2**20:.3f} | "
              f"{statistics.median(r.step_ms for r in runs):.2f} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        figure, axes = plt.subplots(figsize=(7, 4))
        for fmt, runs in results.items():
            steps, losses = zip(*runs[0].val_curve)
            axes.plot(steps, losses, label=f"m as {fmt or 'fp32'}")
        axes.set_xlabel("step")
        axes.set_ylabel(f"validation loss (seed {seeds[0]})")
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
