"""The compiled backend against the eager one, tensor by tensor and step by step, on a model with
many tensors per layout: several buckets of one kind, several rounds, with and without the
non-finite check (the statistics pass hands its row sums to the update pass), a skipped step,
a scheduler and decay on and off. A wrong statistic for one tensor of one bucket at step 2 is
what this is here to catch."""
import copy

import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx.optim.backends import assign
from adam_mini_tx.optim.members import Member
from test_oracles import TinyLlama, gradient_sequence, initial_params

HEADS = dict(n_heads=4, n_kv_heads=2)
STEPS = 6


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("nonfinite", ["skip", "apply"])
def test_compiled_equals_eager_for_every_tensor_at_every_step(nonfinite):
    torch.manual_seed(0)
    eager_model = TinyLlama(layers=5, dim=16, hidden=24, vocab=24)
    compiled_model = copy.deepcopy(eager_model)
    groups = lambda m: [  # noqa: E731
        {"params": [(n, p) for n, p in m.named_parameters() if "mlp" in n], "lr": 2e-2},
        {"params": [(n, p) for n, p in m.named_parameters() if "mlp" not in n],
         "decay_mask": "all"}]
    opts = [amx.AdamMini(groups(m), lr=1e-2, weight_decay=0.1, nonfinite=nonfinite,
                         fused=fused, **HEADS)
            for m, fused in ((eager_model, False), (compiled_model, True))]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in opts]
    rounds = opts[1]._backends[1].prepare(
        [Member(n, p, torch.zeros_like(p), {"step": torch.tensor(0), "m": p, "v": p})
         for n, p in groups(compiled_model)[0]["params"]],
        opts[1].plan.layouts(), amx.optim.hyperparams.read_hyperparameters(
            opts[1].param_groups[0], "")).rounds
    kinds = [signature[:-1] for round_ in rounds for signature in round_.signature]
    assert len(rounds) >= 2 and len(kinds) > len(set(kinds))  # a kind cut into 2+ buckets
    grads_seq = gradient_sequence(initial_params(eager_model), STEPS, seed=3)
    if nonfinite == "skip":
        grads_seq[3]["layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    for t, grads in enumerate(grads_seq):
        for model, opt, scheduler in zip((eager_model, compiled_model), opts, schedulers):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            with pytest.warns(RuntimeWarning) if t == 3 and nonfinite == "skip" else _nothing():
                opt.step()
            scheduler.step()
        for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            assert relative(p, q) < 1e-6, (t, name)
            for key in ("m", "v"):
                assert relative(opts[0].state[p][key], opts[1].state[q][key]) < 1e-6, (t, name,
                                                                                      key)
            assert int(opts[1].state[q]["step"]) == int(opts[0].state[p]["step"])
    assert int(opts[1].state[compiled_model.norm.weight]["step"]) == STEPS - (nonfinite == "skip")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_backends_are_chosen_in_one_place():
    from adam_mini_tx.distributed import flat_partition
    from adam_mini_tx.optim.backends import (Backends, CompiledBackend, EagerBackend,
                                             FlatBackend, KernelBackend)
    model = TinyLlama(layers=1)
    layouts = amx.plan_blocks(list(model.named_parameters()), **HEADS).layouts()
    members = [Member(n, p, p, {"m": p, "v": p}) for n, p in model.named_parameters()]
    eager, compiled, flat = EagerBackend(), CompiledBackend(), FlatBackend()
    native = KernelBackend(lambda members, scalars: None)
    without, with_native = (Backends(eager, compiled, flat, kernel) for kernel in (None, native))
    assert assign(members, False, without, layouts) == [(eager, members)]
    assert assign(members, False, with_native, layouts) == [(native, members)]
    assert assign(members, True, with_native, layouts) == [(compiled, members)]
    partition = Member("flat", torch.zeros(4), torch.zeros(4), {},
                       flat_partition("flat", [], [], None))  # DeepSpeed's flat partition
    assert assign([*members, partition], True, without, layouts) == [
        (flat, [partition]), (compiled, members)]
    widened = frozenset({"norm.weight"})
    for backends, chosen in ((without, compiled), (with_native, native)):
        pairs = assign(members, backends is without, backends, layouts, widened)
        assert pairs[0] == (chosen, [m for m in members if m.name != "norm.weight"])
        assert isinstance(pairs[1][0], EagerBackend) and pairs[1][0] is not eager
        assert [m.name for m in pairs[1][1]] == ["norm.weight"]
