"""SIGKILL a training process at a random step, resume from its last checkpoint, and get exactly
the parameters of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import torch

from adam_mini_tx.checkpoint import load

WORKER = os.path.join(os.path.dirname(__file__), "workers", "crash_train.py")
STEPS = 40


def run(*args):
    subprocess.run([sys.executable, WORKER, *map(str, args)], check=True, timeout=300)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference.pt"
    run(reference, STEPS)

    crashed = tmp_path / "crashed.pt"
    kill_after = random.Random().randint(3, STEPS - 5)
    proc = subprocess.Popen([sys.executable, WORKER, str(crashed), str(STEPS), "--slow", "0.05"])
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            # every read sees a whole checkpoint: writes go to a temp file renamed over this one
            if crashed.exists() and load(crashed)["step"] >= kill_after:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load(crashed)["step"]
    assert killed_at < STEPS, "the job finished before it was killed"

    run(crashed, STEPS, "--resume")
    expected, resumed = load(reference), load(crashed)
    assert resumed["step"] == expected["step"] == STEPS
    for name, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
