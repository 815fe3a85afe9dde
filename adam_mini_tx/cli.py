"""Command line: ``adam-mini-tx demo`` (the main job) and ``adam-mini-tx plan`` (a block-plan table).

Bad arguments exit with status 2 and one line naming the argument, before any work, as argparse
does for its own checks.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

import torch
from torch import nn

from .core.lowbits import FORMATS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adam-mini-tx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands.add_parser("demo", help="train a small GPT with AdamW and Adam-mini"))
    _add_plan(commands.add_parser("plan", help="print the Adam-mini block plan of a model"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except UsageError as error:
        args.parser.error(str(error))  # exits with status 2


class UsageError(Exception):
    """An argument that parses but cannot be used; reported as an argparse error (status 2)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in "invalid ... value"
_positive_float.__name__ = "positive number"


# ----- demo ------------------------------------------------------------------------------------
def _add_demo(parser: argparse.ArgumentParser) -> None:
    from .demo.model import SIZES
    from .demo.train import CHOICES, DemoConfig

    defaults = DemoConfig()
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps)
    parser.add_argument("--size", choices=sorted(SIZES), default=defaults.size)
    parser.add_argument("--optimizers", default=",".join(defaults.optimizers),
                        help=f"comma-separated, from {','.join(CHOICES)} (the last two: "
                             f"Adam-mini with its first moment stored in bf16 or int8)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch", type=_positive_int, default=defaults.batch)
    parser.add_argument("--seq", type=_positive_int, default=defaults.seq)
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr)
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(run=_run_demo, parser=parser)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.report import table
    from .demo.train import CHOICES, DemoConfig, check_out_dir, resolve_device, run_demo

    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    unknown = [name for name in optimizers if name not in CHOICES]
    if unknown or not optimizers:
        raise UsageError(f"argument --optimizers: unknown {unknown}; choose from "
                         f"{','.join(CHOICES)}")
    try:
        resolve_device(args.device)
    except ValueError as error:
        raise UsageError(f"argument --device: {error}") from None
    try:
        check_out_dir(args.out)
    except ValueError as error:
        raise UsageError(f"argument --out: {error}") from None
    cfg = DemoConfig(steps=args.steps, size=args.size, optimizers=optimizers, seed=args.seed,
                     device=args.device, batch=args.batch, seq=args.seq, lr=args.lr,
                     eval_every=min(DemoConfig.eval_every, args.steps))
    out = run_demo(cfg, args.out, progress=not args.no_progress)
    print()
    print(table(out["results"]))
    print(f"\n{out['corpus'].credit}")
    print(f"Wrote {' and '.join(out['written'])}")
    if len(out["written"]) == 1:
        print("No plot: matplotlib is not installed (pip install adam_mini_tx[demo] for the plot)")
    return 0


# ----- plan ------------------------------------------------------------------------------------
def _add_plan(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="FAMILY",
                        help="a Hugging Face model type (llama, mistral, qwen2, gpt2, bert, ...)")
    source.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="import path of a function returning an nn.Module")
    parser.add_argument("--hidden-size", type=_positive_int)
    parser.add_argument("--heads", type=_positive_int)
    parser.add_argument("--kv-heads", type=_positive_int)
    parser.add_argument("--layers", type=_positive_int)
    parser.add_argument("--intermediate-size", type=_positive_int)
    parser.add_argument("--vocab-size", type=_positive_int)
    parser.add_argument("--momentum-format", choices=FORMATS, default=None,
                        help="state bytes with m stored in this format")
    parser.set_defaults(run=_run_plan, parser=parser)


def _run_plan(args: argparse.Namespace) -> int:
    from .planning import plan_blocks

    model = _hf_model(args) if args.hf else _factory_model(args.factory)
    try:
        plan = plan_blocks(model, n_heads=None if args.hf else args.heads,
                           n_kv_heads=None if args.hf else args.kv_heads)
    except ValueError as error:
        raise UsageError(f"cannot plan this model with these arguments: {error}") from None
    print(plan.table(args.momentum_format))
    return 0


def _hf_model(args: argparse.Namespace) -> nn.Module:
    """Build an HF model of the given family and size on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    overrides = {"hidden_size": args.hidden_size, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.layers,
                 "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if args.hf not in CONFIG_MAPPING:
        raise UsageError(f"argument --hf: unknown model type {args.hf!r}; use a transformers "
                         f"model_type such as llama, mistral, qwen2, gpt2 or bert")
    try:
        config = AutoConfig.for_model(args.hf, **{k: v for k, v in overrides.items()
                                                  if v is not None})
    except Exception as error:  # noqa: BLE001 - transformers validates sizes with several types
        raise UsageError(f"--hf {args.hf}: these sizes are not a valid config "
                         f"({_last_line(error)})") from None
    _check_heads(config)
    with torch.device("meta"):
        try:
            try:
                return AutoModelForCausalLM.from_config(config)
            except ValueError:
                return AutoModel.from_config(config)
        except Exception as error:  # noqa: BLE001 - any config the model rejects is an argument error
            raise UsageError(f"--hf {args.hf}: the model cannot be built from these sizes "
                             f"({type(error).__name__}: {_last_line(error)})") from None


def _check_heads(config: object) -> None:
    """The head counts must divide the width and each other (HF does not always check)."""
    width = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise UsageError(f"argument --heads: {heads} heads do not divide the hidden size "
                         f"{width}; pick a divisor of {width} (or set --hidden-size)")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise UsageError(f"argument --kv-heads: {kv_heads} KV heads do not divide the "
                         f"{heads} attention heads; pick a divisor of {heads}")


def _factory_model(path: str) -> nn.Module:
    """Call the no-argument factory ``MODULE:FUNCTION`` on the meta device."""
    module_name, _, function = path.partition(":")
    if not module_name or not function:
        raise UsageError(f"argument --factory: {path!r}: use MODULE:FUNCTION, e.g. "
                         f"mypkg.models:build_model")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"argument --factory: cannot import module {module_name!r} "
                         f"({_first_line(error)})") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UsageError(f"argument --factory: module {module_name!r} has no function "
                         f"{function!r}")
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as error:  # noqa: BLE001 - the user's factory failed, before any work
        raise UsageError(f"argument --factory: {path}() failed ({type(error).__name__}: "
                         f"{_first_line(error)}); give a function that takes no arguments "
                         f"and returns an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"argument --factory: {path}() returned {type(model).__name__}, "
                         f"not an nn.Module")
    if next(model.parameters(), None) is None:
        raise UsageError(f"argument --factory: {path}() returned a module without parameters")
    return model


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _last_line(error: BaseException) -> str:
    """The innermost message of a chained, multi-line error (transformers' validators)."""
    return (str(error).strip().splitlines() or [""])[-1].strip()


if __name__ == "__main__":
    sys.exit(main())
