"""Architecture knowledge: model dimensions from configs, parameter roles, fused-QKV styles.

Everything the planner knows about model families lives here. Supporting a new family is usually
one :data:`FAMILIES` entry (how its fused QKV rows are ordered) plus, if its module names are new,
a few names in :data:`ROLE_NAMES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# The role a module's own name implies (matched against whole dotted-name components).
ROLE_NAMES: dict[str, frozenset[str]] = {
    "query": frozenset({"q_proj", "wq", "query", "q", "q_lin"}),
    "key": frozenset({"k_proj", "wk", "key", "k", "k_lin"}),
    "value": frozenset({"v_proj", "wv", "value", "v", "v_lin"}),
    "qkv": frozenset({"qkv_proj", "c_attn", "query_key_value", "qkv", "wqkv", "in_proj"}),
    "attn_out": frozenset({"o_proj", "out_proj", "o", "out_lin", "attn_out"}),
    "mlp": frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3",
                      "fc1", "fc2", "c_fc", "wi", "wi_0", "wi_1", "wo", "dense_h_to_4h",
                      "dense_4h_to_h", "lin1", "lin2", "linear1", "linear2", "mlp", "ffn"}),
    "embedding": frozenset({"embed_tokens", "tok_embeddings", "wte", "wpe", "embed", "embd",
                            "word_embeddings", "position_embeddings", "token_type_embeddings",
                            "embed_in", "shared", "relative_attention_bias", "embed_positions",
                            "pos_embed", "position_embedding", "cls_token", "mask_token"}),
    "output": frozenset({"lm_head", "output", "embed_out", "final_layer", "decoder"}),
    "router": frozenset({"router", "gate"}),
    # low-rank (latent) attention projections (DeepSeek MLA): one block per output neuron
    "latent": frozenset({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}),
}
# Containers whose ``dense`` child is the attention output / an MLP layer (BERT, GPT-NeoX, Falcon).
DENSE_PARENTS = {"attention": "attn_out", "self_attention": "attn_out", "self_attn": "attn_out",
                 "output": "mlp", "intermediate": "mlp", "transform": "mlp", "pooler": "mlp",
                 "lm_head": "mlp"}
# GPT-2's module names. HF GPT-2 and OpenAI GPT store these weights in ``Conv1D`` as (in, out);
# nanoGPT and GPT-BigCode use the same names with ``nn.Linear`` (out, in).
GPT2_NAMES = frozenset({"c_attn", "q_attn", "c_fc", "c_proj"})
# Fused QKV names whose rows are stacked [q | k | v] in every family known to use them; other
# fused names (``query_key_value``: per head in GPT-NeoX / BLOOM, per KV group or stacked in
# Falcon; ``wqkv``: stacked in MPT, per KV group in InternLM2) need the model's family.
STACKED_QKV_NAMES = frozenset({"c_attn", "qkv_proj", "qkv", "in_proj"})
# Names only, >= 3-D weights that are no expert weights: name fragments that mark a
# convolution, and a transposed one (stored (in, out, ...)).
CONV_HINTS = ("conv", "patch")
TRANSPOSED_CONV_HINTS = ("transpose", "deconv", "convt")
# nn.MultiheadAttention's own parameters (no submodule of their own)
MHA_ATTRS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                       "bias_k", "bias_v"})
MLP_CONTAINERS = frozenset({"mlp", "feed_forward", "ffn", "densereludense"})
LORA_PREFIXES = ("lora_", "lora.")
WRAPPER_COMPONENTS = frozenset({"base_layer", "default", "linear", "original_module",
                                "modules_to_save"})


@dataclass(frozen=True)
class ModelDims:
    """Attention geometry: heads, KV heads and the per-head width (None where unknown)."""

    hidden: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None

    def heads_in(self, rows: int, role: str) -> int | None:
        """How many heads ``rows`` output rows of a ``role`` (query/key) projection hold."""
        if self.head_dim and rows % self.head_dim == 0:
            return rows // self.head_dim
        return self.n_heads if role == "query" else (self.n_kv_heads or self.n_heads)


def _first(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def dims_from_config(config: Any) -> ModelDims:
    """Read hidden size, heads, KV heads and head_dim from a Hugging Face config, whatever the
    family spells them (``n_embd``, ``d_model``, ``n_head``, ``num_kv_heads``, ``d_kv``, ...)."""
    if config is None:
        return ModelDims()
    text = getattr(config, "text_config", None)
    if text is not None and _first(config, ("num_attention_heads", "n_head")) is None:
        config = text
    hidden = _first(config, ("hidden_size", "n_embd", "d_model", "dim", "embed_dim"))
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads", "n_heads",
                            "encoder_attention_heads"))
    kv = _first(config, ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv"))
    if getattr(config, "model_type", None) == "falcon" and not getattr(
            config, "new_decoder_architecture", False):
        kv = 1 if getattr(config, "multi_query", False) else heads
    elif kv is None and getattr(config, "multi_query", False):
        kv = 1
    head_dim = _first(config, ("head_dim", "d_kv", "attention_head_size"))
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    return ModelDims(_int(hidden), _int(heads), _int(kv) or _int(heads), _int(head_dim))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


# ----- fused QKV styles -------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedQKV:
    """Row order of a fused QKV weight: ``stacked`` [q | k | v]; ``per_head`` [q_h k_h v_h] per
    head; ``per_group`` [q_1..q_n k v] per KV group."""

    style: str


STACKED, PER_HEAD, PER_GROUP = FusedQKV("stacked"), FusedQKV("per_head"), FusedQKV("per_group")


def _falcon(config: Any) -> FusedQKV:
    if getattr(config, "new_decoder_architecture", False):
        return PER_GROUP
    return STACKED if getattr(config, "multi_query", False) else PER_HEAD


# model_type -> fused QKV style (a value, or a function of the config)
FAMILIES: dict[str, FusedQKV | Callable[[Any], FusedQKV]] = {
    "llama": STACKED, "mistral": STACKED, "mixtral": STACKED, "qwen2": STACKED,
    "qwen2_moe": STACKED, "qwen3": STACKED, "qwen3_moe": STACKED, "gemma": STACKED,
    "gemma2": STACKED, "phi": STACKED, "phi3": STACKED, "olmo": STACKED, "olmo2": STACKED,
    "gpt2": STACKED, "gpt_bigcode": STACKED, "mpt": STACKED, "starcoder2": STACKED,
    "bert": STACKED, "roberta": STACKED, "vit": STACKED, "t5": STACKED, "deepseek_v3": STACKED,
    "gpt_neox": PER_HEAD, "bloom": PER_HEAD, "falcon": _falcon,
}


def fused_qkv_style(config: Any) -> tuple[FusedQKV, bool]:
    """The family's fused QKV style and whether it is known (False: assumed stacked)."""
    model_type = getattr(config, "model_type", None)
    entry = FAMILIES.get(model_type)
    if entry is None:
        return STACKED, False
    return (entry(config) if callable(entry) else entry), True


def role_from_components(components: list[str], ndim: int) -> str | None:
    """The role named by the module path (``components``: lower-cased module names, wrappers such
    as ``base_layer`` removed), or None."""
    if not components:
        return None
    last = components[-1]
    parent = components[-2] if len(components) > 1 else ""
    if last == "dense" and parent in DENSE_PARENTS:
        grandparent = components[-3] if len(components) > 2 else ""
        return "attn_out" if parent == "output" and "attention" in grandparent \
            else DENSE_PARENTS[parent]
    if last == "c_proj":  # GPT-2: the attention output or the MLP's second layer
        return "attn_out" if _in_attention(components) else "mlp"
    for role, names in ROLE_NAMES.items():
        if last in names:
            if role in ("query", "key", "value", "attn_out") and len(last) == 1 and \
                    not _in_attention(components):
                continue  # a bare "q"/"k"/"v"/"o" outside attention is not a projection
            return role
    if ndim >= 2 and any(c in MLP_CONTAINERS for c in components):
        return "mlp"
    return None


def _in_attention(components: list[str]) -> bool:
    return any("attn" in c or "attention" in c for c in components)


def module_components(name: str) -> tuple[list[str], str]:
    """Split ``a.b.weight`` into lower-cased module components (wrappers dropped) and the
    attribute name."""
    parts = name.lower().split(".")
    modules = [p for p in parts[:-1] if p not in WRAPPER_COMPONENTS and not p.isdigit()]
    return modules, parts[-1]


def is_lora(name: str) -> bool:
    return any(part.startswith(LORA_PREFIXES) for part in name.lower().split("."))


__all__ = ["ModelDims", "dims_from_config", "FAMILIES", "ROLE_NAMES", "FusedQKV", "GPT2_NAMES",
           "STACKED_QKV_NAMES", "MHA_ATTRS", "CONV_HINTS", "TRANSPOSED_CONV_HINTS",
           "fused_qkv_style", "role_from_components", "module_components", "is_lora"]
