"""make-base end to end (--quick), and the shipped mini base in sample_data/mini-sd."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sample_data" / "mini-sd"


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder))


def _render(pipe, prompt="a red circle on a blue background", steps=2):
    import torch

    out = pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    return image


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "mini"
    assert main(["make-base", str(out), "--quick"]) == 0
    return out


def test_quick_make_base_loads_and_renders(quick_base):
    assert (quick_base / "model_index.json").exists()
    index = json.loads((quick_base / "model_index.json").read_text())
    assert "safety_checker" not in index and "feature_extractor" not in index
    pipe = _load(quick_base)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    _render(pipe)
    assert not [p for p in quick_base.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_make_base_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["make-base", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_resume_needs_a_pipeline_and_continues_one(quick_base, tmp_path, capsys):
    assert main(["make-base", str(tmp_path / "nothing"), "--resume", "--quick"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    before = json.loads((quick_base / "training.json").read_text())["diffusion"]["steps"]
    assert main(["make-base", str(quick_base), "--resume", "--quick"]) == 0
    log = json.loads((quick_base / "training.json").read_text())["diffusion"]
    assert log["steps"] == before + 4 and log["sittings"] == 2


def test_shipped_mini_base_loads_offline_and_renders():
    if not (SHIPPED / "model_index.json").exists():
        pytest.fail(f"{SHIPPED} is missing: run `studio make-base {SHIPPED}`")
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert (SHIPPED / "README.md").exists()
    _render(_load(SHIPPED))


def test_exact_resume_uses_the_saved_optimizer_state(tmp_path):
    from trainers.mini_base import MiniBaseConfig, make_base

    out = tmp_path / "base"
    messages = []
    make_base(MiniBaseConfig(out=str(out), vae_steps=2, steps=3, batch=2, vae_wild=0.5),
              say=messages.append)
    state = tmp_path / "base-train-state" / "state.pt"
    assert state.exists()
    make_base(MiniBaseConfig(out=str(out), resume=True, steps=2, batch=2), say=messages.append)
    assert any("resumed optimizer state" in m for m in messages)
    log = json.loads((out / "training.json").read_text())["diffusion"]
    assert log["steps"] == 5


def test_interrupted_run_leaves_no_model_under_the_target_name(tmp_path):
    from trainers.mini_base import MiniBaseConfig, make_base

    def interrupt(message):
        if message.startswith("step "):
            raise KeyboardInterrupt

    out = tmp_path / "base"
    with pytest.raises(KeyboardInterrupt):
        make_base(MiniBaseConfig(out=str(out), quick=True), say=interrupt)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_shipped_mini_base_follows_prompts():
    from studio.shapes.evaluate import render_prompts, score

    pipe = _load(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background", "a yellow star on a black background",
               "a white square on a green background", "a blue triangle on a yellow background",
               "a black circle on a white background", "a green star on a red background"]
    s = score(render_prompts(pipe, prompts, seed=0, steps=12), prompts)
    assert s["both_colours"] >= 0.5 and s["shape"] >= 0.5, s


def test_resume_grows_an_older_unet_layout_without_changing_its_output(quick_base, tmp_path):
    """The first shipped base had no 16x16 attention; --resume adds it as identity, then trains it."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from trainers.mini_base import MiniBaseConfig, make_base
    from trainers.mini_base_models import grow_unet

    current = UNet2DConditionModel.from_pretrained(str(quick_base / "unet"))
    assert current.config.down_block_types[0] == "CrossAttnDownBlock2D" and grow_unet(current) is None
    old_layout = {k: v for k, v in current.config.items() if not k.startswith("_")}
    old_layout.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=8)
    torch.manual_seed(0)
    old = UNet2DConditionModel.from_config(old_layout)
    grown = grow_unet(old)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 24, 64)
    with torch.no_grad():
        assert torch.equal(old(x, t, encoder_hidden_states=text).sample, grown(x, t, encoder_hidden_states=text).sample)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in old.parameters())

    out = tmp_path / "old"
    shutil.copytree(quick_base, out)
    shutil.rmtree(out / "unet")
    old.save_pretrained(str(out / "unet"))
    messages = []
    make_base(MiniBaseConfig(out=str(out), resume=True, steps=2, batch=4, wild=0.5), say=messages.append)
    assert any(m.startswith("grew the UNet") for m in messages)
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert grow_unet(unet) is None  # saved in the current layout
    assert unet.down_blocks[0].attentions[0].proj_out.weight.abs().sum() > 0  # and trained
    assert json.loads((out / "training.json").read_text())["grown"][0]["at_step"] > 0
