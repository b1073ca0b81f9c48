"""SD1.5 LoRAs that adapt the 1x1-conv proj_in / proj_out (use_linear_projection False).

kohya stores such a module as ``lora_down.weight (r, in, 1, 1)`` and ``lora_up.weight (out, r, 1, 1)``
(reference/formats.md 1.2), PEFT / diffusers as ``lora_A.weight (r, in, 1, 1)`` / ``lora_B.weight
(out, r, 1, 1)``. They import as the canonical (r, in) / (out, r) factors, export back 4-D when the
module is a convolution, and diffusers' own ``load_lora_weights`` + ``fuse_lora`` is the referee.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from builders import tiny_clip, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet
from formats_helpers import copies, deltas, linear_weights, train
from studio.formats.packing import is_conv
from test_formats_diffusers import _te_names, assert_fused_equal, diffusers_fused, studio_merged

PROJ = ["proj_in", "proj_out"]
UNET_TARGETS = ["unet-attn"] + PROJ
TARGETS = {"unet": UNET_TARGETS, "te": "te-attn", "te1": "te-attn", "te2": "te-attn"}


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    unet = tiny_unet()
    assert not unet.config.use_linear_projection  # SD1.5-shaped: proj_in / proj_out are 1x1 Conv2d
    return {"unet": unet, "te": tiny_clip()}


def _proj_paths(unet) -> list[str]:
    return [p for p in A.find_targets(unet, PROJ)]


def _shapes(path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _hand_made_kohya(models, rank=4, alpha=2.0, seed=3):
    """A kohya SD1.5 file written by hand from the documented layout: 4-D factors for the 1x1 convs."""
    g = torch.Generator().manual_seed(seed)
    names = {f"lora_unet_{p.replace('.', '_')}": ("unet", p) for p in A.find_targets(models["unet"], UNET_TARGETS)}
    names.update(_te_names(models["te"], "lora_te", "te"))
    tensors, expected = {}, {}
    for name, (component, path) in names.items():
        weight = models[component].get_submodule(path).weight
        out, inp = weight.shape[:2]
        down = (0.2 * torch.randn(rank, inp, generator=g)).half()   # (r, in)
        up = (0.2 * torch.randn(out, rank, generator=g)).half()     # (out, r)
        expected[(component, path.removeprefix("text_model."))] = (alpha / rank) * up.float() @ down.float()
        if weight.dim() == 4:  # a 1x1 convolution: kohya keeps the kernel dims
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
    return tensors, expected


def test_hand_made_kohya_file_with_proj_convs_imports_mixes_and_agrees_with_diffusers(sd, tmp_path):
    tensors, expected = _hand_made_kohya(sd)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors["lora_unet_up_blocks_1_attentions_1_proj_out.lora_up.weight"].shape == (32, 4, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].dim() == 2
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})

    hand = F.read(path)
    assert hand.method == "lora" and hand.module_counts()["unet"] == 4 * 8 + 8
    unet_part = hand.parts["unet"].tensors
    assert unet_part["down_blocks.0.attentions.0.proj_in.A"].shape == (4, 32)     # canonical (r, in)
    assert unet_part["down_blocks.0.attentions.0.proj_in.B"].shape == (32, 4)     # canonical (out, r)

    # mixed at 0.7 with a studio LoRA (also on the convs) at -0.3: the weights computed by hand
    models = train(copies(sd), "lora", name="mine", seed=7, targets=TARGETS)
    mine = deltas(models, "mine")
    F.attach_file(hand, models, "hand", weight=0.7)
    for model in models.values():
        A.set_weight(model, "mine", -0.3)
        A.merge(model)
    W0 = {c: linear_weights(m) for c, m in sd.items()}
    for (component, module), dW in expected.items():
        want = W0[component][module] + 0.7 * dW - 0.3 * mine[f"{component}.{module}"]
        torch.testing.assert_close(linear_weights(models[component])[module], want, atol=1e-5, rtol=1e-5)
    conv = models["unet"].get_submodule("down_blocks.0.attentions.0.proj_in")
    assert conv.conv and conv.base.weight.shape == (32, 32, 1, 1)

    # diffusers' loader is the referee: it converts the kohya file itself and fuses
    theirs = diffusers_fused(sd, path)
    assert all(p in theirs["unet"] for p in _proj_paths(sd["unet"]))
    assert_fused_equal(theirs, studio_merged(sd, hand), sd, hand.module_counts())


@pytest.mark.parametrize("method,fmt,dtype", [("lora", "kohya", "fp32"), ("lora", "diffusers", "fp32"),
                                              ("pissa", "kohya", "fp16"), ("milora", "diffusers", "fp32"),
                                              ("svf", "kohya", "fp32")])
def test_our_proj_exports_are_4d_and_diffusers_fuses_them_to_our_merge(sd, tmp_path, method, fmt, dtype):
    models = train(copies(sd), method, targets=TARGETS)
    af = F.from_models(models, "a")
    path = tmp_path / f"{method}-{fmt}.safetensors"
    # SVF is converted on the pristine base (plain Conv2d modules), the others see the adapted models
    F.save(af, path, fmt, dtype=dtype, models=sd if method == "svf" else models, energy=1.0 if method == "svf" else None)
    shapes = _shapes(path)
    down = "lora_down" if fmt == "kohya" else "lora_A"
    convs = {k: s for k, s in shapes.items() if ("proj_in" in k or "proj_out" in k) and down in k}
    linears = {k: s for k, s in shapes.items() if "to_q" in k and down in k}
    assert len(convs) == 8 and all(len(s) == 4 and s[2:] == (1, 1) for s in convs.values()), convs
    assert linears and all(len(s) == 2 for s in linears.values())

    back = F.read(path)
    assert back.module_counts() == af.module_counts()
    theirs = diffusers_fused(sd, path)
    assert_fused_equal(theirs, studio_merged(sd, back), sd, af.module_counts())
    W0 = {c: linear_weights(m) for c, m in sd.items()}  # and both equal the live adapter
    tolerance = 5e-3 if dtype == "fp16" else 1e-5
    for key, dW in deltas(models, "a").items():
        component, module = key.split(".", 1)
        error = (theirs[component][module] - W0[component][module] - dW).norm() / dW.norm()
        assert error <= tolerance, key


def test_without_models_the_family_decides_the_kernel_dims(sd, tmp_path):
    """No base at export: SD1.x (and the mini base's layout) -> 4-D proj_in / proj_out; SDXL -> 2-D."""
    models = train(copies(sd), "lora", targets=TARGETS)
    af = F.from_models(models, "a")
    assert af.base == "sd-custom"
    for base in ("sd-custom", "sd15"):
        path = tmp_path / f"{base}.safetensors"
        F.save(af.replace(base=base), path, "kohya")
        shapes = _shapes(path)
        assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (2, 32, 1, 1)
        assert shapes["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"] == (64, 2, 1, 1)
        assert shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] == (2, 32)
    assert is_conv("unet", "down_blocks.1.attentions.0.proj_in", "sd15")
    assert not is_conv("unet", "down_blocks.1.attentions.0.proj_in", "sdxl")
    assert not is_conv("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "sd15")
    assert not is_conv("te", "encoder.layers.0.self_attn.q_proj", "sd15")
    # the model, when given, wins over the family rule (here: a model whose proj_in is Linear)
    xl_unet = tiny_sdxl_unet()
    assert not is_conv("unet", "down_blocks.1.attentions.0.proj_in", "sd15", xl_unet)
    assert is_conv("unet", "down_blocks.0.attentions.0.proj_in", "sdxl", sd["unet"])


def test_sdxl_linear_proj_stays_2d_with_and_without_models(tmp_path):
    torch.manual_seed(1)
    te1, te2 = tiny_sdxl_text_encoders()
    sdxl = {"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}
    models = train(copies(sdxl), "lora", targets={"unet": UNET_TARGETS, "te1": "te-attn", "te2": "te-attn"})
    af = F.from_models(models, "a")
    assert af.base == "sdxl"
    for name, given in (("with", models), ("without", None)):
        path = tmp_path / f"{name}.safetensors"
        F.save(af, path, "kohya", models=given)
        proj = {k: s for k, s in _shapes(path).items() if k.endswith("proj_in.lora_down.weight")}
        assert proj and all(len(s) == 2 for s in proj.values()), proj
    assert_fused_equal(diffusers_fused(sdxl, path), studio_merged(sdxl, F.read(path)), sdxl, af.module_counts())


def test_bake_of_proj_adapters_writes_4d_kernels(sd, tmp_path):
    models = train(copies(sd), "lora", targets=TARGETS)
    af = F.from_models(models, "a")
    baked, _ = F.bake([(af, 0.5, None), (af, 0.25, None)])
    path = tmp_path / "baked.safetensors"
    F.save(baked, path, "kohya", dtype="fp32")
    assert _shapes(path)["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"][2:] == (1, 1)
    ours = studio_merged(sd, F.read(path))
    W0 = {c: linear_weights(m) for c, m in sd.items()}
    for key, dW in deltas(models, "a").items():
        component, module = key.split(".", 1)
        torch.testing.assert_close(ours[component][module] - W0[component][module], 0.75 * dW, atol=1e-5, rtol=1e-4)


def _one_module_file(tmp_path, name, down_shape, up_shape, fmt="kohya"):
    g = torch.Generator().manual_seed(0)
    if fmt == "kohya":
        tensors = {f"{name}.lora_down.weight": torch.randn(*down_shape, generator=g),
                   f"{name}.lora_up.weight": torch.randn(*up_shape, generator=g)}
    else:
        tensors = {f"{name}.lora_A.weight": torch.randn(*down_shape, generator=g),
                   f"{name}.lora_B.weight": torch.randn(*up_shape, generator=g)}
    path = tmp_path / "one.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("down_shape,up_shape", [((4, 32, 1, 1), (32, 4)), ((4, 32), (32, 4, 1, 1)),
                                                 ((4, 32, 1, 1), (32, 4, 3, 3)), ((4, 32, 1), (32, 4, 1)),
                                                 ((4, 32, 3, 3), (32, 4))])
def test_inconsistent_factor_dims_are_refused_as_damaged(tmp_path, down_shape, up_shape):
    path = _one_module_file(tmp_path, "lora_unet_down_blocks_0_attentions_0_proj_in", down_shape, up_shape)
    with pytest.raises(A.StudioError, match="the file is damaged"):
        F.read(path)


def test_proj_adapter_does_not_fit_a_base_whose_proj_is_missing(sd, tmp_path):
    """A 4-D proj_in factor on a model without that module: refused by name, nothing attached."""
    tensors, _ = _hand_made_kohya(sd)
    path = tmp_path / "hand.safetensors"
    save_file(tensors, str(path))
    models = copies(sd)
    models["unet"].down_blocks[0].attentions[0].proj_in = torch.nn.Identity()
    with pytest.raises(A.StudioError, match=r"proj_in', which is not a Linear or convolution layer"):
        F.attach_file(F.read(path), models, "x")
    assert all(A.adapter_names(m) == [] for m in models.values())
