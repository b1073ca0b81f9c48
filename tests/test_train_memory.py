"""Training memory: checkpointing gives the same gradients, a half base halves the frozen bytes
and keeps the adapters fp32, and the --check estimate matches the measured peak on the mini base."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import studio.adapters as A
from builders import tiny_clip, tiny_llama, tiny_unet
from cli_helpers import one_error_line
from studio.cli import main
from trainers import memory, memory_report

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


def _seeded(build):
    torch.manual_seed(0)
    return build()


def _adapted(model, targets, seed=0):
    """``model`` with a rank-4 LoRA whose B is random too, so every factor gets a gradient."""
    torch.manual_seed(seed)
    A.attach(model, "a", "lora", A.registry.make_config("lora", {"rank": 4}), targets)
    with torch.no_grad():
        for p in A.trainable_parameters(model, "a"):
            p.normal_(0, 0.1)
    return model.train()


def _grads(model, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    saved = memory._Saved()
    with memory._counting(saved):
        loss = loss_of(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return grads, saved.total


def _same_gradients(make, loss_of):
    """``make()`` builds the same adapted model each time (seeded)."""
    plain, plain_saved = _grads(make(), loss_of)
    checkpointed = make()
    memory.enable_checkpointing(checkpointed)
    again, kept = _grads(checkpointed, loss_of)
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
    assert kept < plain_saved / 2, (kept, plain_saved)  # it did checkpoint: far less kept for backward


def test_checkpointing_same_adapter_gradients_unet():
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)
    _same_gradients(lambda: _adapted(_seeded(tiny_unet), "unet-transformer"), lambda m: m(x, t, encoder_hidden_states=ctx).sample.square().mean())


def test_checkpointing_same_adapter_gradients_clip_and_lm():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    _same_gradients(lambda: _adapted(_seeded(tiny_clip), "te-attn"), lambda m: m(ids).last_hidden_state.square().mean())
    _same_gradients(lambda: _adapted(_seeded(tiny_llama), ["lm-attn", "lm-mlp"]),
                    lambda m: torch.nn.functional.cross_entropy(m(input_ids=ids).logits[:, :-1].reshape(-1, 100),
                                                                ids[:, 1:].reshape(-1)))


def test_half_base_halves_frozen_bytes_and_adapters_stay_fp32():
    unet = _adapted(tiny_unet(), "unet-attn")
    before = memory.parameter_bytes(unet)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 7, 32, generator=g)
    want = unet(x, t, encoder_hidden_states=ctx).sample
    memory.cast_frozen(unet, torch.bfloat16)
    after = memory.parameter_bytes(unet)
    assert after["frozen"] * 2 == before["frozen"] and after["adapters"] == before["adapters"]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in A.trainable_parameters(unet, "a"))
    got = unet(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not a wrong delta
    got.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in A.trainable_parameters(unet, "a"))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def test_bf16_base_run_trains_and_saves_fp32(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2", "--sample-every", "0",
                 "--base-dtype", "bf16", "--gradient-checkpointing", "--set", f"cache_dir={tmp_path / 'cache'}",
                 "--set", "sample_steps=2"]) == 0  # a NaN loss would have stopped the run (loop.guard_finite)
    with safe_open(str(out / "stripes.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(k.endswith(".B") and t.abs().max() > 0 for k, t in tensors.items())  # it trained


def test_check_estimate_matches_measured_peak_on_the_mini_base(data, tmp_path):
    """`studio train --check` in a fresh process against the peak RSS of the same run (4 steps)."""
    args = [str(data), "--out", str(tmp_path / "run"), "--steps", "4", "--sample-every", "0",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2"]
    check = subprocess.run([sys.executable, "-m", "studio.cli", "train", *args, "--check"], capture_output=True,
                           text=True, cwd=ROOT, check=True).stdout
    total = re.search(r"total\s+([0-9.]+) (GB|MB)", check)
    estimate = float(total.group(1)) * (1024 if total.group(2) == "GB" else 1)
    run = subprocess.run([sys.executable, "-c", "import sys; from studio.cli import main; from trainers import memory; "
                          "assert main(['train', *sys.argv[1:]]) == 0; print(memory.peak_rss() / 1024 ** 2)", *args],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    measured = float(run.strip().splitlines()[-1])
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured, check)


def test_vram_budget_nothing_fits_and_bad_size(data, tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(data), "--check", "--vram-budget", "10MB"])
    assert "no memory setting fits --vram-budget 10 MB" in line and "smallest estimate is" in line
    assert "not a memory size" in one_error_line(capsys, ["train", str(data), "--check", "--vram-budget", "lots"])
    assert "--base-dtype 'fp8'" in one_error_line(capsys, ["train", str(data), "--base-dtype", "fp8"])
    assert not (tmp_path / "run").exists()


def test_vram_budget_says_what_to_turn_on():
    from trainers.diffusion_config import DiffusionTrainConfig

    cfg = DiffusionTrainConfig(data=str(STYLE), batch_size=4)
    e = memory.Estimate({"unet": 4 * memory.GB}, "fp32", 10 ** 6, 0,
                        {"unet": memory.Activations(memory.GB, memory.GB // 10, memory.GB // 10)}, 4, memory.GB // 2,
                        "assumed", 512)
    # 0.5 runtime + 4 weights + 16 MB adapters + 4 x 1 activations = 8.5 GB; checkpointed (0.1 + 0.1 per
    # image): 0.5 + 4 + 0.016 + 0.8 = 5.31; + bf16 (weights and activations halve): 0.5 + 2.4 + 0.016 = 2.91
    assert e.total(False) == pytest.approx(8.5 * memory.GB, rel=0.01)
    assert "fits" in memory_report.advise(e, cfg, 9 * memory.GB)
    assert memory_report.advise(e, cfg, 6 * memory.GB).endswith("turn on: --gradient-checkpointing (5.31 GB)")
    assert "--gradient-checkpointing --base-dtype bf16 (2.91 GB)" in memory_report.advise(e, cfg, 3 * memory.GB)
