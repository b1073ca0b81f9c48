"""The last LyCORIS files people download that the studio refused (issue 16):

1. Tucker LoCon (LyCORIS ``algo=locon use_tucker=True``, and the older ``use_cp`` / LoCon "cp" spelling):
   per k x k conv ``lora_down (r, in, 1, 1)``, ``lora_mid (r, r, kh, kw)``, ``lora_up (out, r, 1, 1)``,
   dW = s U x (M D) (reference/lycoris.md 1). Imported by folding the core into the down kernel, exactly:
   files written by ``lycoris-lora``'s kohya wrapper on the tiny SD1.5 and SDXL layouts give the studio
   LyCORIS's own outputs (UNet and text encoders, 1e-4 of the output's scale, weight 1 and 0.5), also
   under DoRA, also in bf16; re-exported in LyCORIS's layout they load in LyCORIS to the same outputs.
2. SimpleTuner files: LyCORIS's generic wrapper (``create_lycoris`` + ``apply_to``, saved by its own
   ``save_weights`` with SimpleTuner's ``lycoris_config`` header) names UNet modules ``lycoris_<path>``.
3. Bad Tucker files and ``lycoris_`` text-encoder names: one ``error:`` line, exit 2, nothing written.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from builders import tiny_sdxl_text_encoders, tiny_sdxl_unet
from cli_helpers import one_error_line
from formats_helpers import tiny_sd, unet_sample

PRESET = Path(__file__).parent / "data" / "lycoris_preset.toml"
CONV1 = "down_blocks.0.resnets.0.conv1"  # 3x3, 32 -> 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


def _te(te):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return te(input_ids=ids).last_hidden_state


def _xl_unet(unet):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                    encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(2, 16, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}).sample


def _outputs(models):
    run = {"unet": _xl_unet if "te1" in models else unet_sample}
    return {c: run.get(c, _te)(m) for c, m in models.items()}


def _close(got, want, rel=1e-4):
    """Equal to ``rel`` of the output's scale (fp32 maths)."""
    for c in want:
        error = (got[c] - want[c]).abs().max().item()
        assert error <= rel * want[c].abs().max().item(), f"{c}: max error {error:.3g}"


def _moved(net, dtype=torch.float32):
    """Move a fresh network off its init (up = 0) and round it to ``dtype``, so the live net is the file."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(dtype).float())


# -- 1. Tucker LoCon -----------------------------------------------------------------------------
TUCKER = {  # case -> (network args, studio method, linear in the weight)
    "use_tucker": (dict(use_tucker=True), "lora", True),
    "use_cp": (dict(use_cp=True), "lora", True),             # the older spelling of the same core
    "dora": (dict(use_tucker=True, dora_wd=True), "dora", False),
}


def _kohya_network(base, path, dtype="fp32", **args):
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    ly = copy.deepcopy(base)
    tes = [ly[c] for c in ("te1", "te2")] if "te1" in ly else ly["te"]
    net = lycoris_kohya.create_network(1.0, 4, 2, None, tes, ly["unet"], algo="locon", preset=str(PRESET),
                                       conv_dim=2, conv_alpha=1, **args)
    net.apply_to(tes, ly["unet"], apply_text_encoder=True, apply_unet=True)
    _moved(net, DTYPES[dtype])
    net.save_weights(str(path), DTYPES[dtype], {})
    return ly, net


def _check_tucker_keys(path, conv_name):
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    down, up = shapes[f"{conv_name}.lora_down.weight"], shapes[f"{conv_name}.lora_up.weight"]
    assert shapes[f"{conv_name}.lora_mid.weight"] == (2, 2, 3, 3)
    assert down[0] == 2 and down[2:] == (1, 1) and up[1:] == (2, 1, 1)  # (r, in, 1, 1) / (out, r, 1, 1)
    return shapes


@pytest.mark.parametrize("case", list(TUCKER))
def test_tucker_locon_files_apply_as_lycoris_applies_them(sd, tmp_path, case):
    args, method, linear = TUCKER[case]
    path = tmp_path / "tucker.safetensors"
    ly, net = _kohya_network(sd, path, **args)
    shapes = _check_tucker_keys(path, "lora_unet_" + CONV1.replace(".", "_"))
    cores = sum(k.endswith(".lora_mid.weight") for k in shapes)
    assert cores >= 8  # every 3x3 conv of the ResNets and samplers carries one
    af = F.read(path)
    assert {c: p.method for c, p in af.parts.items()} == {"unet": method, "te": method}
    assert af.parts["unet"].config["conv_rank"] == 2 and af.parts["unet"].config["conv_alpha"] == 1.0
    ours = copy.deepcopy(sd)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras) and len(attached["te"]) == len(net.text_encoder_loras)
    base, want = _outputs(sd), _outputs(ly)
    assert (want["unet"] - base["unet"]).abs().max() > 1e-2  # the network does something
    _close(_outputs(ours), want)
    if not linear:  # DoRA: LyCORIS's multiplier is affine (reference/lycoris.md 4), the studio's linear
        return
    net.set_multiplier(0.5)
    F.set_file_weight(ours, "ly", 0.5)
    _close(_outputs(ours), _outputs(ly))


def test_the_folded_core_is_the_tucker_contraction(sd, tmp_path):
    """The down kernel read back is M x D, by the closed form dW[o,i,h,w] = s sum_pq U[o,p] M[p,q,h,w] D[q,i]."""
    path = tmp_path / "tucker.safetensors"
    _kohya_network(sd, path, use_tucker=True)
    name = "lora_unet_" + CONV1.replace(".", "_")
    with safe_open(str(path), "pt") as f:
        D, M, U = (f.get_tensor(f"{name}.{k}.weight") for k in ("lora_down", "lora_mid", "lora_up"))
        alpha = float(f.get_tensor(f"{name}.alpha"))
    want = torch.zeros(32, 32, 3, 3)
    for o in range(32):
        for i in range(32):
            want[o, i] = (alpha / 2) * sum(U[o, p, 0, 0] * M[p, q] * D[q, i, 0, 0] for p in range(2) for q in range(2))
    ours = copy.deepcopy(sd)
    F.attach_file(F.read(path), ours, "ly")
    got = A.delta_weights(ours["unet"], "ly")[CONV1]
    assert (got.reshape(want.shape) - want).abs().max() <= 1e-6 * want.abs().max()


def test_sdxl_and_bf16_tucker_locon_files_apply_as_lycoris_applies_them(tmp_path):
    torch.manual_seed(0)
    te1, te2 = tiny_sdxl_text_encoders()
    xl = {"unet": tiny_sdxl_unet().eval(), "te1": te1.eval(), "te2": te2.eval()}
    path = tmp_path / "xl.safetensors"
    ly, net = _kohya_network(xl, path, "bf16", use_tucker=True)
    _check_tucker_keys(path, "lora_unet_" + CONV1.replace(".", "_"))
    af = F.read(path)
    assert af.base == "sdxl" and set(af.parts) == {"unet", "te1", "te2"} and af.source["dtypes"] == ["bfloat16"]
    ours = copy.deepcopy(xl)
    attached = F.attach_file(af, ours, "ly")
    assert {CONV1, "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= set(attached["unet"])
    _close(_outputs(ours), _outputs(ly))
    net.set_multiplier(0.5)
    F.set_file_weight(ours, "ly", 0.5)
    _close(_outputs(ours), _outputs(ly))


def test_a_tucker_file_exported_in_lycoris_layout_loads_in_lycoris_to_the_same_outputs(sd, tmp_path):
    import lycoris.kohya as lycoris_kohya
    from lycoris.utils.preset import read_preset
    path = tmp_path / "tucker.safetensors"
    ly, _ = _kohya_network(sd, path, use_tucker=True)
    out = tmp_path / "plain-locon.safetensors"
    report = F.save(F.read(path), out, "lycoris", dtype="fp32")
    assert report.energy == 1.0
    with safe_open(str(out), "pt") as f:
        assert not any("lora_mid" in k for k in f.keys())  # a plain LoCon: the core is in the down kernel
        assert tuple(f.get_slice("lora_unet_" + CONV1.replace(".", "_") + ".lora_down.weight").get_shape()) == \
            (2, 32, 3, 3)
    ours = copy.deepcopy(sd)
    F.attach_file(F.read(out), ours, "ly")
    _close(_outputs(ours), _outputs(ly))
    lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(PRESET)))  # (its loader builds a network first)
    # our TE names are kohya's (lora_te_text_model_...); LyCORIS names the live modules (no text_model level)
    weights = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in F.files.read(out)[0].items()}
    again = copy.deepcopy(sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, again["te"], again["unet"], weights_sd=weights)
    net.apply_to(again["te"], again["unet"], apply_text_encoder=True, apply_unet=True)
    _close(_outputs(again), _outputs(ly))


# -- 2. SimpleTuner: LyCORIS's generic wrapper, lycoris_ names -----------------------------------
@pytest.fixture
def generic(monkeypatch):
    """LyCORIS's generic wrapper keeps its preset in class attributes: restore them after each test."""
    from lycoris import LycorisNetwork
    for attr in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
                 "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetwork, attr, copy.copy(getattr(LycorisNetwork, attr)))
    return LycorisNetwork


def _simpletuner(generic, base, path, config: dict):
    """What SimpleTuner does with a lycoris_config JSON: apply_preset, create_lycoris on the UNet with the
    positional multiplier / linear_dim / linear_alpha taken out, apply_to, save_weights with the config."""
    from lycoris import create_lycoris
    ly = copy.deepcopy(base)
    kwargs = {k: v for k, v in config.items() if k not in ("multiplier", "linear_dim", "linear_alpha")}
    if config.get("apply_preset"):
        generic.apply_preset(config["apply_preset"])
    net = create_lycoris(ly["unet"], config["multiplier"], config["linear_dim"], config["linear_alpha"], **kwargs)
    net.apply_to()
    _moved(net)
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})
    return ly, net


ATTN_FF = {"target_module": ["Attention", "FeedForward"]}
SIMPLETUNER = {  # case -> (lycoris_config, studio method, a key the file holds, linear in the weight)
    "lokr": ({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
              "apply_preset": ATTN_FF}, "lokr", "lokr_w2", True),
    "lokr-factored": ({"algo": "lokr", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 1, "factor": 4},
                      "lokr", "lokr_w2_a", True),
    # no preset: every Linear and conv of the UNet (conv_in / conv_out, time embedding, ResNets, samplers)
    "locon": ({"algo": "locon", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "conv_dim": 2,
               "conv_alpha": 1}, "lora", "lora_down.weight", True),
    "locon-tucker": ({"algo": "locon", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "conv_dim": 2,
                      "conv_alpha": 1, "use_tucker": True}, "lora", "lora_mid.weight", True),
    "loha": ({"algo": "loha", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2}, "loha", "hada_w1_a", True),
    "dora": ({"algo": "lora", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4, "dora_wd": True}, "dora",
             "dora_scale", False),
    "full": ({"algo": "full", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1, "apply_preset": ATTN_FF},
             "full", "diff", True),
}


@pytest.mark.parametrize("case", list(SIMPLETUNER))
def test_simpletuner_lycoris_files_apply_as_lycoris_applies_them(generic, sd, tmp_path, case):
    config, method, key, linear = SIMPLETUNER[case]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ly, net = _simpletuner(generic, sd, path, config)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("lycoris_") for k in keys) and any(k.endswith("." + key) for k in keys)
    af = F.read(path)
    assert {c: p.method for c, p in af.parts.items()} == {"unet": method}
    assert af.source["format"].startswith("lycoris")
    ours = copy.deepcopy(sd)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.loras)
    if case == "locon":
        assert {"conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.1.resnets.0.conv_shortcut",
                "down_blocks.0.downsamplers.0.conv"} <= set(attached["unet"])
    want = unet_sample(ly["unet"])
    assert (want - unet_sample(sd["unet"])).abs().max() > 1e-2
    _close({"unet": unet_sample(ours["unet"])}, {"unet": want})
    if linear:
        net.set_multiplier(0.5)
        F.set_file_weight(ours, "ly", 0.5)
        _close({"unet": unet_sample(ours["unet"])}, {"unet": unet_sample(ly["unet"])})


def test_a_simpletuner_sdxl_layout_file_saved_in_bf16_applies_as_lycoris_applies_it(generic, tmp_path):
    """SimpleTuner saves in the network's dtype (bf16 training): diffusers names of the SDXL UNet, incl. its
    add_embedding (text_time conditioning) and Linear proj_in / proj_out."""
    from lycoris import create_lycoris
    torch.manual_seed(0)
    base = {"unet": tiny_sdxl_unet().eval()}
    ly = copy.deepcopy(base)
    net = create_lycoris(ly["unet"], 1.0, 2, 1, algo="lokr", factor=4)
    net.apply_to()
    _moved(net, torch.bfloat16)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net.save_weights(str(path), torch.bfloat16, {"lycoris_config": json.dumps({"algo": "lokr", "factor": 4})})
    af = F.read(path)
    assert af.source["dtypes"] == ["bfloat16"] and af.parts["unet"].method == "lokr"
    ours = copy.deepcopy(base)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.loras)
    assert {"add_embedding.linear_1", "conv_in", "down_blocks.1.attentions.0.proj_in"} <= set(attached["unet"])
    want = _xl_unet(ly["unet"])
    assert (want - _xl_unet(base["unet"])).abs().max() > 1e-2
    _close({"unet": _xl_unet(ours["unet"])}, {"unet": want})


def test_simpletuners_default_lokr_config_with_per_module_factors_imports(generic, sd, tmp_path):
    config = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
              "apply_preset": {"target_module": ["Attention", "FeedForward"],
                               "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ly, _ = _simpletuner(generic, sd, path, config)
    ours = copy.deepcopy(sd)
    F.attach_file(F.read(path), ours, "ly")
    _close({"unet": unet_sample(ours["unet"])}, {"unet": unet_sample(ly["unet"])})


# -- 3. bad input --------------------------------------------------------------------------------
def _tucker(r=2, mid=(2, 2, 3, 3), down=None):
    g = torch.Generator().manual_seed(0)
    return {"lora_down.weight": torch.randn(*(down or (r, 32, 1, 1)), generator=g),
            "lora_mid.weight": torch.randn(*mid, generator=g),
            "lora_up.weight": torch.randn(32, r, 1, 1, generator=g), "alpha": torch.tensor(1.0)}


def _without(t, key):
    return {k: v for k, v in t.items() if k != key}


NAME = "lora_unet_" + CONV1.replace(".", "_")
BAD = {  # case -> (tensors, words the error line names)
    "core-of-another-rank": ({f"{NAME}.{k}": v for k, v in _tucker(mid=(3, 3, 3, 3)).items()},
                             [NAME, "Tucker core", "(3, 3)", "rank 2"]),
    "core-without-up": ({f"{NAME}.{k}": v for k, v in _without(_tucker(), "lora_up.weight").items()},
                        [NAME, "lora_mid", "lora_up"]),
    "down-with-a-kernel": ({f"{NAME}.{k}": v for k, v in _tucker(down=(2, 32, 3, 3)).items()},
                           [NAME, "(2, 32, 3, 3)", "(r, in, 1, 1)"]),
    "core-in-peft-names": ({f"unet.{CONV1}.{k}": v for k, v in _tucker().items()}, ["lora_mid", "kohya-named"]),
    "text-encoder-under-lycoris_": (
        {f"lycoris_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in
         {"lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2)}.items()},
        ["lycoris_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tucker_and_lycoris_prefix_files_are_one_error_line_and_nothing_is_written(tmp_path, capsys, case):
    tensors, words = BAD[case]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    lines = [one_error_line(capsys, ["inspect", str(path)])]
    for fmt in ("kohya", "lycoris"):
        out = tmp_path / f"out-{fmt}.safetensors"
        lines.append(one_error_line(capsys, ["export", str(path), "--format", fmt, "-o", str(out)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written, no temp file
    for line in lines:
        assert str(path) in line
        for word in words:
            assert word in line, (word, line)
