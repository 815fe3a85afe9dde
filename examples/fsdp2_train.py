"""Train a small Llama-style GPT with FSDP2 (``fully_shard``) and AdamMini, checkpointing with
torch.distributed.checkpoint.

CPU (gloo):   torchrun --nproc_per_node 2 examples/fsdp2_train.py --steps 20
GPUs (nccl):  torchrun --nproc_per_node 8 examples/fsdp2_train.py --device cuda --steps 1000
Resume:       add --resume (loads --ckpt, written every --ckpt-every steps; any world size)
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from adam_mini_tx import AdamMini
from adam_mini_tx.demo.data import load_corpus, sample_batch
from adam_mini_tx.demo.model import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ckpt", default="fsdp2_ckpt")
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    mesh = init_device_mesh(args.device, (world,))

    corpus = load_corpus(1_000_000)
    torch.manual_seed(0)
    model = GPT(GPTConfig.named(args.size, len(corpus.vocab), 128)).to(device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # the plan reads heads / KV heads from the names; params are DTensors sharded on dim 0
    opt = AdamMini(model.named_parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                   n_heads=model.config.n_heads, n_kv_heads=model.config.n_kv_heads)
    options = StateDictOptions(flatten_optimizer_state_dict=True)

    start = 0
    if args.resume:
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, opt, options=options), "step": 0}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"], options=options)
        start = int(state["step"])

    data = torch.Generator().manual_seed(1000 + rank)
    for step in range(start, args.steps):
        loss = model.loss(sample_batch(corpus.train, 8, 128, data, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
        if (step + 1) % args.ckpt_every == 0:
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt, options=options),
                      "step": step + 1}, checkpoint_id=args.ckpt)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
