"""The main job: the demo trains both optimizers and writes its results, table and figure."""
import json

import pytest

from adam_mini_tx.cli import main
from adam_mini_tx.demo.data import load_corpus


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


def test_bad_demo_flags_are_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        main(["demo", "--optimizers", "sgd", "--out", str(tmp_path)])
