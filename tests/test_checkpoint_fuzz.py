"""Fuzz AdamMini.load_state_dict and checkpoint.load with truncated, mismatched and hand-edited
checkpoints: always a clear ValueError, never a crash or a silent misload, and nothing changes."""
import copy
import io
import os
import random
import struct
import zipfile

import pytest
import torch
from torch.utils._pytree import tree_flatten

import adam_mini_tx as amx
from adam_mini_tx.checkpoint import load, save_atomic
from test_oracles import TinyLlama

HEADS = dict(n_heads=4, n_kv_heads=2)
FLIP_TRIALS = int(os.environ.get("AMX_FLIP_TRIALS", "200"))  # more: AMX_FLIP_TRIALS=3000 pytest


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
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return state, copy.deepcopy(hyperparameters(opt))


def hyperparameters(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def unchanged(opt, before):
    state, groups = before
    return hyperparameters(opt) == groups and all(
        torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


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
    edit("state is a list", lambda d: d.update(state=list(d["state"].values())))
    edit("group is not a dict", lambda d: d.update(param_groups=[1]))
    edit("group params not a list", lambda d: d["param_groups"][0].update(params=5))
    edit("group names not a list", lambda d: d["param_groups"][0].update(param_names=3))
    edit("group lr negative", lambda d: d["param_groups"][0].update(lr=-1.0))
    edit("group lr NaN", lambda d: d["param_groups"][0].update(lr=float("nan")))
    edit("group lr a string", lambda d: d["param_groups"][0].update(lr="1e-3"))
    edit("group betas out of range", lambda d: d["param_groups"][0].update(betas=(0.9, 1.5)))
    edit("group eps missing", lambda d: d["param_groups"][0].pop("eps"))
    edit("group decay_mask unknown", lambda d: d["param_groups"][0].update(decay_mask="most"))
    edit("skip count negative", lambda d: d["param_groups"][0].update(nonfinite_skipped=-2))
    edit("step negative", lambda d: d["state"][first].update(step=torch.tensor(-3)))
    edit("step a float", lambda d: d["state"][first].update(step=torch.tensor(2.5)))
    edit("v negative", lambda d: d["state"][first]["v"].fill_(-1.0))
    edit("m integer", lambda d: d["state"][first].update(m=d["state"][first]["m"].long()))
    edit("v complex", lambda d: d["state"][first].update(
        v=d["state"][first]["v"].to(torch.complex64)))
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
        with pytest.raises(ValueError, match="truncated"):
            load(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.pt")


def test_random_byte_flips_never_misload(tmp_path):
    """Flipped bytes anywhere in the file (tensor data, pickle, zip headers) either make load()
    raise a ValueError or leave the content intact (padding bytes): never different numbers.
    torch.load alone misses flips in tensor data (it does not check the zip CRCs)."""
    model, opt = trained()
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    data = buffer.getvalue()
    expected, expected_spec = tree_flatten(saved)
    rng = random.Random(1)
    refused = 0
    for trial in range(FLIP_TRIALS):
        corrupt = bytearray(data)
        for _ in range(rng.choice([1, 4])):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        (tmp_path / "bad.pt").write_bytes(bytes(corrupt))
        try:
            state = load(tmp_path / "bad.pt")
        except ValueError:
            refused += 1
            continue
        got, spec = tree_flatten(state)
        assert spec == expected_spec, f"trial {trial}: structure changed"
        for a, b in zip(expected, got):
            same = (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(a, torch.Tensor) \
                else (type(a) is type(b) and a == b)
            assert same, f"trial {trial}: a corrupted checkpoint loaded different values"
    assert refused > FLIP_TRIALS // 2  # most flips hit data, so most must be refused


def test_a_flipped_tensor_byte_is_refused(tmp_path):
    """One flipped byte inside a tensor record: torch.load would return wrong numbers."""
    model, opt = trained()
    path = tmp_path / "ckpt.pt"
    save_atomic(opt.state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename
                      and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    name_and_extra = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + sum(name_and_extra) + 17] ^= 0x40
    path.write_bytes(bytes(data))
    assert isinstance(torch.load(path, weights_only=True), dict)  # torch alone does not notice
    with pytest.raises(ValueError, match=r"corrupt: record .*data/.* CRC-32"):
        load(path)
