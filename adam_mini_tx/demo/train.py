"""Train the demo GPT with several optimizers at identical settings and compare them."""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..checkpoint import write_atomic
from ..optim import AdamMini
from .data import Corpus, load_corpus, sample_batch
from .model import GPT, GPTConfig
from .report import RunResult, plot

OPTIMIZERS = ("adamw", "adam_mini")
MOMENTUM_FORMATS = {"adam_mini": None, "adam_mini_bf16": "bfloat16", "adam_mini_int8": "int8"}
CHOICES = ("adamw", *MOMENTUM_FORMATS)
"""What ``--optimizers`` accepts: Adam-mini also with its first moment in bf16 or int8."""
EXTRAS_HINT = "pip install adam_mini_tx[demo]"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 600
    size: str = "tiny"
    optimizers: tuple[str, ...] = OPTIMIZERS
    seed: int = 0
    device: str = "auto"
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eval_every: int = 100
    eval_batches: int = 8
    max_chars: int = 2_000_000


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or a torch device string; a ValueError names
    the device when this torch build or machine cannot run on it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device ({error}); use auto, cpu or "
                         f"cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available in this torch build or "
                             f"machine; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: the demo runs on cpu or cuda")
    return device


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Create ``out_dir`` if needed and check that a file can be written there; a ValueError
    names the directory otherwise (so a bad ``--out`` fails before any training)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"output directory {os.fspath(out_dir)!r} is not writable "
                         f"({error.strerror or error}); choose another --out") from None


def optional_module(name: str) -> bool:
    """Whether the optional dependency ``name`` imports."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def make_optimizer(name: str, model: GPT, cfg: DemoConfig) -> torch.optim.Optimizer:
    """Both optimizers get the same lr, betas, eps and weight decay, and both decay only
    tensors with >= 2 dims (norm weights are not decayed)."""
    common = dict(lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    if name == "adamw":
        named = list(model.named_parameters())
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, **common)
    if name in MOMENTUM_FORMATS:
        return AdamMini(model.named_parameters(), weight_decay=cfg.weight_decay,
                        n_heads=model.config.n_heads, n_kv_heads=model.config.n_kv_heads,
                        momentum_format=MOMENTUM_FORMATS[name], **common)
    raise ValueError(f"unknown optimizer {name!r}; choose from {CHOICES}")


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """The lr factor at each step: linear warm-up over ``warmup`` steps, then cosine down to 10%
    at ``steps`` (for ``LambdaLR``)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, cfg: DemoConfig, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    model.eval()
    losses = [model.loss(sample_batch(corpus.val, cfg.batch, cfg.seq, gen, device)).item()
              for _ in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def run_one(name: str, cfg: DemoConfig, corpus: Corpus, progress: bool = True,
            build: Callable[[GPT, DemoConfig], torch.optim.Optimizer] | None = None) -> RunResult:
    """Train the demo model with optimizer ``name`` (or ``build(model, cfg)`` when given, e.g.
    another package's optimizer); ``progress`` shows a tqdm bar."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # identical initial weights for every optimizer
    model = GPT(GPTConfig.named(cfg.size, len(corpus.vocab), cfg.seq)).to(device)
    optimizer = build(model, cfg) if build else make_optimizer(name, model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.steps, cfg.warmup))
    batches = torch.Generator().manual_seed(cfg.seed + 1)  # identical data order
    curve, val_curve, opt_times, step_times = [], [], [], []
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{name:>9}", unit="step", leave=True)
    for step in steps:
        start = time.perf_counter()
        loss = model.loss(sample_batch(corpus.train, cfg.batch, cfg.seq, batches, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        opt_start = time.perf_counter()
        optimizer.step()
        _sync(device)
        opt_times.append(time.perf_counter() - opt_start)
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        curve.append((step + 1, loss.item()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_curve.append((step + 1, evaluate(model, corpus, cfg, device)))
            if progress:
                steps.set_postfix(loss=f"{curve[-1][1]:.3f}", val=f"{val_curve[-1][1]:.3f}")
    tail = [loss for _, loss in curve[-max(1, cfg.steps // 10):]]
    return RunResult(train_loss=sum(tail) / len(tail), val_loss=val_curve[-1][1],
                     state_bytes=state_bytes(optimizer), step_ms=1e3 * _median(opt_times),
                     train_step_ms=1e3 * _median(step_times), curve=curve, val_curve=val_curve)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def run_demo(cfg: DemoConfig, out_dir: str, progress: bool = True) -> dict:
    """Train every optimizer in ``cfg.optimizers``; write results.json and, with matplotlib,
    loss_and_memory.png into ``out_dir``; return the results and the paths written.

    Checks before training: the device, the output directory, and the optional imports (without
    tqdm no progress bar, without matplotlib no figure; each logs a warning naming
    ``pip install adam_mini_tx[demo]``)."""
    resolve_device(cfg.device)
    check_out_dir(out_dir)
    if progress and not optional_module("tqdm"):
        logger.warning("tqdm is not installed: training without progress bars (%s)", EXTRAS_HINT)
        progress = False
    can_plot = optional_module("matplotlib")
    if not can_plot:
        logger.warning("matplotlib is not installed: no loss_and_memory.png (%s for the plot)",
                       EXTRAS_HINT)
    corpus = load_corpus(cfg.max_chars)
    results = {name: run_one(name, cfg, corpus, progress) for name in cfg.optimizers}
    payload = {name: {"val_loss": r.val_loss, "train_loss": r.train_loss,
                      "state_bytes": r.state_bytes, "step_ms": r.step_ms,
                      "train_step_ms": r.train_step_ms, "val_curve": r.val_curve}
               for name, r in results.items()}
    payload["config"] = asdict(cfg)
    payload["data"] = {"source": corpus.source, "credit": corpus.credit,
                       "train_tokens": len(corpus.train), "val_tokens": len(corpus.val)}
    text = json.dumps(payload, indent=2).encode()
    written = [os.path.join(out_dir, "results.json")]
    write_atomic(written[0], lambda handle: handle.write(text))
    if can_plot:
        written.append(os.path.join(out_dir, "loss_and_memory.png"))
        plot(results, written[-1])
    return {"results": results, "corpus": corpus, "payload": payload, "written": written}
