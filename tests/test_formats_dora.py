"""DoRA files in LyCORIS's layout: ``lora_down`` / ``lora_up`` / ``alpha`` / ``dora_scale`` per module.

``dora_scale`` is m, the magnitude: (out, 1) (conv (out, 1, 1, 1)) holds one norm per *output*
channel, LyCORIS's ``wd_on_out=True`` (its default since December 2024, and PEFT's axis); (1, in)
(conv (1, in, 1, 1)) is the older per-input-channel layout. The adapted weight is

    W' = m * (W0 + s up @ down) / ||W0 + s up @ down||  (norm over the other axis),  s = alpha / r

and a weight w gives W0 + w (W' - W0) (ComfyUI's strength; at w = 1 what LyCORIS applies).
"""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from formats_helpers import tiny_sd, unet_sample

PRESET = Path(__file__).parent / "data" / "lycoris_preset.toml"
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"   # Linear 32 -> 32
CONV1 = "down_blocks.0.resnets.0.conv1"                             # 3x3, 32 -> 32


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


_run = unet_sample


def _hand_file(tmp_path, module, W0, axis="out", scale=None, rank=4, alpha=2.0):
    """A one-module DoRA file written from the documented layout, and the W' it means."""
    g = torch.Generator().manual_seed(5)
    out, cols = W0.shape[0], W0[0].numel()
    conv = W0.dim() == 4
    down = torch.randn(rank, *W0.shape[1:], generator=g) * 0.3          # (r, in[, kh, kw])
    up = torch.randn(out, rank, *([1, 1] if conv else []), generator=g) * 0.3
    V = W0.flatten(1) + (alpha / rank) * up.flatten(1) @ down.flatten(1)
    if axis == "out":
        m = V.norm(dim=1) * (1 + 0.2 * torch.rand(out, generator=g))
        want = m[:, None] * V / V.norm(dim=1, keepdim=True)
        stored = m[:, None]
    else:
        in_c = W0.shape[1]
        Vc = V.view(out, in_c, -1)
        m = Vc.norm(dim=(0, 2)) * (1 + 0.2 * torch.rand(in_c, generator=g))
        want = (Vc * (m / Vc.norm(dim=(0, 2)))[None, :, None]).flatten(1)
        stored = m[None, :]
    if conv:
        stored = stored[:, :, None, None]
    name = "lora_unet_" + module.replace(".", "_")
    path = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha),
               f"{name}.dora_scale": stored if scale is None else scale}, str(path))
    return path, want


@pytest.mark.parametrize("module", [Q, CONV1])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_a_hand_made_lycoris_dora_file_reproduces_its_weight(sd, tmp_path, module, axis):
    models = copy.deepcopy(sd)
    layer0 = models["unet"].get_submodule(module)
    W0, b0 = layer0.weight.detach().clone(), None if layer0.bias is None else layer0.bias.detach().clone()
    path, want = _hand_file(tmp_path, module, W0, axis)
    af = F.read(path)
    assert af.parts["unet"].method == "dora" and af.parts["unet"].config["axis"] == axis
    F.attach_file(af, models, "d", weight=0.6)
    layer = models["unet"].get_submodule(module)
    x = torch.randn(2, 32, *([6, 6] if W0.dim() == 4 else [7]))
    if W0.dim() == 2:
        x = x.transpose(1, 2)  # (2, 7, 32)
    with torch.no_grad():
        got = layer(x)
        W = (W0.flatten(1) + 0.6 * (want - W0.flatten(1))).view_as(W0)  # W0 + w (W' - W0)
        expected = (torch.nn.functional.conv2d(x, W, b0, layer0.stride, layer0.padding) if W0.dim() == 4
                    else torch.nn.functional.linear(x, W, b0))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    A.merge(models["unet"])
    torch.testing.assert_close(layer.base.weight.flatten(1), W.flatten(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,why", [
    (torch.ones(3, 2), "fits neither the output axis"),
    (torch.zeros(32, 1), "zero, negative or non-finite"),
    (-torch.ones(32, 1), "zero, negative or non-finite"),
    (torch.full((32, 1), float("nan")), "NaN or infinite"),  # (the file reader's check, naming the tensor)
])
def test_bad_dora_scales_are_refused_naming_the_module(sd, tmp_path, scale, why):
    path, _ = _hand_file(tmp_path, Q, sd["unet"].get_submodule(Q).weight.detach(), scale=scale)
    with pytest.raises(A.StudioError, match=rf"{path}.*(module '{Q}'|{Q.replace('.', '_')}).*{why}"):
        F.read(path)


def test_studio_dora_exports_lycoris_layout_and_reloads_exactly(sd, tmp_path):
    models = copy.deepcopy(sd)
    A.attach(models["unet"], "d", "dora", A.dora.Config(rank=4, alpha=8.0, conv_rank=2), "unet-full")
    A.attach(models["te"], "d", "dora", A.dora.Config(rank=4, alpha=8.0), "te-attn")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in models.values():
            for p in A.trainable_parameters(m, "d"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    want = _run(models["unet"])
    report = F.save(F.from_models(models, "d"), tmp_path / "d.safetensors", "kohya", dtype="fp32")  # no base needed
    assert report.energy == 1.0
    info = F.inspect_file(tmp_path / "d.safetensors")
    assert info["methods"] == {"unet": "dora", "te": "dora"}
    assert info["metadata"]["ss_network_module"] == "lycoris.kohya"
    fresh = copy.deepcopy(sd)
    F.attach_file(F.read(tmp_path / "d.safetensors"), fresh, "d")
    torch.testing.assert_close(_run(fresh["unet"]), want, atol=1e-5, rtol=1e-4)
    # --rank: a plain LoRA of the exact delta by SVD, lossy, with the error reported (needs the base)
    lossy = F.save(F.from_models(models, "d"), tmp_path / "p.safetensors", "kohya", dtype="fp32", rank=2,
                   models=sd)
    assert 0.5 < lossy.energy < 1.0 and lossy.relative_error > 0
    assert F.read(tmp_path / "p.safetensors").parts["unet"].method == "lora"
    with pytest.raises(A.StudioError, match="needs its base model"):
        F.save(F.from_models(models, "d"), tmp_path / "q.safetensors", "kohya", rank=2)


def test_what_lycoris_applies_equals_what_the_studio_applies(sd, tmp_path):
    """A DoRA (LoCon + dora_wd) network built by lycoris-lora itself on an SD-layout UNet and CLIP,
    its parameters moved off their init, saved by LyCORIS and loaded by the studio: same outputs."""
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    ly_models = copy.deepcopy(sd)
    ours = copy.deepcopy(sd)
    net = lycoris_kohya.create_network(1.0, 4, 8, None, ly_models["te"], ly_models["unet"], algo="lora", dora_wd=True,
                                       conv_dim=2, conv_alpha=1, preset=str(PRESET))
    net.apply_to(ly_models["te"], ly_models["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    net.save_weights(str(tmp_path / "ly.safetensors"), torch.float32, {})
    af = F.read(tmp_path / "ly.safetensors")
    assert {c: p.method for c, p in af.parts.items()} == {"unet": "dora", "te": "dora"}
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras) and len(attached["te"]) == len(net.text_encoder_loras)
    torch.testing.assert_close(_run(ours["unet"]), _run(ly_models["unet"]), atol=1e-5, rtol=1e-4)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours["te"](input_ids=ids).last_hidden_state,
                                   ly_models["te"](input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [torch.ones(3, 2), -torch.ones(32, 1)])
def test_bad_dora_files_are_one_error_line_in_the_cli(sd, tmp_path, capsys, scale):
    from cli_helpers import one_error_line

    path, _ = _hand_file(tmp_path, Q, sd["unet"].get_submodule(Q).weight.detach(), scale=scale)
    out = tmp_path / "out.safetensors"
    line = one_error_line(capsys, ["export", str(path), "--format", "kohya", "-o", str(out)])
    assert Q in line and not out.exists()
    assert "dora_scale" in one_error_line(capsys, ["inspect", str(path)])
