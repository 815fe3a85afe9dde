"""Buffer donation: a donated update writes state and its own temporaries in place, with values
bit for bit those of the pure update, and never writes anything else (gradients, parameters,
the state a pure transform reads after its inner update, what a user transform keeps). The
eager optimizer step runs on it, over row pieces of large parameters."""
import math

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from adam_mini_tx import blocks
from adam_mini_tx.core.donation import (Workspace, donated_update, donating, empty_temporary, fresh,
                                   in_place_or_new)
from adam_mini_tx.optim.backends import eager as eager_backend
from adam_mini_tx.optim.members import Member
from test_oracles import TinyLlama, gradient_sequence, initial_params, run_functional
from test_optim import HEADS, feed

PARAMS = {"embed.weight": torch.randn(10, 4), "q_proj.weight": torch.randn(8, 4),
          "c_attn.weight": torch.randn(4, 12), "norm.weight": torch.randn(4),
          "bias": torch.randn(8)}
PLAN = {"embed.weight": blocks.per_row((10, 4)), "q_proj.weight": blocks.per_head((8, 4), 2),
        "c_attn.weight": blocks.per_row((4, 12), transposed=True),
        "norm.weight": blocks.single_block((4,)), "bias": blocks.elementwise((8,))}


def keeps_incoming_updates() -> amx.GradientTransformation:
    """A user transform, not marked in_place_safe, that keeps its incoming updates in its state."""
    return amx.GradientTransformation(
        lambda params: {name: torch.zeros_like(p) for name, p in params.items()},
        lambda updates, state, params=None, grads=None: (updates, dict(updates)))


CHAINS = {
    "adam_mini": lambda: amx.adam_mini(1e-2, weight_decay=0.1, plan=PLAN),
    "adam_mini, tensor lr and decay": lambda: amx.adam_mini(
        torch.tensor(1e-2), weight_decay=torch.tensor(0.1), plan=PLAN),
    "adamw": lambda: amx.adamw(1e-2, weight_decay=0.1),
    "laprop": lambda: amx.chain(amx.blockwise_mean_square(0.99, PLAN), amx.momentum(0.9),
                                amx.scale_by_lr(1e-2)),
    "nesterov": lambda: amx.chain(amx.momentum(0.9, nesterov=True),
                                  amx.blockwise_mean_square(0.99, PLAN), amx.scale_by_lr(1e-2)),
    "no bias correction": lambda: amx.chain(amx.momentum(0.9, bias_correction=False),
                                            amx.blockwise_mean_square(0.99, PLAN),
                                            amx.scale_by_lr(1e-2)),
    "clipped": lambda: amx.chain(amx.clip_by_global_norm(0.5),
                                 amx.adam_mini(1e-2, plan=PLAN)),
    "user transform keeps updates": lambda: amx.chain(
        amx.momentum(0.9), keeps_incoming_updates(), amx.blockwise_mean_square(0.99, PLAN),
        amx.scale_by_lr(1e-2)),
    "guarded": lambda: amx.nonfinite_guard(amx.adam_mini(1e-2, plan=PLAN), "skip"),
    "state in float64": lambda: amx.adam_mini(1e-2, plan=PLAN, state_dtype=torch.float64),
}


def leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


@pytest.mark.parametrize("name", list(CHAINS))
def test_a_donated_update_equals_the_pure_one_and_writes_only_its_state(name):
    """Three steps, one with a NaN gradient for the guard: updates and state bit for bit equal;
    the gradients and parameters are untouched; a user transform's kept updates are intact."""
    tx = CHAINS[name]()
    torch.manual_seed(0)
    grads_seq = [{n: torch.randn_like(p) for n, p in PARAMS.items()} for _ in range(3)]
    grads_seq[1]["bias"][0] = float("nan") if name == "guarded" else 1.0
    pure_state = tx.init(PARAMS)
    donated_state = tx.init(PARAMS)
    for grads in grads_seq:
        before = {n: g.clone() for n, g in grads.items()}, {n: p.clone() for n, p in PARAMS.items()}
        pure_updates, pure_state = tx.update(grads, pure_state, PARAMS)
        donated_updates, donated_state = donated_update(tx, grads, donated_state, PARAMS)
        for n in PARAMS:
            assert torch.equal(donated_updates[n], pure_updates[n]), (name, n)
        for mine, theirs in zip(leaves(donated_state), leaves(pure_state)):
            assert torch.equal(mine, theirs), name
        for original, now in zip(before, (grads, PARAMS)):
            for n in now:
                torch.testing.assert_close(now[n], original[n], rtol=0, atol=0, equal_nan=True)


def test_donation_writes_the_state_in_place_and_one_temporary_per_parameter():
    tx = amx.adam_mini(1e-2, weight_decay=0.1, plan=PLAN)
    state = tx.init(PARAMS)
    first_moments = dict(state[0].mu)
    grads = {n: torch.randn_like(p) for n, p in PARAMS.items()}
    workspace = Workspace()
    _, new_state = donated_update(tx, grads, state, PARAMS, workspace=workspace)
    assert all(new_state[0].mu[n] is first_moments[n] for n in PARAMS)  # m written in place
    assert new_state[1].nu["embed.weight"] is state[1].nu["embed.weight"]
    # once the workspace has grown to one call's needs, later calls reuse the same memory
    first, new_state = donated_update(tx, grads, new_state, PARAMS, workspace=workspace)
    pointers = {u.data_ptr() for u in first.values()}
    second, _ = donated_update(tx, grads, new_state, PARAMS, workspace=workspace)
    assert {u.data_ptr() for u in second.values()} == pointers and len(pointers) == len(PARAMS)


def test_workspace_hands_out_aligned_disjoint_tensors_and_grows():
    cpu = torch.device("cpu")
    workspace = Workspace()
    a = workspace.empty((3, 5), torch.float32, cpu)
    b = workspace.empty((7,), torch.float32, cpu)  # does not fit: a larger buffer
    a.fill_(1.0), b.fill_(2.0)
    assert bool((a == 1).all()) and bool((b == 2).all())  # handed-out tensors keep their memory
    workspace.reset()  # now both fit in the one buffer, one after the other, 64-byte aligned
    a2, b2 = workspace.empty((3, 5), torch.float32, cpu), workspace.empty((7,), torch.float32, cpu)
    assert b2.data_ptr() - a2.data_ptr() == 64 and a2.data_ptr() == b.data_ptr()
    assert workspace.empty((2,), torch.float64, cpu).dtype == torch.float64  # a buffer per dtype


def test_in_place_only_for_registered_temporaries_of_matching_shape_and_dtype():
    outside = torch.ones(3)
    assert in_place_or_new(outside, "mul", 2.0) is not outside  # no donation: pure
    with donating():
        assert empty_temporary(outside) is not None
        mine = fresh(torch.ones(3, 4))
        assert in_place_or_new(mine, "mul", torch.full((3, 1), 2.0)) is mine  # broadcasts in
        assert in_place_or_new(mine, "add", torch.ones(2, 3, 4)) is not mine  # would grow
        assert in_place_or_new(mine, "mul", torch.ones(4, dtype=torch.float64)) is not mine
        given = torch.ones(3)  # not registered: a gradient, a parameter, another's output
        assert in_place_or_new(given, "mul", 2.0) is not given
        assert bool((given == 1).all())


def test_eager_step_over_row_pieces_equals_the_functional_core_bit_for_bit(monkeypatch):
    """With tiny chunks every parameter whose blocks are rows is cut into pieces of 2 rows; the
    optimizer still equals the pure chain, and counts each parameter's steps once."""
    monkeypatch.setattr(eager_backend, "CHUNK_ELEMENTS", 64)
    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 5)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = amx.AdamMini(model.named_parameters(), **hyper, **HEADS, native=False)
    embedding = model.embed_tokens.weight
    embedding.grad = torch.zeros_like(embedding)
    slots = {"step": torch.tensor(0), "m": torch.zeros(48, 32), "v": torch.zeros(48)}
    pieces = eager_backend.row_pieces(Member("embed_tokens.weight", embedding, embedding.grad,
                                             slots), opt.plan["embed_tokens.weight"].layout)
    assert len(pieces) == 24 and pieces[0][0].name == "embed_tokens.weight[0:2]"
    ours = feed(model, opt, grads_seq)
    ref = run_functional(amx.adam_mini(**hyper, **HEADS), params, grads_seq)
    for k in params:
        assert torch.equal(ours[k], ref[k]), k
    assert {int(s["step"]) for s in opt.state.values()} == {5}
    # the kept workspace holds one chunk's temporaries (aligned), not the model's
    assert 64 * 4 <= opt.scratch_bytes <= 4 * 64 * 4 < sum(p.numel() for p in params.values())


def test_only_whole_blocks_along_the_first_axis_are_cut_into_pieces(monkeypatch):
    """Rows and runs of rows (heads) along the first axis are cut at block boundaries; a
    transposed Conv1D weight and fused QKV rows (runs of several lengths) stay whole."""
    monkeypatch.setattr(eager_backend, "CHUNK_ELEMENTS", 1024)
    layouts = {"c_attn.weight": blocks.per_row((64, 96), transposed=True),
               "qkv_proj.weight": blocks.fused_rows((96, 64), [("q", 4), ("k", 2), ("v", 32)]),
               "q_proj.weight": blocks.per_head((96, 64), 4),
               "up_proj.weight": blocks.per_row((96, 64))}
    expected = {"c_attn.weight": [64], "qkv_proj.weight": [96], "q_proj.weight": [24] * 4,
                "up_proj.weight": [16] * 6}
    for name, layout in list(layouts.items()):
        param = nn.Parameter(torch.randn(layout.shape))
        param.grad = torch.randn_like(param)
        state = {"step": torch.tensor(0), "m": torch.zeros(layout.shape),
                 "v": torch.arange(float(math.prod(layout.v_shape))).reshape(layout.v_shape)}
        pieces = eager_backend.row_pieces(Member(name, param, param.grad, state), layout)
        assert [piece.param.shape[0] for piece, _ in pieces] == expected[name], name
        if name == "q_proj.weight":  # each piece holds its own head's second moment
            assert [piece.state["v"].tolist() for piece, _ in pieces] == [[0.0], [1.0], [2.0],
                                                                          [3.0]]
            assert pieces[1][1].runs == ((24, 1),)


def test_eager_check_reads_the_statistics_the_chain_then_takes():
    """With the default non-finite check, each gradient is read once for its row sums (which the
    check and the chain share) and once by the momentum: no full-size sum for the check, no
    second norm in the chain; the result is the functional core's, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.norms, self.largest_sum = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.linalg_vector_norm.default:
                self.norms += 1
            if func.overloadpacket is torch.ops.aten.sum:
                self.largest_sum = max(self.largest_sum, args[0].numel())
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = TinyLlama()
    params = initial_params(model)
    grads_seq = gradient_sequence(params, 3)
    opt = amx.AdamMini(model.named_parameters(), lr=3e-3, weight_decay=0.1, **HEADS,
                       native=False)
    # one norm per tensor whose blocks are not single elements (rows, heads, whole norms)
    reduced = [name for name, p in model.named_parameters()
               if opt.plan[name].layout.row_dims < p.dim()]
    rows = [p for p in model.parameters() if p.dim() == 2]
    for step, grads in enumerate(grads_seq):
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        if step == 2:
            with Reads() as reads:
                opt.step()
        else:
            opt.step()
    assert reads.norms == len(reduced) > len(rows)
    assert reads.largest_sum < min(p.numel() for p in rows)  # row sums only, never a gradient
    ref = run_functional(amx.adam_mini(lr=3e-3, weight_decay=0.1, **HEADS), params, grads_seq)
    assert all(torch.equal(p, ref[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None),
                                                (torch.bfloat16, torch.float32)])
def test_given_statistics_equal_the_chains_own_over_pieces(monkeypatch, dtype, state_dtype):
    """The check's statistics pass (row sums in v's dtype) and the chain's own statistic are the
    same numbers: "skip" and "apply" steps agree bit for bit, over row pieces too."""
    monkeypatch.setattr(eager_backend, "CHUNK_ELEMENTS", 256)
    torch.manual_seed(0)
    models = [TinyLlama().to(dtype) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [amx.AdamMini(m.named_parameters(), lr=3e-3, weight_decay=0.1, nonfinite=policy,
                         native=False,
                         state_dtype=state_dtype, **HEADS)
            for m, policy in zip(models, ("skip", "apply"))]
    grads_seq = gradient_sequence(initial_params(models[0]), 3)
    for model, opt in zip(models, opts):
        feed(model, opt, grads_seq)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opts[0].state[p][k], opts[1].state[q][k]) for k in ("m", "v"))
