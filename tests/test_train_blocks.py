"""Block-wise ranks and LRs over kohya's UNet block indices (--block-ranks / --block-lrs)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import studio.adapters as A
from builders import SD15_UNET, SDXL_UNET
from cli_helpers import one_error_line
from studio import formats
from studio.cli import main
from studio.formats.names import diffusers_to_sgm, split_kohya_name
from studio.models import load_diffusion_base
from trainers import blocks

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


def _meta_unet(config):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sd15_block_indices_are_kohyas():
    """kohya get_block_index: down (i, j) -> 1 + 3i + j, downsampler j = 2, MID 12, up -> 13 + 3i + j."""
    cases = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1,
             "down_blocks.0.resnets.1.conv1": 2, "down_blocks.0.downsamplers.0.conv": 3,
             "down_blocks.2.attentions.1.proj_in": 8, "down_blocks.3.resnets.1.conv2": 11,
             "mid_block.attentions.0.transformer_blocks.0.ff.net.2": 12, "mid_block.resnets.1.time_emb_proj": 12,
             "up_blocks.0.resnets.2.conv_shortcut": 15, "up_blocks.0.upsamplers.0.conv": 15,
             "up_blocks.1.attentions.0.proj_out": 16, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": 24}
    assert {p: blocks.block_index(p, "sd15") for p in cases} == cases
    unet = _meta_unet(SD15_UNET)
    found = A.targets.find_targets(unet, "unet-full")
    indices = {blocks.block_index(p, "sd15") for p in found}
    assert None not in indices and indices == set(range(1, 25))  # every block but IN00 (conv_in) has layers
    assert blocks.labels("sd15")[12] == "MID" and len(blocks.labels("sd15")) == 25


def test_sdxl_block_indices_follow_the_sgm_block_numbers():
    """kohya's SDXL index is 1 + input_blocks N, 10 + middle_block N, 13 + output_blocks N: checked
    against the SGM names the kohya writer uses for every transformer-block layer of an SDXL UNet."""
    unet = _meta_unet(SDXL_UNET)
    paths = A.targets.find_targets(unet, "unet-transformer")
    assert len(paths) > 500
    offset = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
    for path in paths:
        kind, number = diffusers_to_sgm(path).split(".")[:2]
        assert blocks.block_index(path, "sdxl") == offset[kind] + int(number), path
    assert blocks.block_index("down_blocks.0.downsamplers.0.conv", "sdxl") == 4  # input_blocks.3
    assert blocks.block_index("mid_block.resnets.1.conv1", "sdxl") == 12
    assert blocks.block_index("up_blocks.0.upsamplers.0.conv", "sdxl") == 15  # output_blocks.2
    assert blocks.count("sdxl") == 23 == len(blocks.labels("sdxl"))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


# the mini base's transformer blocks: IN01, IN04 (down 0, 1), MID, OUT03 / OUT04 and OUT06 / OUT07 (up 1, 2)
RANKS = [4] * 25
RANKS[1], RANKS[4], RANKS[12], RANKS[16], RANKS[20] = 2, 6, 0, 3, 5
LRS = [1.0] * 25
LRS[17] = 0.0  # OUT04 is not trained: no adapter there either


def test_block_ranks_and_lrs_end_to_end(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                 "--rank", "4", "--block-ranks", ",".join(map(str, RANKS)), "--block-lrs", ",".join(map(str, LRS)),
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2"]) == 0
    kohya = out / "stripes.kohya.safetensors"
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
        ranks = {}
        for key in f.keys():
            if key.endswith("lora_down.weight"):
                component, path = split_kohya_name(key.split(".")[0])
                ranks[path] = f.get_tensor(key).shape[0]
    want = [0 if LRS[i] == 0 else r for i, r in enumerate(RANKS)]
    by_block = {}
    for path, rank in ranks.items():
        by_block.setdefault(blocks.block_index(path, "sd15"), set()).add(rank)
    assert by_block == {i: {want[i]} for i in by_block} and set(by_block) == {1, 4, 16, 19, 20}
    assert json.loads(meta["ss_network_args"])["block_dims"] == ",".join(map(str, want))
    assert json.loads(meta["ss_network_args"])["up_lr_weight"].split(",")[4] == "0"
    assert meta["ss_network_dim"] == "Dynamic"
    # the kohya file reads back and applies the same deltas as the exact native file
    base = load_diffusion_base(None)
    native, read = formats.read(out / "stripes.safetensors"), formats.read(kohya)
    assert native.parts["unet"].config["module_ranks"]
    formats.attach_file(native, base.components, "native")
    formats.attach_file(read, base.components, "kohya")
    unet = base.components["unet"]
    for path, layer in A.targets.layers_of(unet, "native").items():
        want_dw, got_dw = layer.delta_weight("native"), layer.delta_weight("kohya")
        assert got_dw.abs().max() > 0
        torch.testing.assert_close(got_dw, want_dw, rtol=2e-3, atol=1e-6 + 2e-3 * float(want_dw.abs().max()))


def test_block_lrs_make_optimizer_groups():
    base = load_diffusion_base(None)
    unet = base.pipe.unet
    A.attach(unet, "a", "lora", A.registry.make_config("lora", {"rank": 2}), "unet-attn")
    lrs = [1.0] * 25
    lrs[4] = 0.5
    groups = blocks.lr_groups(unet, "a", "sd-custom", 1e-3, lrs)
    assert sorted(lr for _, lr in groups) == [5e-4, 1e-3]
    assert sum(len(p) for p, _ in groups) == len(A.trainable_parameters(unet, "a"))
    half = next(p for p, lr in groups if lr == 5e-4)
    layers = A.targets.layers_of(unet, "a")
    in04 = [q for path, layer in layers.items() if blocks.block_index(path, "sd15") == 4
            for q in layer.adapters["a"].parameters()]
    assert {id(q) for q in half} == {id(q) for q in in04} and in04


def test_wrong_block_count_is_one_error_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error_line(capsys, ["train", str(data), "--out", str(out), "--block-ranks", "4,4,4"])
    assert "--block-ranks has 3 values but this base's UNet has 25 kohya blocks" in line
    line = one_error_line(capsys, ["train", str(data), "--out", str(out), "--block-lrs", ",".join(["1"] * 23)])
    assert "has 23 values" in line and "25" in line
    assert "not a comma-separated list" in one_error_line(capsys, ["train", str(data), "--block-ranks", "a,b"])
    assert "has no" in one_error_line(capsys, ["train", str(data), "--method", "svf",
                                              "--block-ranks", ",".join(["4"] * 25)])
    assert not out.exists()
