"""The demo's printed table and its figure."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from ..checkpoint import write_atomic

LABELS = {"adamw": "AdamW (torch)", "adam_mini": "Adam-mini (adam_mini_tx)",
          "adam_mini_bf16": "Adam-mini, bf16 m", "adam_mini_int8": "Adam-mini, int8 m"}


@dataclass
class RunResult:
    """One optimizer's demo run: final losses, state size, step times and the curves."""

    train_loss: float
    val_loss: float
    state_bytes: int
    step_ms: float
    train_step_ms: float
    curve: list = field(default_factory=list)  # (step, train loss)
    val_curve: list = field(default_factory=list)  # (step, val loss)


def table(results: dict[str, RunResult]) -> str:
    header = ("optimizer", "train loss", "val loss", "opt state MB", "opt step ms", "train step ms")
    rows = [(LABELS.get(n, n), f"{r.train_loss:.4f}", f"{r.val_loss:.4f}",
             f"{r.state_bytes / 2**20:.2f}", f"{r.step_ms:.2f}", f"{r.train_step_ms:.1f}")
            for n, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w)
                                for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    ratios = [(LABELS.get(name, name) if name != "adam_mini" else "Adam-mini", r)
              for name, r in results.items() if name != "adamw"] if "adamw" in results else []
    for index, (label, m) in enumerate(ratios):
        a, gap = results["adamw"], "" if index else "\n"
        lines.append(f"{gap}{label} / AdamW: val loss x{m.val_loss / a.val_loss:.4f}, "
                     f"optimizer state x{m.state_bytes / a.state_bytes:.3f}")
    return "\n".join(lines)


def plot(results: dict[str, RunResult], path: str) -> None:
    """Loss curves (train, smoothed, and validation) and a bar chart of optimizer state."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for name, r in results.items():
        steps, losses = zip(*r.curve)
        window = max(1, len(losses) // 40)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        line, = curves.plot(steps, smooth, label=f"{LABELS.get(name, name)} train", alpha=0.8)
        vs, vl = zip(*r.val_curve)
        curves.plot(vs, vl, "o--", color=line.get_color(), label=f"{LABELS.get(name, name)} val")
    curves.set_xlabel("step")
    curves.set_ylabel("cross-entropy (nats/char)")
    curves.set_title("Loss")
    curves.legend()
    names = list(results)
    bars.bar([LABELS.get(n, n).split(" ")[0] for n in names],
             [results[n].state_bytes / 2**20 for n in names], color=["C0", "C1", "C2"][:len(names)])
    bars.set_ylabel("MB")
    bars.set_title("Optimizer state")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
