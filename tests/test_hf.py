"""Hugging Face Trainer with AdamMini: the documented one-liner trains a tiny Llama on CPU."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from adam_mini_tx import AdamMini  # noqa: E402
from adam_mini_tx.integrations.hf import create_optimizer, optimizer_cls_and_kwargs  # noqa: E402


class CountingData(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(16) + i) % 50
        return {"input_ids": ids, "labels": ids}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=1, intermediate_size=48, vocab_size=50)
    return transformers.AutoModelForCausalLM.from_config(config)


def training_args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-2,
        weight_decay=0.1, adam_beta2=0.95, logging_steps=4, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, **kw)


def test_trainer_with_create_optimizer(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    optimizer = create_optimizer(model, args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingData(),
                                   optimizers=(optimizer, None))
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    assert result.global_step == 12
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    assert optimizer.state[k_proj]["v"].shape == (2,)  # per KV head, from the model config


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingData(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(inner, AdamMini)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("helper", ["create_optimizer", "optimizer_cls_and_kwargs"])
def test_bf16_model_with_fp32_state(tmp_path, helper):
    """``state_dtype=torch.float32`` through either helper: a bf16 Llama trains under the Trainer
    with fp32 optimizer state (the default would follow the bf16 parameters)."""
    model = tiny_llama().to(torch.bfloat16)
    args = training_args(tmp_path)
    if helper == "create_optimizer":
        optimizer = create_optimizer(model, args, state_dtype=torch.float32)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingData(),
                                       optimizers=(optimizer, None))
    else:
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=CountingData(),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args,
                                                              state_dtype=torch.float32))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    assert k_proj.dtype == torch.bfloat16
    assert inner.state[k_proj]["m"].dtype == torch.float32
    assert inner.state[k_proj]["v"].dtype == torch.float32 and inner.state[k_proj]["v"].shape == (2,)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


def test_bf16_state_by_default(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    optimizer = create_optimizer(model, training_args(tmp_path))
    k_proj = model.model.layers[0].self_attn.k_proj.weight
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state[k_proj]["m"].dtype == torch.bfloat16
