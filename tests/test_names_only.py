"""Planning from names alone (``AdamMini(model.named_parameters(), n_heads=...)``, the drop-in)
against planning from the module (``plan=model``): the same blocks for every family in the
registry and for PyTorch's own layers, or a fallback the plan flags (and warns about), or an error
that says to pass the model. Never silently different."""
import warnings

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from adam_mini_tx.planning.registry import FAMILIES, dims_from_config

transformers = pytest.importorskip("transformers")

H, KV, D = 4, 2, 8
HIDDEN = H * D
LLAMA_LIKE = dict(hidden_size=HIDDEN, num_attention_heads=H, num_key_value_heads=KV,
                  intermediate_size=48)
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
# tiny configs, one per registry family (AutoConfig.for_model(family, num_hidden_layers=1, ...))
CONFIGS = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "starcoder2": LLAMA_LIKE,
    "mixtral": {**LLAMA_LIKE, "intermediate_size": 24, "num_local_experts": 3},
    "qwen2_moe": {**LLAMA_LIKE, **MOE, "shared_expert_intermediate_size": 16, "num_experts": 3},
    "qwen3": {**LLAMA_LIKE, "head_dim": D},
    "qwen3_moe": {**LLAMA_LIKE, **MOE, "num_experts": 3, "head_dim": D},
    "gemma": {**LLAMA_LIKE, "head_dim": D}, "gemma2": {**LLAMA_LIKE, "head_dim": D},
    "phi": LLAMA_LIKE, "phi3": {**LLAMA_LIKE, "pad_token_id": 0},
    "olmo": {**LLAMA_LIKE, "pad_token_id": 0}, "olmo2": {**LLAMA_LIKE, "pad_token_id": 0},
    "gpt2": dict(n_embd=HIDDEN, n_head=H, n_layer=1, n_positions=16),
    "gpt_bigcode": dict(n_embd=HIDDEN, n_head=H, n_layer=1, n_positions=16, multi_query=True),
    "mpt": dict(d_model=HIDDEN, n_heads=H, n_layers=1, expansion_ratio=2, max_seq_len=16),
    "bert": dict(hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=48,
                 max_position_embeddings=16),
    "roberta": dict(hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=48,
                    max_position_embeddings=16, pad_token_id=1),
    "vit": dict(hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=48, image_size=16,
                patch_size=8),
    "t5": dict(d_model=HIDDEN, d_kv=D, num_heads=H, num_layers=1, d_ff=48),
    "deepseek_v3": {**LLAMA_LIKE, **MOE, "num_key_value_heads": H, "n_routed_experts": 4,
                    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "q_lora_rank": 16,
                    "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8},
    "gpt_neox": dict(hidden_size=HIDDEN, num_attention_heads=H, intermediate_size=48),
    "bloom": dict(hidden_size=HIDDEN, n_head=H, n_layer=1),
    "falcon": dict(hidden_size=HIDDEN, num_attention_heads=H, num_kv_heads=KV,
                   new_decoder_architecture=True),
}
# names whose blocks the name cannot settle: same blocks here, but flagged as fallbacks
FLAGGED = {"mpt": ["transformer.blocks.0.attn.Wqkv.weight"],  # stacked here, grouped in InternLM2
           "falcon": ["transformer.h.0.self_attention.query_key_value.weight"]}  # ChatGLM stacks


def build(family, **overrides):
    config = transformers.AutoConfig.for_model(
        family, **{"num_hidden_layers": 1, "vocab_size": 40, **CONFIGS[family], **overrides})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
            try:
                return auto.from_config(config)
            except ValueError:  # not a causal LM (BERT) / no LM head at all (ViT)
                continue
        return transformers.AutoModel.from_config(config)


def names_only(model, **dims):
    """The plan AdamMini makes from ``model.named_parameters()`` and head counts."""
    return amx.AdamMini(model.named_parameters(), **dims).plan


def assert_as_good_as_the_module(model, **dims):
    """Every tensor: the module's blocks, or a fallback flagged with a note saying what to do.
    Returns the names-only plan."""
    reference = amx.plan_blocks(model, **dims)
    assert not reference.fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = names_only(model, **dims)
    assert list(plan) == list(reference)
    for name, entry in plan.items():
        if entry.source == "fallback":
            assert "plan=model" in entry.note, (name, entry.note)
        else:
            assert entry.layout == reference[name].layout, (name, entry, reference[name])
    return plan


def config_dims(model):
    dims = dims_from_config(model.config)
    return dict(n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads)


def test_every_registry_family_has_a_tiny_config_here():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_registry_family_names_only_equals_plan_model(family):
    model = build(family)
    plan = assert_as_good_as_the_module(model, **config_dims(model))
    assert plan.fallbacks == FLAGGED.get(family, [])
    # the flagged ones hold the module's blocks too (the guess is right for these families)
    assert plan.layouts() == amx.plan_blocks(model).layouts()


@pytest.mark.parametrize("variant", [dict(new_decoder_architecture=False, num_kv_heads=H),
                                     dict(new_decoder_architecture=False, multi_query=True),
                                     dict(new_decoder_architecture=True, num_kv_heads=1),
                                     dict(new_decoder_architecture=True, num_kv_heads=H)],
                         ids=["per-head", "multi-query", "one-group", "groups=heads"])
def test_query_key_value_without_gqa_or_with_one_kv_head_is_settled_by_the_head_counts(variant):
    model = build("falcon", **variant)
    plan = assert_as_good_as_the_module(model, **config_dims(model))
    assert not plan.fallbacks


@pytest.mark.parametrize("n_embd, n_head", [(768, 12), (96, 4), (48, 4)])
def test_hf_gpt2_conv1d_names_only(n_embd, n_head):
    """(768, 12): the standard GPT-2 width (it used to fail "768 fused QKV rows do not fit");
    (96, 4): head_dim 24 is divisible by 3, where c_attn / c_fc used to be blocked along their
    input axis."""
    config = transformers.GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=1, vocab_size=40,
                                     n_positions=16)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    plan = assert_as_good_as_the_module(model, n_heads=n_head)
    assert not plan.fallbacks
    c_attn = plan["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.num_blocks == 2 * n_head + n_embd and c_attn.layout.perm == (1, 0)
    assert plan["transformer.h.0.mlp.c_fc.weight"].num_blocks == 4 * n_embd


class NanoBlock(nn.Module):
    """nanoGPT's names (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) on nn.Linear (out, in)."""

    def __init__(self, width=HIDDEN):
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_attn = nn.Linear(width, 3 * width)
        self.attn.c_proj = nn.Linear(width, width)
        self.mlp.c_fc = nn.Linear(width, 4 * width)
        self.mlp.c_proj = nn.Linear(4 * width, width)


def test_nanogpt_linear_with_gpt2_names_is_not_flagged():
    model = nn.ModuleDict({"h": nn.ModuleList([NanoBlock()])})
    plan = assert_as_good_as_the_module(model, n_heads=H)
    assert not plan.fallbacks
    assert plan["h.0.attn.c_proj.weight"].role == "attn_out"
    assert plan["h.0.mlp.c_proj.weight"].role == "mlp"


def test_gpt2_mlp_without_its_c_attn_is_flagged_not_guessed_silently():
    """Only the MLP is trained: nothing tells Conv1D (in, out) from Linear (out, in)."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=HIDDEN, n_head=H, n_layer=1, vocab_size=40, n_positions=16))
    named = [(n, p) for n, p in model.named_parameters() if ".mlp." in n]
    with pytest.warns(UserWarning, match="c_attn"):
        plan = warn_and_plan(named)
    assert set(plan.fallbacks) == {"transformer.h.0.mlp.c_fc.weight",
                                   "transformer.h.0.mlp.c_proj.weight"}


def warn_and_plan(named, **dims):
    plan = amx.plan_blocks(named, **dims)
    amx.warn_fallbacks(plan)
    return plan


@pytest.mark.parametrize("make", [
    lambda: nn.TransformerEncoderLayer(HIDDEN, H, dim_feedforward=48, batch_first=True),
    lambda: nn.TransformerDecoderLayer(HIDDEN, H, dim_feedforward=48, batch_first=True),
    lambda: nn.Transformer(HIDDEN, H, 1, 1, dim_feedforward=48, batch_first=True),
    lambda: nn.ModuleDict({"attn": nn.MultiheadAttention(HIDDEN, H, add_bias_kv=True)}),
    lambda: nn.ModuleDict({"attn": nn.MultiheadAttention(HIDDEN, H, kdim=16, vdim=24)}),
], ids=["encoder-layer", "decoder-layer", "transformer", "mha-bias-kv", "mha-kdim-vdim"])
def test_torch_attention_layers_names_only(make):
    torch.manual_seed(0)
    model = make()
    plan = assert_as_good_as_the_module(model, n_heads=H)
    assert not plan.fallbacks
    for name, entry in plan.items():
        if name.endswith("in_proj_weight"):  # 4 query heads, 4 key heads, one block per v row
            assert entry.layout.runs == ((D, H), (D, H), (1, HIDDEN))


def test_multihead_attention_without_n_heads_asks_for_them():
    model = nn.TransformerEncoderLayer(HIDDEN, H, dim_feedforward=48)
    with pytest.raises(ValueError, match=r"self_attn\.in_proj_weight.*n_heads.*plan=model"):
        amx.AdamMini(model.named_parameters())
    assert amx.AdamMini(model.named_parameters(), plan=model).plan[
        "self_attn.in_proj_weight"].num_blocks == 2 * H + HIDDEN


CONVS = {"conv1d": nn.Conv1d(3, 8, 3), "conv2d": nn.Conv2d(3, 8, 3), "conv3d": nn.Conv3d(3, 8, 2),
         "conv_transpose1d": nn.ConvTranspose1d(8, 4, 3),
         "deconv2d": nn.ConvTranspose2d(8, 4, 2)}


def test_convolutions_named_as_such_get_one_block_per_output_channel():
    plan = assert_as_good_as_the_module(nn.ModuleDict(CONVS))
    assert not plan.fallbacks
    assert [plan[f"{k}.weight"].num_blocks for k in CONVS] == [8, 8, 8, 4, 4]


def test_unnamed_convolutions_warn_or_ask_for_the_model():
    """``nn.Sequential`` numbers its layers: a 4-D or 5-D weight is taken as a convolution
    (out, in, ...) and flagged; a ConvTranspose2d is then blocked differently from plan=model,
    but flagged with what to do. A 3-D weight may be a Conv1d or expert weights: an error."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 2),
                          nn.Conv3d(4, 2, 1))
    with pytest.warns(UserWarning, match=r"2\.weight.*ConvTranspose.*plan=model") as caught:
        plan = warn_and_plan(model.named_parameters())
    assert len(caught) == 1
    assert set(plan.fallbacks) == {"0.weight", "1.weight", "2.weight", "3.weight"}
    reference = amx.plan_blocks(model)
    assert plan["0.weight"].layout == reference["0.weight"].layout
    assert plan["3.weight"].layout == reference["3.weight"].layout
    assert plan["2.weight"].num_blocks == 8 and reference["2.weight"].num_blocks == 4
    with pytest.raises(ValueError, match=r"'0\.weight'.*Conv1d.*expert.*plan=model"):
        amx.AdamMini(nn.Sequential(nn.Conv1d(3, 8, 3)).named_parameters())
