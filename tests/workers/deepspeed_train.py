"""DeepSpeed ZeRO scenarios for tests/test_deepspeed.py, all in one 2-process launch:

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/deepspeed_train.py OUT

Every scenario trains the same model on the same batches (every rank sees the whole batch, so
the averaged gradient is the single-process gradient); rank 0 saves ``OUT/results.pt``.
The model: 5 query heads of 8 rows and 1 KV head (GQA), a vocabulary of 33 rows, so that ZeRO's
cuts fall inside heads, rows and single-block tensors (the test checks where they fall).
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import tempfile
import traceback

import deepspeed
import deepspeed.comm.torch  # noqa: F401  (patched in main)
import torch
import torch.nn.functional as F

import adam_mini_tx as amx
from adam_mini_tx.demo.model import GPT, GPTConfig
from adam_mini_tx.optim.members import group_entries

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dist_worker import CHECKPOINT_AT, STEPS, batch  # noqa: E402  (the FSDP tests' batches)

CONFIG = GPTConfig(vocab_size=33, dim=40, n_layers=2, n_heads=5, n_kv_heads=1, hidden=72,
                   max_seq=16)
HYPER = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
SUB_GROUP_SIZE = 4000  # ZeRO-3 steps the optimizer once per sub-group of about this many elements


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def make_optimizer(model, kind: str = "AdamMini"):
    if kind == "AdamMini":
        return amx.AdamMini(model.named_parameters(), n_heads=CONFIG.n_heads,
                            n_kv_heads=CONFIG.n_kv_heads, **HYPER)
    if kind == "groups":  # matrices and vectors with their own lr and decay; one frozen tensor
        model.pos_embed.weight.requires_grad_(False)
        named = list(model.named_parameters())
        return amx.AdamMini([{"params": [(n, p) for n, p in named if p.dim() > 1]},
                             {"params": [(n, p) for n, p in named if p.dim() < 2],
                              "lr": 5e-3, "weight_decay": 0.0}],
                            n_heads=CONFIG.n_heads, n_kv_heads=CONFIG.n_kv_heads, **HYPER)
    if kind == "Adam_mini":  # as LLaMA-Factory builds it
        return amx.Adam_mini(named_parameters=model.named_parameters(), dim=CONFIG.dim,
                             n_heads=CONFIG.n_heads, n_kv_heads=CONFIG.n_kv_heads,
                             model_sharding=True, **HYPER)
    import adam_mini  # the official 1.1.1
    return adam_mini.Adam_mini(named_parameters=model.named_parameters(), dim=CONFIG.dim,
                               n_heads=CONFIG.n_heads, n_kv_heads=CONFIG.n_kv_heads,
                               verbose=False, **HYPER)


def config(stage: int, bf16: bool = False, offload: bool = False) -> dict:
    zero = {"stage": stage, "sub_group_size": SUB_GROUP_SIZE} if stage == 3 else {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": zero, "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": 0.0, "steps_per_print": 10**9}


def engine_for(stage, bf16=False, offload=False, kind="AdamMini"):
    model = make_model()
    opt = make_optimizer(model, kind)
    cuts: set[str] = set()
    if kind != "official":
        def record(optimizer, args, kwargs):  # the pieces this rank steps
            layouts = optimizer.plan.layouts()
            for index, group in enumerate(optimizer.param_groups):
                for entry in group_entries(group, index, optimizer._originals, layouts):
                    if entry.partition is not None:
                        cuts.update(piece.name for piece in entry.partition.pieces)
        opt.register_step_pre_hook(record)
        flat = opt._backends.flat
        if flat.kernel is not None:  # count the native kernel's calls on flat partitions
            kernel, opt.native_calls = flat.kernel, []
            flat.kernel = lambda members, scalars: (opt.native_calls.append(len(members)),
                                                    kernel(members, scalars))[1]
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=config(stage, bf16, offload))
    return engine, opt, cuts


def train(engine, steps) -> None:
    for step in steps:
        loss = loss_of(engine, batch(step))
        engine.backward(loss)
        engine.step()


def full_params(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().float().clone() for name, p in params}


def state_bytes(opt) -> int:
    return sum(value.numel() * value.element_size() for slots in opt.state.values()
               for key, value in slots.items() if key in ("m", "v"))


def single_process(kind: str) -> tuple[dict, int]:
    model = make_model()
    opt = make_optimizer(model, kind)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state_bytes(opt)


def run(stage, bf16=False, offload=False, kind="AdamMini") -> dict:
    engine, opt, cuts = engine_for(stage, bf16, offload, kind)
    train(engine, range(STEPS))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (state_bytes(opt), sorted(cuts)))
    return {"params": full_params(engine), "state_bytes": [g[0] for g in gathered],
            "cuts": [g[1] for g in gathered], "skipped": engine.skipped_steps,
            "steps": sorted({int(slots["step"]) for slots in opt.state.values()}),
            "partitions": len(opt.state), "native_calls": len(getattr(opt, "native_calls", []))}


def resumed(stage: int) -> dict[str, torch.Tensor]:
    """Save at CHECKPOINT_AT, load into a fresh model, optimizer and engine, continue."""
    with tempfile.TemporaryDirectory() as scratch:
        path = [scratch]
        torch.distributed.broadcast_object_list(path)  # one directory for both ranks
        engine, _, _ = engine_for(stage)
        train(engine, range(CHECKPOINT_AT))
        engine.save_checkpoint(path[0], tag="ckpt")
        engine, _, _ = engine_for(stage)
        engine.load_checkpoint(path[0], tag="ckpt")
        train(engine, range(CHECKPOINT_AT, STEPS))
        params = full_params(engine)
        torch.distributed.barrier()
    return params


def hf_trainer(stage: int) -> dict:
    """The HF Trainer with a DeepSpeed config: it drops an optimizer passed to ``Trainer(...)``
    and calls ``create_optimizer``, which is where AdamMini goes (as LLaMA-Factory does)."""
    import transformers

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = make_model()

        def forward(self, tokens):
            return {"loss": loss_of(self.gpt, tokens)}

    class AdamMiniTrainer(transformers.Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = amx.AdamMini(self.model.named_parameters(), n_heads=CONFIG.n_heads,
                                              n_kv_heads=CONFIG.n_kv_heads, **HYPER)
            return self.optimizer

    auto = dict.fromkeys(("train_batch_size", "train_micro_batch_size_per_gpu",
                          "gradient_accumulation_steps", "gradient_clipping"), "auto")
    scratch = tempfile.mkdtemp()
    args = transformers.TrainingArguments(
        output_dir=scratch, per_device_train_batch_size=2, max_steps=STEPS, use_cpu=True,
        deepspeed={**config(stage), **auto}, report_to=[], save_strategy="no",
        remove_unused_columns=False, ddp_backend="gloo", disable_tqdm=True,
        learning_rate=HYPER["lr"], lr_scheduler_type="constant")
    data = [{"tokens": batch(step)[0]} for step in range(4 * STEPS)]
    trainer = AdamMiniTrainer(model=Wrapped(), args=args, train_dataset=data)
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    inner = trainer.deepspeed.optimizer.optimizer
    return {"inner": type(inner).__name__,
            "steps": sorted({int(slots["step"]) for slots in inner.state.values()}),
            "partitions": [entry.name for index, group in enumerate(inner.param_groups)
                           for entry in group_entries(group, index, inner._originals,
                                                      inner.plan.layouts())]}


def failure(stage: int) -> str:
    """The official 1.1.1 under ``stage``: the error it raises (or "" if it ran)."""
    try:
        engine, _, _ = engine_for(stage, kind="official")
        train(engine, range(2))
        return ""
    except Exception as error:  # noqa: BLE001  (the reference's failure is the result)
        return f"{type(error).__name__}: {error}"


def main(out: str) -> None:
    # DeepSpeed JIT-compiles a shared-memory allreduce for CPU on its first run (~2 min, needs
    # g++ and ninja); its own collectives fall back to gloo without it, and ours use gloo anyway
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    results: dict = {"reference": single_process("AdamMini"),
                     "reference_drop_in": single_process("Adam_mini"),
                     "reference_groups": single_process("groups")}
    scenarios = {
        **{f"stage{s}": (run, (s,)) for s in (0, 1, 2, 3)},
        **{f"stage{s}_bf16": (run, (s, True)) for s in (0, 1, 2, 3)},
        "stage2_offload": (run, (2, False, True)),
        "stage3_offload": (run, (3, False, True)),
        **{f"stage{s}_drop_in": (run, (s, False, False, "Adam_mini")) for s in (1, 3)},
        **{f"stage{s}_groups": (run, (s, False, False, "groups")) for s in (2, 3)},
        **{f"resume{s}": (resumed, (s,)) for s in (1, 2, 3)},
        **{f"official{s}": (failure, (s,)) for s in (0, 1, 2, 3)},
        "hf_trainer": (hf_trainer, (2,)),  # last: it sets up accelerate's global state
    }
    only = os.environ.get("DS_SCENARIOS")
    for name, (function, args) in scenarios.items():
        if only and name not in only.split(","):
            continue
        try:
            results[name] = function(*args)
        except Exception:  # noqa: BLE001  (reported to the test, which names the scenario)
            results[name] = {"error": traceback.format_exc()}
    if torch.distributed.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save(results, buffer)
        with open(os.path.join(out, "results.pt"), "wb") as file:
            file.write(buffer.getvalue())


if __name__ == "__main__":
    main(sys.argv[1])
