"""kohya LoCon: LoRAs on k x k convolutions (``conv_dim`` / ``conv_alpha``; the ``unet-full`` preset).

kohya and LyCORIS store such a module as ``lora_down.weight (r, in, kh, kw)`` and ``lora_up.weight
(out, r, 1, 1)`` (reference/lycoris.md 1): a k x k down-convolution to r channels with the base's
stride and padding, then a 1x1 up-convolution; dW = (alpha / r) up @ down, reshaped to the kernel.
"""

import pytest
import torch
import torch.nn.functional as TF
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from formats_helpers import tiny_sd

CONV1 = "down_blocks.0.resnets.0.conv1"          # 32 -> 32, 3x3, padding 1
DOWNSAMPLER = "down_blocks.0.downsamplers.0.conv"  # 32 -> 32, 3x3, stride 2


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


def _fresh(sd):
    import copy
    return {c: copy.deepcopy(m) for c, m in sd.items()}


def _shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("module", [CONV1, DOWNSAMPLER])
def test_a_kohya_locon_file_applies_its_dense_kernel(sd, tmp_path, module):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g)
    name = "lora_unet_" + module.replace(".", "_")
    path = tmp_path / "locon.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(path))
    af = F.read(path)
    models = _fresh(sd)
    conv = models["unet"].get_submodule(module)
    x = torch.randn(2, 32, 8, 8, generator=g)
    with torch.no_grad():
        base = conv(x)
        F.attach_file(af, models, "locon", weight=0.5)
        layer = models["unet"].get_submodule(module)
        got = layer(x)
        kernel = (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).view(32, 32, 3, 3)  # dW by hand
        want = base + 0.5 * TF.conv2d(x, kernel, None, conv.stride, conv.padding)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    A.merge(models["unet"])
    torch.testing.assert_close(layer.base.weight, layer._w0 + 0.5 * kernel, atol=1e-5, rtol=1e-5)


def test_unet_full_adapters_export_kohya_4d_kernels_and_reload_exactly(sd, tmp_path):
    models = _fresh(sd)
    cfg = A.lora.Config(rank=4, alpha=4.0, conv_rank=2, conv_alpha=1.0)
    paths = A.attach(models["unet"], "a", "lora", cfg, "unet-full")
    assert CONV1 in paths and DOWNSAMPLER in paths and "down_blocks.0.resnets.0.time_emb_proj" in paths
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in A.trainable_parameters(models["unet"], "a"):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    assert tuple(models["unet"].get_submodule(CONV1).adapters["a"].A.shape) == (2, 32, 3, 3)
    af = F.from_models(models, "a")
    sample, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = models["unet"](sample, t, encoder_hidden_states=context).sample
    for given in (None, models):  # the kernels come from the stored LoCon factors, or from the model
        path = tmp_path / f"k{given is None}.safetensors"
        F.save(af, path, "kohya", dtype="fp32", models=given)
        shapes = _shapes(path)
        assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (2, 32, 3, 3)
        assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] == (32, 2, 1, 1)
        assert len(shapes["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"]) == 2
        fresh = _fresh(sd)
        F.attach_file(F.read(path), fresh, "b")
        with torch.no_grad():
            got = fresh["unet"](sample, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    baked, _ = F.bake([(af, 0.5, None), (af, 0.5, None)])
    path = tmp_path / "baked.safetensors"
    F.save(baked, path, "kohya", dtype="fp32")
    assert _shapes(path)["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][1:] == (32, 3, 3)
