"""`adam-mini-tx plan`: the block-plan table of a Hugging Face family or a model factory; bad
arguments of `plan` and `demo` exit with status 2 and one line."""
import os
import subprocess
import sys

import pytest
import torch

import adam_mini_tx
from adam_mini_tx.cli import main

REPO = os.path.dirname(os.path.dirname(adam_mini_tx.__file__))


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


# ----- bad arguments: one line, exit status 2, before any work ------------------------------------
BAD_ARGUMENTS = {
    "heads zero": (["plan", "--hf", "llama", "--heads", "0"], "argument --heads: must be a positive"),
    "heads not dividing the width": (["plan", "--hf", "llama", "--heads", "3"],
                                     "not a multiple of the number of attention heads (3)"),
    "kv heads not dividing heads": (["plan", "--hf", "llama", "--heads", "8", "--kv-heads", "3"],
                                    "argument --kv-heads: 3 KV heads do not divide"),
    "heads not dividing gpt2's width": (["plan", "--hf", "gpt2", "--heads", "5"],
                                        "argument --heads: 5 heads do not divide the hidden size"),
    "unknown family": (["plan", "--hf", "not-a-model-family"], "unknown model type"),
    "factory module missing": (["plan", "--factory", "nosuchmod:f"],
                               "cannot import module 'nosuchmod'"),
    "factory function missing": (["plan", "--factory", "torch.nn:NoSuch"],
                                 "module 'torch.nn' has no function 'NoSuch'"),
    "factory needs arguments": (["plan", "--factory", "torch.nn:Linear"],
                                "takes no arguments and returns an nn.Module"),
    "factory without a colon": (["plan", "--factory", "torch.nn"], "use MODULE:FUNCTION"),
    "factory heads wrong for the model": (["plan", "--factory", "test_cli:tiny_factory",
                                           "--heads", "3"], "n_heads=3 does not divide"),
    "demo batch zero": (["demo", "--batch", "0"], "argument --batch: must be a positive integer"),
    "demo seq zero": (["demo", "--seq", "0"], "argument --seq: must be a positive integer"),
    "demo steps negative": (["demo", "--steps", "-1"], "argument --steps"),
    "demo lr zero": (["demo", "--lr", "0"], "argument --lr: must be a positive number"),
    "demo unknown optimizer": (["demo", "--optimizers", "sgd"], "argument --optimizers: unknown"),
    "demo device not a device": (["demo", "--device", "toaster"], "argument --device"),
}


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    if argv[0] == "plan" and "--hf" in argv:
        pytest.importorskip("transformers")
    if argv[0] == "demo":
        argv = [*argv, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"adam-mini-tx {argv[0]}: error: ")
    assert not (tmp_path / "out").exists()  # refused before the demo created anything


def test_demo_on_cuda_without_cuda_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--device", "cuda", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --device: device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_exits_2_before_training(capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "a_file" / "out")])
    assert exit_.value.code == 2
    assert "argument --out: output directory" in capsys.readouterr().err


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real process: status 2, one error line, no traceback."""
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO, os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "adam_mini_tx", "plan", "--hf", "llama",
                           "--heads", "3"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("adam-mini-tx plan: error: --hf llama")
