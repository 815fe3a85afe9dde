"""Adam_mini, the drop-in for the official package: same numbers where the official is right,
the planner's blocks where it crashes or mis-blocks, logging instead of printing."""
import logging

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from test_optim import HEADS, feed
from test_oracles import TinyLlama, gradient_sequence, initial_params

official = pytest.importorskip("adam_mini")
transformers = pytest.importorskip("transformers")

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def hf_llama(**config):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        intermediate_size=48, vocab_size=40, mlp_bias=True), **config})
    return transformers.LlamaForCausalLM(config)


def twin_of(model):
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def max_relative_difference(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a.parameters(), b.parameters()))


def test_matches_the_official_run_on_a_hugging_face_llama_with_gqa():
    """50 training steps of a tiny HF Llama (4 query heads, 2 KV heads, MLP biases), each optimizer on
    its own copy of the model: the runs agree to 1e-5 relative in every tensor. (No attention
    biases: softmax ignores a k bias, so its gradient is rounding noise that Adam amplifies.)"""
    ours_model = hf_llama()
    theirs_model = twin_of(ours_model)
    dims = dict(dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    ours = amx.Adam_mini(ours_model.named_parameters(), **HYPER, **dims)
    theirs = official.Adam_mini(theirs_model.named_parameters(), **HYPER, **dims)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(50):
        ids = (torch.randint(0, 40, (4, 1), generator=gen) + torch.arange(12)) % 40  # counting
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first  # it trained
    assert max_relative_difference(ours_model, theirs_model) < 1e-5
    # the same blocks: k has one second moment per KV head in both
    k_ours = ours.state[ours_model.model.layers[0].self_attn.k_proj.weight]["v"]
    k_theirs = theirs.state[theirs_model.model.layers[0].self_attn.k_proj.weight]["vmean"]
    assert k_ours.shape == (2,) and k_theirs.numel() == 2


class MetaLlama(nn.Module):
    """Meta's Llama names (tok_embeddings, attention.wq ... feed_forward.w1, output), with GQA."""

    def __init__(self, vocab=40, dim=32, n_heads=4, n_kv_heads=2, hidden=48, layers=2):
        super().__init__()
        head_dim = dim // n_heads
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attention = nn.Module()
            block.attention.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
            block.attention.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
            block.attention.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
            block.attention.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
            block.feed_forward = nn.Module()
            block.feed_forward.w1 = nn.Linear(dim, hidden, bias=False)
            block.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)
            block.feed_forward.w3 = nn.Linear(dim, hidden, bias=False)
            block.attention_norm = nn.RMSNorm(dim)
            block.ffn_norm = nn.RMSNorm(dim)
            self.layers.append(block)
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


@pytest.mark.parametrize("make_model", [TinyLlama, MetaLlama], ids=["hf-names", "meta-names"])
def test_matches_the_official_package_on_a_fixed_gradient_sequence(make_model):
    torch.manual_seed(0)
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    grads_seq = gradient_sequence(initial_params(model), 50, seed=3)
    dims = dict(dim=32, **HEADS, verbose=False)
    ours = feed(model, amx.Adam_mini(model.named_parameters(), **HYPER, **dims), grads_seq)
    theirs = feed(twin, official.Adam_mini(twin.named_parameters(), **HYPER, **dims), grads_seq)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_trains_where_the_official_crashes():
    """``dim`` left at its default (2048) on a small model: the official's q/k view fails at the
    first step; the drop-in cuts q/k per head from n_heads / n_kv_heads."""
    model, twin = hf_llama(), None
    twin = twin_of(model)
    ids = torch.arange(12).reshape(2, 6)
    theirs = official.Adam_mini(twin.named_parameters(), n_heads=4, n_kv_heads=2, verbose=False)
    twin(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError):
        theirs.step()
    ours = amx.Adam_mini(model.named_parameters(), n_heads=4, n_kv_heads=2, verbose=False)
    model(input_ids=ids, labels=ids).loss.backward()
    ours.step()
    assert ours.state[model.model.layers[0].self_attn.q_proj.weight]["v"].shape == (4,)


def test_whole_heads_when_head_dim_times_heads_is_not_the_width():
    """head_dim 16 with width 32 and 4 heads: the official cuts q into 8 half-heads (dim*dim/n_heads
    elements each); the drop-in keeps one block per head."""
    model = hf_llama(head_dim=16)
    twin = twin_of(model)
    ids = torch.arange(12).reshape(2, 6)
    ours = amx.Adam_mini(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    theirs = official.Adam_mini(twin.named_parameters(), dim=32, n_heads=4, n_kv_heads=2,
                                verbose=False)
    for m, opt in ((model, ours), (twin, theirs)):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert ours.state[model.model.layers[0].self_attn.q_proj.weight]["v"].shape == (4,)
    assert theirs.state[twin.model.layers[0].self_attn.q_proj.weight]["vmean"].numel() == 8


def test_follows_the_official_weight_decay_rule_by_name():
    """No decay where the lower-cased name contains norm, ln or bias, even on a matrix (kept for
    fidelity); AdamMini's default mask decays every tensor with >= 2 dims."""
    model = nn.Module()
    model.relative_attention_bias = nn.Embedding(8, 4)
    model.mlp = nn.Linear(4, 4, bias=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def decayed(opt):
        for n, p in model.named_parameters():
            p.data.copy_(before[n])
            p.grad = torch.zeros_like(p)
        opt.step()
        return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}

    drop_in = amx.Adam_mini(model.named_parameters(), lr=0.1, weight_decay=0.5, dim=4, n_heads=1,
                            verbose=False)
    assert decayed(drop_in) == {"relative_attention_bias.weight": False, "mlp.weight": True}
    default = amx.AdamMini(model.named_parameters(), lr=0.1, weight_decay=0.5)
    assert decayed(default) == {"relative_attention_bias.weight": True, "mlp.weight": True}


def test_skips_frozen_parameters_like_the_official():
    model = TinyLlama()
    model.embed_tokens.weight.requires_grad_(False)
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    assert "embed_tokens.weight" not in opt.plan
    assert "embed_tokens.weight" not in opt.param_groups[0]["param_names"]


def test_logs_instead_of_printing(capsys, caplog):
    model = TinyLlama()
    with caplog.at_level(logging.INFO, logger="adam_mini_tx"):
        amx.Adam_mini(model.named_parameters(), dim=32, **HEADS)
    assert capsys.readouterr().out == ""
    assert "layers.0.self_attn.q_proj.weight" in caplog.text and "(h d) i -> h" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adam_mini_tx"):
        amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    assert caplog.text == ""


def test_model_sharding_is_deprecated_and_ignored():
    with pytest.warns(DeprecationWarning, match="model_sharding"):
        amx.Adam_mini(TinyLlama().named_parameters(), dim=32, **HEADS, model_sharding=True,
                      verbose=False)


def test_is_a_checkpointable_torch_optimizer():
    model = TinyLlama()
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == 1
    fresh = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[model.norm.weight]["m"], opt.state[model.norm.weight]["m"])
