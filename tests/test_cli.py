"""`adam-mini-tx plan`: the block-plan table of a Hugging Face family or a model factory."""
import pytest

from adam_mini_tx.cli import main


def tiny_factory():
    from test_oracles import TinyLlama
    return TinyLlama()


def test_plan_for_a_hugging_face_family_on_meta(capsys):
    pytest.importorskip("transformers")
    assert main(["plan", "--hf", "llama", "--hidden-size", "64", "--heads", "4", "--kv-heads", "2",
                 "--layers", "1", "--intermediate-size", "96", "--vocab-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.k_proj.weight" in out and "[h=2]" in out
    assert "vs AdamW" in out


def test_plan_for_a_factory(capsys):
    assert main(["plan", "--factory", "test_cli:tiny_factory", "--heads", "4", "--kv-heads", "2"]) == 0
    assert "layers.1.mlp.down_proj.weight" in capsys.readouterr().out


def test_plan_rejects_unknown_family():
    with pytest.raises(SystemExit):
        main(["plan", "--hf", "not-a-model-family"])
