"""The planner on real architectures: one Adam-mini step from zero state must equal
``-lr * g / rms(g over the block)`` with exactly the blocks the paper's principle asks for
(q/k per head, v / attention output / MLP per output neuron, embeddings per token, norms one
block, biases per element). The expected blocks are written here by hand, with plain reshapes,
for every parameter of every model; they never come from the planner."""
import re
import warnings

import pytest
import torch
from torch import nn

import adam_mini_tx as amx

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

H, KV, D = 4, 2, 8  # heads, KV heads, head_dim; hidden = H * D = 32
HIDDEN = H * D


# ----- expected per-element block rms, by explicit reshapes --------------------------------------
def rms_rows(x):  # one block per row of the first axis
    return x.pow(2).reshape(x.shape[0], -1).mean(1).sqrt().reshape(-1, *[1] * (x.dim() - 1)).expand_as(x)


def rms_heads(x, n):
    per_head = x.pow(2).reshape(n, -1).mean(1).sqrt()
    return per_head.repeat_interleave(x.shape[0] // n).reshape(-1, *[1] * (x.dim() - 1)).expand_as(x)


def rms_stacked(x, nq, nk, d):
    q, k, v = x.split([nq * d, nk * d, nk * d])
    return torch.cat([rms_heads(q, nq), rms_heads(k, nk), rms_rows(v)])


def rms_grouped(x, groups, q_per_group, d):
    """Rows [q_1 .. q_n k v] per group (Falcon) or per head with n = 1 (GPT-NeoX)."""
    v4 = x.reshape(groups, q_per_group + 2, d, -1)
    r = torch.empty_like(v4)
    sq = v4.pow(2)
    r[:, : q_per_group + 1] = sq[:, : q_per_group + 1].mean(dim=(2, 3), keepdim=True).sqrt()
    r[:, q_per_group + 1] = sq[:, q_per_group + 1].mean(dim=2, keepdim=True).sqrt()
    return r.reshape(x.shape)


EXPECT = {
    "elementwise": lambda g: g.abs(),
    "whole": lambda g: g.pow(2).mean().sqrt().expand_as(g),
    "rows": rms_rows,
    "tokens": lambda g: rms_rows(g.reshape(-1, g.shape[-1])).reshape(g.shape),
    "cols": lambda g: rms_rows(g.T.contiguous()).T,
    "q": lambda g: rms_heads(g, H),
    "kv_heads": lambda g: rms_heads(g, KV),
    "mha_heads": lambda g: rms_heads(g, H),
    "stacked": lambda g: rms_stacked(g, H, KV, D),
    "stacked_mha": lambda g: rms_stacked(g, H, H, D),
    "stacked_t": lambda g: rms_stacked(g.T.contiguous(), H, H, D).T,
    "per_head": lambda g: rms_grouped(g, H, 1, D),
    "per_group": lambda g: rms_grouped(g, KV, H // KV, D),
    "experts": lambda g: g.pow(2).mean(-1, keepdim=True).sqrt().expand_as(g),
    "lora": rms_rows,
    "conv_t": lambda g: rms_rows(g.transpose(0, 1).contiguous()).transpose(0, 1),
}


def check_first_step(model, expectations, plan=None, **plan_kwargs):
    """Every trainable parameter matches exactly one expectation and its first update is
    -lr * g / rms(block)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    plan = plan if plan is not None else amx.plan_blocks(model, **plan_kwargs)
    assert list(plan) == list(params)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    params64 = {n: p.double() for n, p in params.items()}
    tx = amx.adam_mini(lr=0.1, eps=0.0, plan=plan)
    updates, _ = tx.update(grads, tx.init(params64), params64)
    for name, g in grads.items():
        kinds = [kind for pattern, kind in expectations if re.search(pattern, name)]
        assert len(kinds) == 1, (name, kinds)
        torch.testing.assert_close(updates[name], -0.1 * g / EXPECT[kinds[0]](g),
                                   msg=lambda m: f"{name} ({kinds[0]}): {m}")
    return plan


LLAMA_LIKE = [(r"embed_tokens", "tokens"), (r"q_proj\.weight", "q"), (r"k_proj\.weight", "kv_heads"),
              (r"(v_proj|o_proj)\.weight", "rows"), (r"mlp\..*\.weight", "rows"),
              (r"norm\.weight", "whole"), (r"lm_head", "rows"), (r"\.bias$", "elementwise")]


def causal_lm(config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_family_with_gqa(family):
    config = transformers.AutoConfig.for_model(
        family, hidden_size=HIDDEN, num_attention_heads=H, num_key_value_heads=KV,
        num_hidden_layers=1, intermediate_size=48, vocab_size=40)
    model = causal_lm(config)
    plan = check_first_step(model, LLAMA_LIKE)
    # explicit dims agree with the config
    explicit = amx.plan_blocks(model, n_heads=H, n_kv_heads=KV)
    assert plan.layouts() == explicit.layouts()
    assert not plan.fallbacks


def test_gpt2_conv1d_and_fused_c_attn():
    model = causal_lm(transformers.GPT2Config(n_embd=HIDDEN, n_head=H, n_layer=1, vocab_size=40,
                                              n_positions=16))
    plan = check_first_step(model, [(r"wte|wpe", "tokens"), (r"c_attn\.weight", "stacked_t"),
                                    (r"c_proj\.weight|c_fc\.weight", "cols"),
                                    (r"ln_\w+\.weight", "whole"), (r"\.bias$", "elementwise")])
    assert plan["transformer.h.0.attn.c_attn.weight"].num_blocks == H + H + HIDDEN
    assert plan.layouts() == amx.plan_blocks(model, n_heads=H).layouts()


def test_bert():
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=HIDDEN, num_attention_heads=H, num_hidden_layers=1, vocab_size=40,
        intermediate_size=48, max_position_embeddings=16))
    check_first_step(model, [(r"embeddings\.\w+_embeddings", "tokens"), (r"query\.weight", "q"),
                             (r"key\.weight", "mha_heads"), (r"dense\.weight|value\.weight", "rows"),
                             (r"LayerNorm\.weight", "whole"), (r"bias$", "elementwise")])


def test_vit():
    model = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=HIDDEN, num_attention_heads=H, num_hidden_layers=1, intermediate_size=48,
        image_size=16, patch_size=8))
    plan = check_first_step(model, [(r"cls_token|position_embeddings", "tokens"),
                                    (r"projection\.weight", "rows"), (r"q_proj\.weight", "q"),
                                    (r"k_proj\.weight", "mha_heads"),
                                    (r"(v_proj|o_proj|fc\d|dense)\.weight", "rows"),
                                    (r"layernorm\w*\.weight", "whole"), (r"bias$", "elementwise")])
    assert plan["embeddings.position_embeddings"].num_blocks == 5  # 4 patches + cls, per token


def test_gpt_neox_interleaved_qkv():
    model = causal_lm(transformers.GPTNeoXConfig(
        hidden_size=HIDDEN, num_attention_heads=H, num_hidden_layers=1, vocab_size=40,
        intermediate_size=48))
    check_first_step(model, [(r"embed_in", "tokens"), (r"query_key_value\.weight", "per_head"),
                             (r"(dense\w*)\.weight|lm_head", "rows"), (r"norm\.weight", "whole"),
                             (r"bias$", "elementwise")])


def test_falcon_grouped_qkv():
    model = causal_lm(transformers.FalconConfig(
        hidden_size=HIDDEN, num_attention_heads=H, num_kv_heads=KV, new_decoder_architecture=True,
        num_hidden_layers=1, vocab_size=40))
    check_first_step(model, [(r"word_embeddings", "tokens"), (r"query_key_value\.weight", "per_group"),
                             (r"dense\w*\.weight", "rows"), (r"ln_\w+\.weight", "whole"),
                             (r"bias$", "elementwise")])


def test_phi3_stacked_qkv_and_fused_gate_up():
    model = causal_lm(transformers.Phi3Config(
        hidden_size=HIDDEN, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=1,
        vocab_size=40, intermediate_size=48, pad_token_id=0))
    check_first_step(model, [(r"embed_tokens", "tokens"), (r"qkv_proj", "stacked"),
                             (r"o_proj|mlp\.|lm_head", "rows"), (r"norm\.weight", "whole")])


def test_mixtral_experts_and_router():
    model = causal_lm(transformers.MixtralConfig(
        hidden_size=HIDDEN, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=1,
        vocab_size=40, intermediate_size=24, num_local_experts=3))
    plan = check_first_step(model, [(r"embed_tokens", "tokens"), (r"q_proj", "q"),
                                    (r"k_proj", "kv_heads"), (r"(v_proj|o_proj|mlp\.gate)\.weight|lm_head", "rows"),
                                    (r"experts\.", "experts"), (r"norm\.weight", "whole")])
    assert plan["model.layers.0.mlp.experts.down_proj"].num_blocks == 3 * HIDDEN


def test_t5_encoder_decoder_with_relative_position_table():
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=HIDDEN, d_kv=D, num_heads=H, num_layers=1, vocab_size=40, d_ff=48))
    check_first_step(model, [(r"shared", "tokens"), (r"\.(q|k)\.weight", "mha_heads"),
                             (r"\.(v|o|wi|wo)\.weight", "rows"),
                             (r"relative_attention_bias", "tokens"), (r"layer_norm\.weight", "whole")])


def test_torch_transformer_encoder_packed_in_proj():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(HIDDEN, H, dim_feedforward=48, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    plan = check_first_step(model, [(r"in_proj_weight", "stacked_mha"),
                                    (r"(out_proj|linear\d)\.weight", "rows"),
                                    (r"norm\d\.weight", "whole"), (r"bias$", "elementwise")])
    assert not plan.fallbacks


def test_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 8, 8))
    expectations = [(r"^0\.weight", "rows"), (r"^1\.weight", "whole"), (r"^5\.weight", "rows"),
                    (r"bias$", "elementwise"), (r"^3\.weight", "conv_t")]
    plan = check_first_step(model, expectations)
    assert plan["3.weight"].num_blocks == 4  # ConvTranspose (in, out, k, k): per output channel


class LoRALinear(nn.Module):
    """A minimal LoRA adapter with peft's parameter names."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})
        base.weight.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_lora_adapters_are_blocked_per_output_neuron_never_per_head():
    config = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=H,
                                      num_key_value_heads=KV, num_hidden_layers=1,
                                      intermediate_size=48, vocab_size=40)
    model = causal_lm(config)
    for p in model.parameters():
        p.requires_grad_(False)
    for attn in [layer.self_attn for layer in model.model.layers]:
        attn.q_proj = LoRALinear(attn.q_proj)
        attn.k_proj = LoRALinear(attn.k_proj)
    plan = check_first_step(model, [(r"lora_[AB]", "lora")])
    assert {entry.role for entry in plan.values()} == {"lora"}


def test_plans_on_the_meta_device_without_memory():
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=2,
                                      intermediate_size=14336, vocab_size=128256)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    plan = amx.plan_blocks(model)
    assert plan["model.layers.0.self_attn.k_proj.weight"].num_blocks == 8
    assert 0.50 < plan.state_bytes / plan.adamw_state_bytes < 0.502
