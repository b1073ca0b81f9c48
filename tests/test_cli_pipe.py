"""`studio ... | head`: a reader that goes away ends the command quietly (no traceback, no
"Exception ignored" note), as Python's documentation recommends for SIGPIPE / EPIPE."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "a.safetensors"
    tensors = {f"{LORA}.lora_down.weight": torch.randn(2, 8), f"{LORA}.lora_up.weight": torch.randn(8, 2),
               f"{LORA}.alpha": torch.tensor(2.0)}
    # enough metadata that `inspect` prints far more than a pipe buffer holds (64 KiB)
    save_file(tensors, str(path), metadata={f"ss_note_{i}": "x" * 150 for i in range(600)})
    return path


def _run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-m", "studio", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=300)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("argv,code", [(["inspect", "{file}"], 1), (["inspect", "{file}", "--json"], 1),
                                       (["--help"], 0)],  # argparse itself ignores write errors of help
                         ids=["inspect", "inspect-json", "help"])
def test_a_closed_pipe_ends_quietly(adapter, argv, code):
    done = _run_into_closed_pipe(*[a.format(file=adapter) for a in argv])
    assert done.stderr == "", done.stderr
    assert done.returncode == code


def test_an_open_pipe_still_gets_everything(adapter):
    done = subprocess.run([sys.executable, "-m", "studio", "inspect", str(adapter)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0 and done.stderr == ""
    assert "format:    kohya" in done.stdout and "ss_note_599" in done.stdout and len(done.stdout) > 65536


def test_main_in_process_returns_1_on_a_broken_pipe(monkeypatch, adapter):
    """Without a real file descriptor (stdout replaced), main still returns quietly."""
    from studio import cli

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise OSError("no descriptor")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli.main(["inspect", str(adapter)]) == 1
