"""A training job that checkpoints atomically after every step (used by test_crash_resume.py).

usage: crash_train.py CKPT_PATH TOTAL_STEPS [--resume] [--slow SECONDS]
Trains a tiny Llama-style model with AdamMini on a fixed batch sequence; prints nothing.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import adam_mini_tx as amx  # noqa: E402
from adam_mini_tx.checkpoint import load, save_atomic  # noqa: E402
from test_oracles import TinyLlama  # noqa: E402


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


torch.manual_seed(0)
MODEL = TinyLlama()
SHAPES = {n: p.shape for n, p in MODEL.named_parameters()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    opt = amx.AdamMini(MODEL.named_parameters(), lr=1e-2, weight_decay=0.1, n_heads=4, n_kv_heads=2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = 0
    if args.resume:
        saved = load(args.ckpt)
        MODEL.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start = saved["step"]
    named = dict(MODEL.named_parameters())
    for step in range(start, args.steps):
        grads = batch(step)
        for name, p in named.items():
            p.grad = grads[name] * (1 + p.detach().abs().mean())  # depends on the trajectory
        opt.step()
        sched.step()
        save_atomic({"model": MODEL.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "step": step + 1}, args.ckpt)
        time.sleep(args.slow)


if __name__ == "__main__":
    main()
