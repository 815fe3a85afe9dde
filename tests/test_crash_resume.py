"""SIGKILL a training process at a random moment, resume from its last checkpoint, and get exactly
the parameters and optimizer state of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import torch
from torch.utils._pytree import tree_flatten

from adam_mini_tx.checkpoint import load

WORKER = os.path.join(os.path.dirname(__file__), "workers", "crash_train.py")
STEPS = 40
STEP_SECONDS = 0.1  # the worker's pause per step: >= 1 s between the kill point and the end


def run(*args):
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, timeout=300)


def assert_identical(expected, got, what):
    expected_leaves, expected_spec = tree_flatten(expected)
    got_leaves, got_spec = tree_flatten(got)
    assert expected_spec == got_spec, what
    for a, b in zip(expected_leaves, got_leaves):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.dtype == b.dtype, what
        else:
            assert a == b, what


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    seed = random.randrange(2**32)  # a different moment every run; the seed is in any failure
    rng = random.Random(seed)
    kill_after, delay = rng.randint(3, STEPS - 10), rng.uniform(0, STEP_SECONDS)
    where = f"seed {seed}: kill after step {kill_after} + {delay:.3f} s"

    reference = tmp_path / "reference.pt"
    run(reference, STEPS)

    crashed = tmp_path / "crashed.pt"
    proc = subprocess.Popen([sys.executable, WORKER, str(crashed), str(STEPS),
                             "--slow", str(STEP_SECONDS)])
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            # every read sees a whole checkpoint: writes go to a temp file renamed over this one
            if crashed.exists() and load(crashed)["step"] >= kill_after:
                break
            time.sleep(0.01)
        time.sleep(delay)  # the kill may land while the next checkpoint is being written
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, where
    killed_at = load(crashed)["step"]
    assert kill_after <= killed_at < STEPS, f"{where}: the last checkpoint is step {killed_at}"

    run(crashed, STEPS, "--resume")
    expected, resumed = load(reference), load(crashed)
    assert resumed["step"] == expected["step"] == STEPS, where
    assert_identical(expected["model"], resumed["model"], f"{where}: parameters differ")
    assert_identical(expected["opt"], resumed["opt"], f"{where}: optimizer state differs")
    assert_identical(expected["sched"], resumed["sched"], f"{where}: scheduler state differs")
