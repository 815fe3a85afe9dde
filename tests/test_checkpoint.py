"""checkpoint.load names the real cause (objects weights_only refuses, legacy format), and the
atomic writes keep the file mode torch.save gives."""
import argparse
import os

import pytest
import torch

from adam_mini_tx.checkpoint import load, save_atomic, write_atomic


def test_a_namespace_is_reported_as_such_with_the_way_to_load_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"args": argparse.Namespace(lr=0.1), "w": torch.ones(3)}, path)
    with pytest.raises(ValueError, match=r"intact but holds argparse\.Namespace") as error:
        load(path)
    assert "weights_only=False" in str(error.value)
    assert "add_safe_globals([argparse.Namespace])" in str(error.value)
    assert "truncated" not in str(error.value)
    loaded = load(path, weights_only=False)
    assert loaded["args"].lr == 0.1 and torch.equal(loaded["w"], torch.ones(3))


def test_legacy_files_are_refused_even_when_intact(tmp_path):
    """The legacy format has no checksums: a flipped byte in a tensor would load silently, so
    load() refuses the format and says how to convert."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(64.0)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x40  # inside the tensor bytes
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / "flipped.pt")["w"], torch.arange(64.0))
    for name in ("legacy.pt", "flipped.pt"):
        with pytest.raises(ValueError, match="legacy \\(non-zip\\) format.*torch.save\\(torch.load"):
            load(tmp_path / name)


def test_empty_and_foreign_files_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("empty.pt", "text.pt"):
        with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
            load(tmp_path / name)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_torch_save_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
        save_atomic({"w": torch.ones(2)}, tmp_path / "atomic.pt")
        write_atomic(tmp_path / "results.json", lambda handle: handle.write(b"{}"))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for name in ("plain.pt", "atomic.pt", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert sorted(os.listdir(tmp_path)) == ["atomic.pt", "plain.pt", "results.json"]  # no temps
