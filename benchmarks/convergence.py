"""Convergence at equal hyperparameters: AdamW (torch), Adam-mini (adam_mini_tx.AdamMini) and the
official adam-mini 1.1.1 (``adam_mini.Adam_mini``), over seeds, on three setups:

- ``demo``: the ``adam-mini-tx demo`` model, data and training loop (Llama-style, 2 layers, 64 wide);
- ``nanogpt``: a nanoGPT-like character model defined here (tied wte/lm_head, fused ``c_attn``,
  4 layers, 128 wide, 4 heads), trained on the demo's Shakespeare characters;
- ``hf-llama``: a tiny ``transformers`` Llama (4 layers, 128 wide, 4 heads, 2 KV heads) trained by
  the Hugging Face ``Trainer`` on the same characters.

Each optimizer is built as its users build it: ``AdamMini(..., plan=model)`` or the HF helper, the
official one with ``dim`` / ``n_heads`` / ``n_kv_heads``. Every run of a seed starts from the same
weights and sees the same batches. Prints a markdown table of the final validation loss: AdamW's
mean (min-max over seeds), and each Adam-mini's ratio to AdamW per seed, mean (min-max).

    python benchmarks/convergence.py           # the full run: 3 seeds, ~13 minutes on 2 CPU cores
    python benchmarks/convergence.py --quick   # a smoke run of the same code, in seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adam_mini_tx as amx  # noqa: E402
from adam_mini_tx.demo import train as demo  # noqa: E402
from adam_mini_tx.demo.data import Corpus, load_corpus, sample_batch  # noqa: E402

OPTIMIZERS = ("adamw", "adam_mini", "official")
SETUPS = ("demo", "nanogpt", "hf-llama")


@dataclass(frozen=True)
class Budget:
    """The sizes of the runs (the demo keeps its own model, batch, schedule and validation
    batches; only its step count comes from here)."""
    demo_steps: int = 600
    steps: int = 400  # nanogpt and hf-llama (~13 minutes in all at these sizes)
    batch: int = 16
    seq: int = 128
    eval_batches: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)


FULL = Budget()
QUICK = Budget(demo_steps=4, steps=4, batch=4, seq=32, eval_batches=2, seeds=(0,))

# The same hyperparameters for every optimizer of a setup (nanoGPT's shakespeare_char recipe,
# scaled to a few hundred steps): 10% linear warm-up, then cosine (to 10% of the peak in nanogpt,
# to 0 with the Trainer's "cosine"); decay on matrices only, as all three do by default.
LR, BETAS, EPS, WEIGHT_DECAY, WARMUP_FRACTION, CLIP = 1e-3, (0.9, 0.99), 1e-8, 0.1, 0.1, 1.0


def official_optimizer(named: list, dim: int, n_heads: int, n_kv_heads: int, **hyper):
    """``adam_mini.Adam_mini`` as its README shows (named parameters and head counts)."""
    from adam_mini import Adam_mini
    return Adam_mini(named, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, verbose=False,
                     **hyper)


def adamw(model: nn.Module, **hyper) -> torch.optim.AdamW:
    """torch AdamW, decaying only tensors with >= 2 dims (as Adam-mini does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **hyper)


# ----- (a) the demo --------------------------------------------------------------------------------
def run_demo(name: str, seed: int, corpus: Corpus, budget: Budget) -> float:
    cfg = replace(demo.DemoConfig(), steps=budget.demo_steps, seed=seed, device="cpu",
                  eval_every=budget.demo_steps)
    build = None
    if name == "official":
        def build(model, cfg):
            c = model.config
            return official_optimizer(list(model.named_parameters()), c.dim, c.n_heads,
                                      c.n_kv_heads, lr=cfg.lr, betas=cfg.betas, eps=1e-8,
                                      weight_decay=cfg.weight_decay)
    return demo.run_one(name, cfg, corpus, progress=False, build=build).val_loss


# ----- (b) a nanoGPT-like character model ----------------------------------------------------------
@dataclass(frozen=True)
class NanoConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class NanoBlock(nn.Module):
    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                                      c_proj=nn.Linear(4 * cfg.n_embd, cfg.n_embd)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (Karpathy), trimmed: same names, tied embeddings, GPT-2 initialisation."""

    def __init__(self, cfg: NanoConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(NanoBlock(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        tokens, targets = batch[:, :-1], batch[:, 1:]
        x = self.transformer.wte(tokens) + self.transformer.wpe(
            torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run_nanogpt(name: str, seed: int, corpus: Corpus, budget: Budget) -> float:
    cfg = NanoConfig(vocab_size=len(corpus.vocab), block_size=budget.seq)
    torch.manual_seed(seed)
    model = NanoGPT(cfg)
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if name == "adamw":
        optimizer = adamw(model, **hyper)
    elif name == "adam_mini":
        optimizer = amx.AdamMini(model.named_parameters(), plan=model, n_heads=cfg.n_head, **hyper)
    else:
        optimizer = official_optimizer(list(model.named_parameters()), cfg.n_embd, cfg.n_head,
                                       cfg.n_head, **hyper)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, demo.warmup_cosine(
        budget.steps, max(1, int(WARMUP_FRACTION * budget.steps))))
    batches = torch.Generator().manual_seed(seed + 1)
    for _ in range(budget.steps):
        loss = model.loss(sample_batch(corpus.train, budget.batch, budget.seq, batches, "cpu"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
    return evaluate(model.loss, corpus, budget)


@torch.no_grad()
def evaluate(loss: Callable[[torch.Tensor], torch.Tensor], corpus: Corpus,
             budget: Budget) -> float:
    """Mean loss over the same ``eval_batches`` validation windows for every run."""
    windows = torch.Generator().manual_seed(1234)
    return statistics.fmean(
        loss(sample_batch(corpus.val, budget.batch, budget.seq, windows, "cpu")).item()
        for _ in range(budget.eval_batches))


# ----- (c) HF Trainer, tiny Llama ------------------------------------------------------------------
def run_hf_llama(name: str, seed: int, corpus: Corpus, budget: Budget) -> float:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=len(corpus.vocab), hidden_size=128, intermediate_size=352,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=budget.seq, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    windows = torch.Generator().manual_seed(seed + 1)
    train = [sample_batch(corpus.train, 1, budget.seq, windows, "cpu")[0]
             for _ in range(budget.steps * budget.batch)]
    val_gen = torch.Generator().manual_seed(1234)
    val = [sample_batch(corpus.val, 1, budget.seq, val_gen, "cpu")[0]
           for _ in range(budget.eval_batches * budget.batch)]
    as_examples = lambda rows: [{"input_ids": r, "labels": r} for r in rows]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="amx-convergence-") as out_dir:
        return _train_hf(name, seed, model, as_examples(train), as_examples(val), out_dir, budget)


def _train_hf(name: str, seed: int, model: nn.Module, train: list, val: list, out_dir: str,
              budget: Budget) -> float:
    import transformers
    from adam_mini_tx.integrations.hf import create_optimizer

    config = model.config
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=budget.steps,
        per_device_train_batch_size=budget.batch, per_device_eval_batch_size=budget.batch,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, lr_scheduler_type="cosine",
        warmup_steps=max(1, int(WARMUP_FRACTION * budget.steps)), seed=seed,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    if name == "adamw":
        optimizers = (None, None)  # the Trainer's own AdamW (optim="adamw_torch")
    elif name == "adam_mini":
        optimizers = (create_optimizer(model, args), None)
    else:
        optimizers = (official_optimizer(
            list(model.named_parameters()), config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, lr=LR, betas=BETAS, eps=EPS,
            weight_decay=WEIGHT_DECAY), None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   eval_dataset=val, optimizers=optimizers)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep stdout the table
    trainer.train()
    return trainer.evaluate()["eval_loss"]


RUNNERS = {"demo": run_demo, "nanogpt": run_nanogpt, "hf-llama": run_hf_llama}
TITLES = {"demo": "demo (Llama-style, 2 layers x 64)",
          "nanogpt": "nanoGPT char (tied wte, fused c_attn, 4 x 128)",
          "hf-llama": "HF Trainer, tiny Llama (4 x 128, GQA 4/2)"}


# ----- running and reporting -----------------------------------------------------------------------
def measure(setups: tuple[str, ...], budget: Budget, log: Callable[[str], None]) -> dict:
    """``{setup: {optimizer: {seed: val loss or "fails: ..."}}}``."""
    corpus = load_corpus()
    results: dict = {}
    for setup in setups:
        results[setup] = {name: {} for name in OPTIMIZERS}
        for seed in budget.seeds:
            for name in OPTIMIZERS:
                start = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        value = RUNNERS[setup](name, seed, corpus, budget)
                except Exception as error:  # noqa: BLE001 - reported in the table (the official)
                    if name != "official":
                        raise
                    value = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                results[setup][name][seed] = value
                shown = f"{value:.4f}" if isinstance(value, float) else value
                log(f"{setup:>9} {name:>9} seed {seed}: {shown} "
                    f"({time.perf_counter() - start:.0f} s)")
    return results


def spread(values: list[float], digits: int = 3, suffix: str = "") -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f}{suffix} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict, budget: Budget) -> str:
    """Markdown: per setup, AdamW's val loss and each Adam-mini's per-seed ratio to it."""
    lines = ["| setup | steps x seeds | AdamW val loss | Adam-mini (ours) / AdamW | "
             "official 1.1.1 / AdamW |", "|---|---|---|---|---|"]
    for setup, runs in results.items():
        steps = budget.demo_steps if setup == "demo" else budget.steps
        base = runs["adamw"]
        cells = []
        for name in ("adam_mini", "official"):
            failed = [v for v in runs[name].values() if isinstance(v, str)]
            cells.append(failed[0] if failed else spread(
                [runs[name][s] / base[s] for s in budget.seeds], suffix="x"))
        lines.append(f"| {TITLES[setup]} | {steps} x {len(budget.seeds)} | "
                     f"{spread(list(base.values()))} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, from {','.join(SETUPS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the raw losses here")
    args = parser.parse_args(argv)
    setups = tuple(s for s in args.setups.split(",") if s)
    if not setups or set(setups) - set(SETUPS):
        parser.error(f"argument --setups: choose from {','.join(SETUPS)}")
    budget = QUICK if args.quick else FULL
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the machine the docs quote
    start = time.perf_counter()
    results = measure(setups, budget, lambda line: print(line, file=sys.stderr, flush=True))
    minutes = (time.perf_counter() - start) / 60
    print(table(results, budget))
    print(f"\n{len(budget.seeds)} seed(s); val loss = mean over {budget.eval_batches} fixed "
          f"validation batches after the last step; ratios are per seed, then mean (min-max). "
          f"{minutes:.1f} min, torch {torch.__version__}, {torch.get_num_threads()} threads.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"budget": budget.__dict__, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
