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


# ----- the official's name sets --------------------------------------------------------------
def twins(make_model=TinyLlama):
    torch.manual_seed(0)
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_the_seven_name_sets_exist_with_the_official_defaults():
    model, twin = twins()
    ours = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    theirs = official.Adam_mini(twin.named_parameters(), dim=32, **HEADS, verbose=False)
    for key in amx.compat.OFFICIAL_NAME_SETS:
        assert getattr(ours, key) == getattr(theirs, key), key
    ours.embd_names.add("tok_emb")  # what the official's warnings tell users to do
    assert "tok_emb" in ours.embd_names


@pytest.mark.parametrize("key, value", [
    ("wv_names", {}),  # the official README's tip for short runs: v is one block
    ("wv_names", set()),
    ("mlp_names", {"feed_forward", "linear"}),  # TinyLlama's mlp.* become one block each
    ("adam_block_names", {"bias", "norm"}),  # norms get elementwise Adam
    ("wqk_names", {"q_proj", "k_proj", "v_proj"}),  # v per head of dim / n_heads rows
    ("output_names", set()),  # lm_head one block
])
def test_changed_name_sets_block_as_the_official_does(key, value):
    """The same change on both, then 50 steps of one gradient sequence: equal to 1e-5."""
    model, twin = twins()
    grads_seq = gradient_sequence(initial_params(model), 50, seed=5)
    dims = dict(dim=32, **HEADS, verbose=False)
    ours = amx.Adam_mini(model.named_parameters(), **HYPER, **dims)
    theirs = official.Adam_mini(twin.named_parameters(), **HYPER, **dims)
    before = ours.plan
    setattr(ours, key, value)
    setattr(theirs, key, value)
    got, want = feed(model, ours, grads_seq), feed(twin, theirs, grads_seq)
    assert ours.plan.layouts() != before.layouts()  # the change did change blocks
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    if key == "wv_names":
        assert ours.state[model.layers[0].self_attn.v_proj.weight]["v"].shape == ()
        assert ours.plan["layers.0.self_attn.v_proj.weight"].source == "rule"


def test_name_sets_changed_after_the_first_step_are_refused():
    model = TinyLlama()
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    feed(model, opt, gradient_sequence(initial_params(model), 1))
    opt.wv_names = set()
    with pytest.raises(RuntimeError, match="wv_names changed after the optimizer made its state"):
        opt.step()
    opt.wv_names = set(amx.compat.OFFICIAL_NAME_SETS["wv_names"])
    opt.step()  # restored: steps again


def test_a_name_set_must_be_a_set_of_strings():
    model = TinyLlama()
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    opt.wv_names = "v_proj"
    with pytest.raises(TypeError, match=r"Adam_mini\.wv_names must be a set of name fragments"):
        feed(model, opt, gradient_sequence(initial_params(model), 1))


def test_name_sets_survive_a_deepcopy_and_step_hooks_run_once():
    import copy
    model = TinyLlama()
    amx.AdamMini(model.named_parameters(), **HEADS)  # torch wraps AdamMini.step with hooks too
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    clone = copy.deepcopy(opt)
    clone.wv_names = set()
    calls = []
    clone.register_step_post_hook(lambda *args: calls.append(1))
    feed(model, clone, gradient_sequence(initial_params(model), 1))
    assert clone.plan["layers.0.self_attn.v_proj.weight"].num_blocks == 1  # re-planned
    assert opt.plan["layers.0.self_attn.v_proj.weight"].num_blocks == 16  # the original is not
    assert calls == [1]


# ----- official checkpoints -------------------------------------------------------------------
def test_an_official_checkpoint_continues_as_the_official_would():
    """20 steps with the official, its state_dict loaded into the drop-in (converted), then 30
    more steps on both: the runs agree to 1e-5."""
    model, twin = twins()
    grads_seq = gradient_sequence(initial_params(model), 50, seed=7)
    dims = dict(dim=32, **HEADS, verbose=False)
    theirs = official.Adam_mini(twin.named_parameters(), **HYPER, **dims)
    feed(twin, theirs, grads_seq[:20])
    model.load_state_dict(twin.state_dict())
    ours = amx.Adam_mini(model.named_parameters(), **HYPER, **dims)
    ours.load_state_dict(theirs.state_dict())
    q = model.layers[0].self_attn.q_proj.weight
    assert int(ours.state[q]["step"]) == 20 and ours.state[q]["v"].shape == (4,)
    assert ours.param_groups[0]["betas"] == HYPER["betas"]
    got, want = feed(model, ours, grads_seq[20:]), feed(twin, theirs, grads_seq[20:])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_an_official_checkpoint_with_other_blocks_is_refused_naming_the_tensor():
    """HF GPT-2: the official makes c_attn one block (no name set matches it); the drop-in blocks
    it per head, so its state cannot be carried over."""
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    theirs = official.Adam_mini(model.named_parameters(), dim=32, n_heads=4, verbose=False)
    ids = torch.arange(12).reshape(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    theirs.step()
    ours = amx.Adam_mini(model.named_parameters(), dim=32, n_heads=4, verbose=False)
    with pytest.raises(ValueError, match=r"cannot be carried over.*'transformer\.wpe\.weight'.*"
                                         r"'transformer\.h\.0\.attn\.c_attn\.weight'"):
        ours.load_state_dict(theirs.state_dict())


def test_llama_factory_construction_on_hf_gpt2():
    """LLaMA-Factory's call, verbatim, on an HF GPT-2 (Conv1D, fused c_attn): the blocks of
    plan=model, and it trains."""
    config = transformers.GPT2Config(n_embd=96, n_head=4, n_layer=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.warns(DeprecationWarning, match="model_sharding"):
        optimizer = amx.Adam_mini(
            named_parameters=model.named_parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
            weight_decay=0.01, model_sharding=False, dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)
    assert optimizer.plan.layouts() == amx.plan_blocks(model).layouts()
    assert not optimizer.plan.fallbacks
    ids = (torch.arange(14).reshape(2, 7) * 3) % 40
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_model_settles_what_names_cannot():
    """A 3-D weight named ``0.weight`` may be a Conv1d or stacked experts: names alone give an
    error that says to pass the model; with ``model=`` it is planned per output channel."""
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 5))
    with pytest.raises(ValueError, match=r"'0\.weight'.*model= to Adam_mini"):
        amx.Adam_mini(model.named_parameters(), verbose=False)
    opt = amx.Adam_mini(model.named_parameters(), verbose=False, model=model)
    assert opt.plan["0.weight"].num_blocks == 8 and not opt.plan.fallbacks
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        amx.Adam_mini(model.named_parameters(), verbose=False, model=model.state_dict())


def test_a_name_set_that_sends_a_vector_to_rows_is_refused_naming_it():
    """The official crashes at its first step on a 1-D tensor in a per-row set; the drop-in says
    which tensor and which entry."""
    model = TinyLlama()
    opt = amx.Adam_mini(model.named_parameters(), dim=32, **HEADS, verbose=False)
    opt.mlp_names.add("norm")
    with pytest.raises(ValueError, match=r"'layers\.0\.input_layernorm\.weight'.*mlp_names entry "
                                         r"'norm'.*needs >= 2 dims"):
        feed(model, opt, gradient_sequence(initial_params(model), 1))
    assert not any(opt.state.values())  # nothing was stepped
