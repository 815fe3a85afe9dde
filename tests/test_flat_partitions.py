"""Flat partitions (DeepSpeed ZeRO's view of the parameters), in one process, without DeepSpeed.

The parameters of a GPT-2 (fused transposed QKV, transposed ``Conv1D`` weights, biases,
LayerNorms) and of a GQA Llama-style model with 3-D experts are concatenated into one flat buffer
and cut into ranks at many places (inside rows, heads, fused segments and single-block tensors);
each rank's pieces are stepped by the flat backend with the ranks' row sums added (what the
all-reduce does), and after 10 steps every parameter equals a plain ``AdamMini`` run.
"""
import random

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from adam_mini_tx.demo.model import GPT, GPTConfig
from adam_mini_tx.distributed import Fragment, flat_partition
from adam_mini_tx.distributed.flat import PIECE_ELEMENTS
from adam_mini_tx.optim.backends import FlatBackend
from adam_mini_tx.optim.backends import flat as flat_backend
from adam_mini_tx.optim.hyperparams import read_hyperparameters
from adam_mini_tx.optim.members import Member
from adam_mini_tx.optim.state import new_flat_slots

transformers = pytest.importorskip("transformers")
STEPS = 10


def gpt2_with_experts():
    """GPT-2 (fused transposed QKV, transposed Conv1D weights, biases, LayerNorms) with a 3-D
    expert weight (one block per (expert, row)) attached."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=17, n_positions=8, n_embd=12, n_layer=1, n_head=3))
    model.experts = nn.Parameter(torch.randn(3, 5, 7))
    return model, {}


def llama_gqa():
    """3 query heads of 8 rows, 1 KV head, RMSNorms, an odd vocabulary."""
    torch.manual_seed(0)
    return (GPT(GPTConfig(vocab_size=11, dim=24, n_layers=1, n_heads=3, n_kv_heads=1, hidden=20,
                          max_seq=4)), dict(n_heads=3, n_kv_heads=1))


def simulated_ranks(named, cuts, layouts, piece_elements):
    """Per rank: (flat partition, its fragments' partition) of the concatenated parameters."""
    offsets, total = {}, 0
    for name, p in named:
        offsets[name] = total
        total += p.numel()
    bounds = [0, *cuts, total + 3]  # the last rank padded, like ZeRO's alignment
    ranks = []
    for a, b in zip(bounds, bounds[1:]):
        fragments = []
        for name, p in named:
            lo, hi = max(a, offsets[name]), min(b, offsets[name] + p.numel())
            if lo < hi:
                fragments.append(Fragment(name, lo - offsets[name], lo - a, hi - lo))
        partition = flat_partition(f"rank {len(ranks)}", fragments,
                                   [(n, layouts[n]) for n, _ in named], None, piece_elements)
        ranks.append((a, b, partition))
    return ranks, offsets, total


@pytest.mark.parametrize("piece_elements", [PIECE_ELEMENTS, 50])  # 50: rows in many pieces
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("make", [gpt2_with_experts, llama_gqa])
def test_flat_partitions_equal_single_process(make, seed, piece_elements, monkeypatch):
    monkeypatch.setattr(flat_backend, "PIECE_ELEMENTS", piece_elements)  # chain calls too
    model, dims = make()
    named = [(n, p) for n, p in model.named_parameters()]
    reference = amx.AdamMini(named, plan=model if not dims else None, lr=1e-2,
                             betas=(0.9, 0.95), weight_decay=0.1, **dims)
    layouts = reference.plan.layouts()
    total = sum(p.numel() for _, p in named)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), 5))
    ranks, offsets, _ = simulated_ranks(named, cuts, layouts, piece_elements)
    pieces = [piece for _, _, part in ranks for piece in part.pieces]
    assert (len(pieces) > 3 * len(named) + 3) == (piece_elements == 50), len(pieces)
    flat = torch.cat([p.detach().reshape(-1) for _, p in named] + [torch.zeros(3)])
    flats = [flat[a:b].clone() for a, b, _ in ranks]
    slots = [new_flat_slots(f, (part.v_numel,), None) for f, (_, _, part) in zip(flats, ranks)]
    backend = FlatBackend()
    hyper = read_hyperparameters(reference.param_groups[0], "")
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * seed + step)
        grads = {n: torch.randn(p.shape, generator=gen) * (1 + step) for n, p in named}
        reference.zero_grad()
        for n, p in named:
            p.grad = grads[n].clone()
        reference.step()
        flat_grad = torch.cat([grads[n].reshape(-1) for n, _ in named] + [torch.zeros(3)])
        members = []
        for f, s, (a, b, part) in zip(flats, slots, ranks):
            f.grad = flat_grad[a:b].clone()
            members.append(Member(part.name, f, f.grad, s, part))
        works = [backend.prepare([m], layouts, hyper) for m in members]
        total_sums = sum(backend.row_sums(work)[0][m.name] for work, m in zip(works, members))
        for work, m in zip(works, members):
            written = []
            backend.apply(work, hyper, {m.name: total_sums}, written)
            assert written == [m]
            m.state["step"] += 1
    got = torch.cat(flats)
    for name, p in named:
        start = offsets[name]
        value = got[start:start + p.numel()].view(p.shape)
        error = ((value - p.detach()).abs().max() / p.detach().abs().max()).item()
        assert error < 1e-6, (name, error, cuts)
    assert any(inside_a_block(layouts[name], p.shape, cut - offsets[name])
               for cut in cuts for name, p in named
               if offsets[name] < cut < offsets[name] + p.numel()), cuts


def inside_a_block(layout, shape, element: int) -> bool:
    """Whether elements ``element - 1`` and ``element`` of a tensor (row-major) share a block."""
    ids = torch.arange(layout.num_blocks).reshape(layout.v_shape)
    ids = layout.expand(ids).expand(tuple(shape)).reshape(-1)
    return 0 < element < ids.numel() and bool(ids[element - 1] == ids[element])


def test_unsupported_permutation_is_refused():
    layout = amx.blocks.per_row((2, 3, 4), axis=1)
    with pytest.raises(NotImplementedError, match="permutes the axes"):
        flat_partition("p", [Fragment("w", 0, 0, 24)], [("w", layout)], None)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nonfinite_gradient_on_another_rank_stops_this_rank_too(policy):
    """This rank's gradient is finite, the all-reduced row sums are not: it skips (or raises)
    like the rank that holds the NaN, instead of writing non-finite statistics."""
    from adam_mini_tx.optim.nonfinite import decide
    part = flat_partition("rank 0", [Fragment("w", 0, 0, 3)],
                          [("w", amx.blocks.per_row((2, 3)))], None)
    member = Member(part.name, torch.zeros(3), torch.ones(3), {}, part)
    sums = {part.name: torch.tensor([3.0, float("nan")])}  # rank 1's row holds a NaN
    flags = [torch.isfinite(sums[part.name]).all()]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="DeepSpeed|rank 0"):
            decide(policy, [member], sums, flags, {})
    else:
        decision = decide(policy, [member], sums, flags, {})
        assert not decision.apply and decision.bad == [part.name]


@pytest.mark.parametrize("piece_elements", [PIECE_ELEMENTS, 50])
@pytest.mark.parametrize("make", [gpt2_with_experts, llama_gqa])
def test_whole_pieces_are_those_holding_every_element_of_their_blocks(make, piece_elements):
    """``Piece.whole`` (its row sums are its parameter's own) against a count of the block ids
    of every element: a piece is whole exactly when each block it meets lies in it entirely."""
    model, dims = make()
    named = list(model.named_parameters())
    layouts = amx.AdamMini(named, plan=model if not dims else None, **dims).plan.layouts()
    total = sum(p.numel() for _, p in named)
    ranks, offsets, _ = simulated_ranks(named, sorted(random.Random(3).sample(range(1, total), 7)),
                                        layouts, piece_elements)
    seen = set()
    for a, _, part in ranks:
        for piece in part.pieces:
            layout, shape = layouts[piece.param_name], dict(named)[piece.param_name].shape
            ids = layout.expand(torch.arange(layout.num_blocks).reshape(layout.v_shape))
            ids = ids.expand(tuple(shape)).reshape(-1)
            first = a + piece.offset - offsets[piece.param_name]
            held = ids[first:first + piece.layout.num_rows * piece.layout.row_numel]
            inside = all(int((held == i).sum()) == int((ids == i).sum()) for i in held.unique())
            assert piece.whole == inside, piece
            seen.add(piece.whole)
    assert seen == {True, False}


@pytest.mark.parametrize("make", [gpt2_with_experts, llama_gqa])
def test_one_rank_without_a_statistics_pass_steps_each_piece_in_one_pass(make, monkeypatch):
    """``nonfinite="apply"`` on one rank whose pieces hold whole blocks: no statistics pass;
    the kernel sums each piece's ``g*g`` in its single pass, and 10 steps equal ``AdamMini``."""
    from adam_mini_tx.kernels import native
    if not native.load():
        pytest.skip(f"native kernel: {native.status()}")
    model, dims = make()
    named = list(model.named_parameters())
    reference = amx.AdamMini(named, plan=model if not dims else None, lr=1e-2, betas=(0.9, 0.95),
                             weight_decay=0.1, nonfinite="apply", native=False, **dims)
    layouts = reference.plan.layouts()
    [(_, _, part)], offsets, _ = simulated_ranks(named, [], layouts, PIECE_ELEMENTS)
    assert part.self_contained
    flat = torch.cat([p.detach().reshape(-1) for _, p in named] + [torch.zeros(3)])
    member = Member(part.name, flat, None, new_flat_slots(flat, (part.v_numel,), None), part)
    given = []
    backend = FlatBackend(lambda members, scalars: (given.extend(k.row_sums for k in members),
                                                    native.step_(members, scalars)),
                          lambda members: pytest.fail("no statistics pass"))
    hyper = read_hyperparameters(reference.param_groups[0], "")
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in named}
        for n, p in named:
            p.grad = grads[n].clone()
        reference.step()
        member = member._replace(grad=torch.cat([grads[n].reshape(-1) for n, _ in named]
                                                + [torch.zeros(3)]))
        backend.apply(backend.prepare([member], layouts, hyper), hyper, None, [])
        member.state["step"] += 1
    assert given and all(sums is None for sums in given)
    for name, p in named:
        value = flat[offsets[name]:offsets[name] + p.numel()].view(p.shape)
        assert ((value - p.detach()).abs().max() / p.detach().abs().max()).item() < 1e-6, name

