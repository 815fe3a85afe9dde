"""Command line: ``adam-mini-tx demo`` (the main job) and ``adam-mini-tx plan`` (a block-plan table)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

import torch
from torch import nn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adam-mini-tx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands.add_parser("demo", help="train a small GPT with AdamW and Adam-mini"))
    _add_plan(commands.add_parser("plan", help="print the Adam-mini block plan of a model"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


# ----- demo ------------------------------------------------------------------------------------
def _add_demo(parser: argparse.ArgumentParser) -> None:
    from .demo.model import SIZES
    from .demo.train import OPTIMIZERS, DemoConfig

    defaults = DemoConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--size", choices=sorted(SIZES), default=defaults.size)
    parser.add_argument("--optimizers", default=",".join(defaults.optimizers),
                        help=f"comma-separated, from {','.join(OPTIMIZERS)}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--seq", type=int, default=defaults.seq)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.report import table
    from .demo.train import OPTIMIZERS, DemoConfig, run_demo

    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    unknown = [name for name in optimizers if name not in OPTIMIZERS]
    if unknown or not optimizers:
        raise SystemExit(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    cfg = DemoConfig(steps=args.steps, size=args.size, optimizers=optimizers, seed=args.seed,
                     device=args.device, batch=args.batch, seq=args.seq, lr=args.lr,
                     eval_every=min(DemoConfig.eval_every, args.steps))
    out = run_demo(cfg, args.out, progress=not args.no_progress)
    print()
    print(table(out["results"]))
    print(f"\n{out['corpus'].credit}")
    print(f"Wrote {args.out}/results.json and {args.out}/loss_and_memory.png")
    return 0


# ----- plan ------------------------------------------------------------------------------------
def _add_plan(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="FAMILY",
                        help="a Hugging Face model type (llama, mistral, qwen2, gpt2, bert, ...)")
    source.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="import path of a function returning an nn.Module")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from .planning import plan_blocks

    model = _hf_model(args) if args.hf else _factory_model(args.factory)
    print(plan_blocks(model, n_heads=None if args.hf else args.heads,
                      n_kv_heads=None if args.hf else args.kv_heads))
    return 0


def _hf_model(args: argparse.Namespace) -> nn.Module:
    """Build an HF model of the given family and size on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    overrides = {"hidden_size": args.hidden_size, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.layers,
                 "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size}
    try:
        config = AutoConfig.for_model(args.hf, **{k: v for k, v in overrides.items()
                                                  if v is not None})
    except ValueError as error:
        raise SystemExit(f"--hf {args.hf!r}: {error}") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def _factory_model(path: str) -> nn.Module:
    module_name, _, function = path.partition(":")
    if not function:
        raise SystemExit(f"--factory {path!r}: use MODULE:FUNCTION")
    factory = getattr(importlib.import_module(module_name), function)
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--factory {path!r} returned {type(model).__name__}, not an nn.Module")
    return model


if __name__ == "__main__":
    sys.exit(main())
