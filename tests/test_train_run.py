"""`studio train` end to end on the embedded mini base: outputs, exact resume, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import one_error_line
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:6]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def _args(data, out, cache, *extra):
    return [str(data), "--out", str(out), "--steps", "4", "--batch-size", "2", "--sample-every", "0",
            "--save-every", "2", "--set", f"cache_dir={cache}", "--set", "sample_steps=4", *extra]


def test_train_writes_adapter_config_samples_checkpoints_logs(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_args(data, out, tmp_path / "cache"), "--method", "svf", "--trigger", "zxq",
                 "--save-adapter-every", "2"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"stripes.safetensors", "stripes.kohya.safetensors", "config.toml", "samples", "checkpoints",
            "logs", "stripes-step0000002.safetensors"} <= names
    assert not any("step0000004" in n for n in names)  # the last step is the final adapter itself
    assert "method = \"svf\"" in (out / "config.toml").read_text()
    assert (out / "samples" / "step-0000004.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    from studio import formats
    af = formats.read(out / "stripes.safetensors")
    assert af.method == "svf" and "unet" in af.parts
    z = [v for k, v in af.parts["unet"].tensors.items() if k.endswith(".z")]
    assert len(z) > 0 and any((t - 1).abs().max() > 0 for t in z)  # it trained
    early = formats.read(out / "stripes-step0000002.safetensors").parts["unet"].tensors
    assert early.keys() == af.parts["unet"].tensors.keys()
    assert any(not torch.equal(early[k], v) for k, v in af.parts["unet"].tensors.items())  # 2 more steps moved it
    from PIL import Image
    assert "zxq" in Image.open(out / "samples" / "step-0000004.png").text["parameters"]


def _cli(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "studio", "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_bit_identical(data, tmp_path):
    cache = tmp_path / "cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--steps", "10", "--method", "lora", "--rank", "4"]
    proc = _cli(*_args(data, straight, cache), *common)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    proc = _cli(*_args(data, killed, cache), *common)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "stripes.safetensors").exists()
    proc = _cli("--resume", str(killed))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    a, b = load_file(str(straight / "stripes.safetensors")), load_file(str(killed / "stripes.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_error = one_error_line


def test_bad_input_gives_one_error_line(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert "does not exist" in _error(capsys, ["train", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images in" in _error(capsys, ["train", str(empty)])
    assert "--rank must be positive" in _error(capsys, ["train", str(data), "--rank", "0"])
    assert "unknown adapter method 'nope'" in _error(capsys, ["train", str(data), "--set", "method=nope"])
    assert "unknown config key 'rnak'" in _error(capsys, ["train", str(data), "--set", "rnak=3"])
    assert "base" in _error(capsys, ["train", *_args(data, tmp_path / "o1", cache), "--base", str(tmp_path / "nobase")])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):  # root can write anywhere
        assert "not writable" in _error(capsys, ["train", *_args(data, locked / "out", cache)])
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "zero.png").write_bytes(b"")
    assert "zero.png is an empty file" in _error(capsys, ["train", *_args(bad, tmp_path / "o2", cache)])
    (bad / "zero.png").write_text("text, not pixels")
    assert "zero.png is not an image" in _error(capsys, ["train", *_args(bad, tmp_path / "o3", cache)])
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # nothing written


def test_resume_with_another_method_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_args(data, out, tmp_path / "cache"), "--steps", "2"]) == 0
    before = (out / "stripes.safetensors").read_bytes()
    message = _error(capsys, ["train", "--resume", str(out), "--method", "svf"])
    assert "method = 'lora'" in message and "svf" in message
    assert (out / "stripes.safetensors").read_bytes() == before
    message = _error(capsys, ["train", *_args(data, out, tmp_path / "cache")])
    assert "already holds a run" in message and "--resume" in message


def test_two_processes_match_one_process_with_twice_the_batch(data, tmp_path):
    """`accelerate launch --multi_gpu` (gloo on CPU): 2 processes x batch 1 == 1 process x batch 2."""
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # SVF: every gain has a real gradient from step 1 (LoRA's A starts with an exactly-zero one,
    # which AdamW's normalisation turns into fp noise-sized steps that differ between runs)
    common = ["--steps", "3", "--sample-every", "0", "--save-every", "3", "--set", f"cache_dir={cache}",
              "--set", "sample_steps=2", "--method", "svf"]
    one = subprocess.run([sys.executable, "-m", "studio", "train", str(data), "--out", str(tmp_path / "one"),
                          "--batch-size", "2", *common], env=env, cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "studio", "train", str(data), "--out", str(tmp_path / "two"), "--batch-size", "1",
                          *common], env=env, cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "stripes.safetensors")), load_file(str(tmp_path / "two" / "stripes.safetensors"))
    assert a.keys() == b.keys()
    zs = [k for k in a if k.endswith(".z")]
    change = max((a[k] - 1).abs().max().item() for k in zs)
    difference = max((a[k] - b[k]).abs().max().item() for k in zs)
    assert change > 1e-3 and difference < 1e-3 * change, (change, difference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    message = _error(capsys, ["train", *_args(data, out, tmp_path / "cache"), "--steps", "6", "--save-every", "1",
                              "--unet-lr", "1e30", "--set", "max_grad_norm=0"])
    assert "the loss became" in message and "last good checkpoint is" in message and "--unet-lr" in message
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and not (out / "stripes.safetensors").exists()
    from safetensors.torch import load_file as load
    tensors = load(str(out / "checkpoints" / kept[-1] / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_check_lints_without_training(data, tmp_path, capsys):
    (data / "stripes_00.txt").write_text(" ".join(["a red circle on a blue background"] * 5))
    (data / "stripes_01.txt").unlink()
    assert main(["train", str(data), "--check", "--out", str(tmp_path / "never")]) == 1
    out = capsys.readouterr().out
    assert "6 images, 5 captions" in out and "longer than the text encoder's limit" in out
    assert "images without a .txt caption" in out and "2 problem(s)" in out
    assert not (tmp_path / "never").exists()
