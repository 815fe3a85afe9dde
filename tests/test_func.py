"""torch.func and torch.compile: ensembles under vmap, hypergradients through unrolled updates,
compiled steps that compile once."""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.func import functional_call, grad, vmap

import adam_mini_tx as amx


class TinyLM(nn.Module):
    """Embedding (with rows that never occur in the data) + attention-style projections."""

    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        attn = (self.q_proj(x) @ self.k_proj(x).transpose(-1, -2)).softmax(-1) @ x
        return self.lm_head(self.norm(x + attn))


torch.manual_seed(0)
MODEL = TinyLM().double()
PLAN = amx.plan_blocks(MODEL, n_heads=2)
TOKENS = torch.randint(0, 6, (4, 5))  # tokens 6..11 never occur: their embedding rows get g == 0


def loss_fn(params, tokens=TOKENS):
    logits = functional_call(MODEL, params, (tokens[:, :-1],))
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def base_params():
    return {k: v.detach().clone() for k, v in MODEL.named_parameters()}


def unrolled_loss(lr, b1, wd, k=3):
    params = base_params()
    tx = amx.adam_mini(lr=lr, betas=(b1, 0.99), weight_decay=wd, plan=PLAN)
    state = tx.init(params)
    for _ in range(k):
        updates, state = tx.update(grad(loss_fn)(params), state, params)
        params = amx.apply_updates(params, updates)
    return loss_fn(params)


@pytest.mark.parametrize("argnum,name", [(0, "lr"), (1, "b1"), (2, "weight_decay")])
def test_hypergradient_matches_finite_differences(argnum, name):
    point = [torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64),
             torch.tensor(0.1, dtype=torch.float64)]
    hyper = grad(unrolled_loss, argnums=argnum)(*point)
    h = 1e-5
    plus = [p.clone() for p in point]
    minus = [p.clone() for p in point]
    plus[argnum] += h
    minus[argnum] -= h
    fd = (unrolled_loss(*plus) - unrolled_loss(*minus)) / (2 * h)
    assert torch.isfinite(hyper)
    relative = (abs(hyper - fd) / abs(fd)).item()
    print(f"\nhypergradient d loss / d {name}: autograd {hyper.item():.6e}, "
          f"finite difference {fd.item():.6e}, relative error {relative:.1e}")
    assert relative < 1e-5


def test_hypergradient_is_finite_through_exactly_zero_blocks():
    """Embedding rows 6..11 never occur, so their second moment is exactly 0; sqrt(0) must not
    turn the meta-gradient into NaN."""
    g = grad(loss_fn)(base_params())["embed_tokens.weight"]
    assert torch.equal(g[6:], torch.zeros_like(g[6:]))
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = unrolled_loss(lr, 0.9, 0.0)
    (d_lr,) = torch.autograd.grad(loss, lr)
    assert torch.isfinite(d_lr)


def test_vmap_ensemble_equals_separate_runs_with_per_member_lr():
    members = [{k: v + 0.1 * torch.randn_like(v) for k, v in base_params().items()} for _ in range(3)]
    lrs = torch.tensor([1e-3, 1e-2, 5e-2], dtype=torch.float64)

    def step(params, state, lr):
        tx = amx.adam_mini(lr=lr, weight_decay=0.1, plan=PLAN)
        updates, state = tx.update(grad(loss_fn)(params), state, params)
        return amx.apply_updates(params, updates), state

    init = amx.adam_mini(plan=PLAN).init
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    states = vmap(init)(stacked)
    for _ in range(4):
        stacked, states = vmap(step)(stacked, states, lrs)
    for i, params in enumerate(members):
        state = init(params)
        for _ in range(4):
            params, state = step(params, state, lrs[i])
        for k in params:
            torch.testing.assert_close(stacked[k][i], params[k])


def compiled_run(tx, steps, set_lr=None):
    params = {k: v.float() for k, v in base_params().items()}
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return amx.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(steps):
        if set_lr is not None:
            set_lr(i)
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        params, state = step(params, state, grads)
    return counter.frame_count


def test_compiled_step_compiles_once_with_a_schedule():
    tx = amx.adam_mini(lr=lambda count: 1e-2 / count.to(torch.float32).sqrt(), weight_decay=0.1,
                       plan={k: v for k, v in PLAN.layouts().items()})
    graphs = compiled_run(tx, steps=8)
    print(f"\ngraphs compiled over 8 steps with an lr schedule: {graphs}")
    assert graphs == 1


def test_compiled_step_compiles_once_when_a_tensor_lr_changes():
    lr = torch.tensor(1e-2)
    tx = amx.adam_mini(lr=lr, plan=PLAN)
    graphs = compiled_run(tx, steps=8, set_lr=lambda i: lr.fill_(1e-2 / (i + 1)))
    print(f"\ngraphs compiled over 8 steps with a 0-d tensor lr changed in place: {graphs}")
    assert graphs == 1
