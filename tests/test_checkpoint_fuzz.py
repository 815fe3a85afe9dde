"""Fuzz AdamMini.load_state_dict and checkpoint.load with truncated, mismatched and hand-edited
checkpoints: always a clear ValueError, never a crash or a silent misload, and nothing changes."""
import copy
import io
import random

import pytest
import torch

import adam_mini_tx as amx
from adam_mini_tx.checkpoint import load, save_atomic
from test_oracles import TinyLlama

HEADS = dict(n_heads=4, n_kv_heads=2)


def trained():
    torch.manual_seed(0)
    model = TinyLlama()
    opt = amx.AdamMini(model.named_parameters(), lr=1e-2, **HEADS)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


def snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def unchanged(opt, before):
    return all(torch.equal(v, before[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


def edits(sd):
    """(description, edited copy) pairs: each a different way a checkpoint can be wrong."""
    first = next(iter(sd["state"]))
    out = []

    def edit(desc, fn):
        copy_ = copy.deepcopy(sd)
        fn(copy_)
        out.append((desc, copy_))

    edit("no state", lambda d: d.pop("state"))
    edit("no param_groups", lambda d: d.pop("param_groups"))
    edit("plan entry removed", lambda d: d["plan"].pop(next(iter(d["plan"]))))
    edit("plan runs edited", lambda d: d["plan"]["norm.weight"].update(runs=[[32, 1]]))
    edit("plan is a list", lambda d: d.update(plan=[1, 2]))
    edit("m wrong shape", lambda d: d["state"][first].update(m=torch.zeros(3)))
    edit("v wrong shape", lambda d: d["state"][first].update(v=torch.zeros(7)))
    edit("step not a tensor", lambda d: d["state"][first].update(step="five"))
    edit("state key missing", lambda d: d["state"][first].pop("v"))
    edit("extra state key", lambda d: d["state"][first].update(exp_avg_sq=torch.zeros(1)))
    edit("state not a dict", lambda d: d["state"].update({first: 3}))
    edit("group dropped", lambda d: d.update(param_groups=[]))
    edit("group params shortened", lambda d: d["param_groups"][0].update(
        params=d["param_groups"][0]["params"][:-1]))
    edit("group names edited", lambda d: d["param_groups"][0].update(
        param_names=["x"] * len(d["param_groups"][0]["param_names"])))
    edit("m made non-finite", lambda d: d["state"][first]["m"].fill_(float("nan")))
    edit("unknown state index", lambda d: d["state"].update({999: d["state"][first]}))
    return out


def test_every_hand_edit_is_refused_without_changes():
    model, opt = trained()
    saved = opt.state_dict()
    before = snapshot(opt)
    refused = []
    for desc, bad in edits(saved):
        try:
            opt.load_state_dict(bad)
        except ValueError:
            refused.append(desc)
        assert unchanged(opt, before), f"{desc}: state changed"
    assert refused == [desc for desc, _ in edits(saved)], set(d for d, _ in edits(saved)) - set(refused)


def test_a_state_dict_without_plan_loads_when_names_match():
    """torch.distributed.checkpoint hands back torch's plain format (no "plan"): the names and
    shapes are still checked, and a consistent dict loads."""
    model, opt = trained()
    saved = opt.state_dict()
    saved.pop("plan")
    _, fresh = trained()
    fresh.load_state_dict(saved)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_truncations_of_a_checkpoint_file(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.pt"
    save_atomic(opt.state_dict(), path)
    data = path.read_bytes()
    rng = random.Random(0)
    for cut in sorted(rng.sample(range(1, len(data)), 25)):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
            load(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.pt")


def test_random_byte_flips_never_misload(tmp_path):
    """Corrupted bytes either fail to load or load a state that the optimizer accepts or
    refuses cleanly; there is no other outcome."""
    model, opt = trained()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    data = bytearray(buffer.getvalue())
    rng = random.Random(1)
    for trial in range(30):
        corrupt = bytearray(data)
        for _ in range(4):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        (tmp_path / "bad.pt").write_bytes(bytes(corrupt))
        try:
            state = load(tmp_path / "bad.pt")
        except ValueError:
            continue
        _, fresh = trained()
        try:
            fresh.load_state_dict(state)
        except ValueError:
            continue
