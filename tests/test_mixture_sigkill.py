"""A routed-mixture run killed with SIGKILL and resumed ends on the straight run's file bit for bit (tiny Llama,
MoLA: top-k routing, the Switch balance loss and a layer profile; the in-process crash test is
tests/test_mixture_e2e.py's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from safetensors.torch import load_file

from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, base: Path, out: Path) -> list[str]:
    return ["train", "--task", "lm", str(data), "--base", str(base), "--out", str(out), "--method", "mola",
            "--steps", "20", "--batch-size", "4", "--warmup-steps", "0", "--save-every", "2",
            "--method-args", "profile=inverted", "balance=0.05"]


def test_a_mola_run_killed_with_sigkill_and_resumed_is_bit_identical(tiny_lm, tmp_path):
    """Only the killed run is a subprocess (the kill is the point); the others run here."""
    data = pirate_jsonl(tmp_path, 16)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_args(data, tiny_lm, straight)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "studio", *_args(data, tiny_lm, killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not list(killed.glob("*.safetensors"))                     # killed before its adapter file
    assert main(["train", "--task", "lm", "--resume", str(killed)]) == 0
    (a_file,), (b_file,) = list(straight.glob("*.safetensors")), list(killed.glob("*.safetensors"))
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len({a[k].shape[0] for k in a if k.endswith(".R")}) > 1   # the profile gave blocks different counts
