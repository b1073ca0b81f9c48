"""LyCORIS LoHa, LoKr and full (diff) files: imported, applied as LyCORIS applies them, exported back, converted.

Layouts (reference/lycoris.md 2, 3, 5), per kohya-named module:

    LoHa   hada_w1_a (out, r)  hada_w1_b (r, in)  hada_w2_a  hada_w2_b  alpha   dW = (alpha/r) (w1_a w1_b) * (w2_a w2_b)
    LoKr   lokr_w1 (a, c) | lokr_w1_a / _b   lokr_w2 (b, d[, kh, kw]) | lokr_w2_a / _b   alpha
                                                                              dW = s kron(W1, W2), s = 1 if both full
    full   diff (the weight's shape)  diff_b (out,)                           dW = diff, db = diff_b

The networks are built by ``lycoris-lora``'s kohya wrapper on the tiny SD1.5-layout UNet and CLIP
(every Linear / conv of the attention, ResNet and sampler blocks), moved off their init and saved
by LyCORIS; the studio's whole-model outputs must equal LyCORIS's own forward.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from formats_helpers import tiny_sd, unet_sample
from studio.adapters import lokr
from studio.errors import StudioError

PRESET = Path(__file__).parent / "data" / "lycoris_preset.toml"
ROOT = Path(__file__).resolve().parents[1]
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"   # Linear 32 -> 32
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"  # Linear 32 -> 32, with a bias
CONV1 = "down_blocks.0.resnets.0.conv1"                             # 3x3, 32 -> 32
NAME = {m: "lora_unet_" + m.replace(".", "_") for m in (Q, OUT, CONV1)}

# name -> (algo, network args, a key the file must hold)
NETWORKS = {
    "loha": ("loha", dict(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), "hada_w1_a"),
    "loha-tucker": ("loha", dict(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, use_tucker=True), "hada_t1"),
    "lokr-full-w1": ("lokr", dict(network_dim=2, network_alpha=1), "lokr_w2_a"),
    "lokr-decompose-both": ("lokr", dict(network_dim=2, network_alpha=3, conv_dim=1, conv_alpha=1, decompose_both=True,
                                          factor=4), "lokr_w1_a"),
    "lokr-both-full": ("lokr", dict(network_dim=4, network_alpha=1), "lokr_w2"),
    "lokr-tucker": ("lokr", dict(network_dim=2, network_alpha=2, use_tucker=True), "lokr_t2"),
    "full": ("full", dict(network_dim=4, network_alpha=1), "diff_b"),
}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


_unet = unet_sample


def _te(te):
    with torch.no_grad():
        return te(input_ids=torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))).last_hidden_state


def _close(got, want, rel=1e-4):
    """Equal to ``rel`` of the output's scale (fp32)."""
    error = (got - want).abs().max().item()
    assert error <= rel * want.abs().max().item(), f"max error {error:.3g}"


def _lycoris_network(sd, tmp_path, case):
    """A LyCORIS network of ``case`` on copies of the models, moved off its init and saved by LyCORIS."""
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    algo, args, key = NETWORKS[case]
    args = dict(args)
    models = copy.deepcopy(sd)
    net = lycoris_kohya.create_network(1.0, args.pop("network_dim"), args.pop("network_alpha"), None, models["te"],
                                       models["unet"], algo=algo, preset=str(PRESET), **args)
    net.apply_to(models["te"], models["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    with safe_open(str(path), "pt") as f:
        assert any(k.endswith("." + key) for k in f.keys()), f"{case}: LyCORIS wrote no {key}"
    return path, models, net


@pytest.mark.parametrize("case", list(NETWORKS))
def test_what_lycoris_applies_equals_what_the_studio_applies(sd, tmp_path, case):
    path, ly, net = _lycoris_network(sd, tmp_path, case)
    af = F.read(path)
    method = NETWORKS[case][0]  # (LyCORIS algo names are the studio method names)
    assert {c: p.method for c, p in af.parts.items()} == {"unet": method, "te": method}
    ours = copy.deepcopy(sd)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras) and len(attached["te"]) == len(net.text_encoder_loras)
    assert (_unet(ly["unet"]) - _unet(sd["unet"])).abs().max() > 1e-2  # the network does something
    _close(_unet(ours["unet"]), _unet(ly["unet"]))
    _close(_te(ours["te"]), _te(ly["te"]))
    # LyCORIS's multiplier is linear for these kinds: its forward at 0.5 is W0 + 0.5 dW, our merged weight
    net.set_multiplier(0.5)
    F.set_file_weight(ours, "ly", 0.5)
    _close(_unet(ours["unet"]), _unet(ly["unet"]))
    for model in ours.values():
        A.merge(model)
    _close(_unet(ours["unet"]), _unet(ly["unet"]))
    _close(_te(ours["te"]), _te(ly["te"]))


@pytest.mark.parametrize("algo", ["loha", "lokr", "full"])
def test_sdxl_layout_files_apply_as_lycoris_applies_them(tmp_path, algo):
    """The tiny SDXL-layout UNet (text_time conditioning, Linear proj_in / proj_out) and two text encoders
    (lora_te1_ / lora_te2_)."""
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    from builders import tiny_sdxl_text_encoders, tiny_sdxl_unet
    torch.manual_seed(0)
    te1, te2 = tiny_sdxl_text_encoders()
    base = {"unet": tiny_sdxl_unet().eval(), "te1": te1.eval(), "te2": te2.eval()}
    ly, ours = copy.deepcopy(base), copy.deepcopy(base)
    net = lycoris_kohya.create_network(1.0, 2, 1, None, [ly["te1"], ly["te2"]], ly["unet"], algo=algo,
                                       preset=str(PRESET))
    net.apply_to([ly["te1"], ly["te2"]], ly["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.save_weights(str(tmp_path / "xl.safetensors"), torch.float32, {})
    af = F.read(tmp_path / "xl.safetensors")
    assert af.base == "sdxl" and set(af.parts) == {"unet", "te1", "te2"}
    assert {p.method for p in af.parts.values()} == {algo}
    F.attach_file(af, ours, "ly")

    def unet(model):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                         encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                         added_cond_kwargs={"text_embeds": torch.randn(2, 16, generator=g),
                                            "time_ids": torch.randn(2, 6, generator=g)}).sample

    _close(unet(ours["unet"]), unet(ly["unet"]))
    for te in ("te1", "te2"):
        _close(_te(ours[te]), _te(ly[te]))


def _trained(sd, method, fields, seed=1):
    models = copy.deepcopy(sd)
    cfg = A.make_config(method, fields)
    A.attach(models["unet"], "a", method, cfg, "unet-full")
    A.attach(models["te"], "a", method, cfg, "te-attn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models.values():
            for p in A.trainable_parameters(m, "a"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for layer in A.targets.adapted_layers(m).values():
                if layer.pristine_bias is None and "diff_b" in layer.adapters["a"].state():
                    layer.adapters["a"].diff_b.zero_()  # as training leaves it: no bias, no gradient
    return models


TRAINED = {
    "loha": ("loha", {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "hada_w2_b"),
    "lokr": ("lokr", {"rank": 2, "alpha": 4.0}, "lokr_w2_a"),                   # full W1, factored W2
    "lokr-decompose-both": ("lokr", {"rank": 2, "alpha": 2.0, "decompose_both": True}, "lokr_w1_a"),  # 64-wide W1s
    "lokr-full": ("lokr", {"rank": 4, "full_matrix": True}, "lokr_w2"),
    "full": ("full", {}, "diff_b"),
}
# --format lycoris also writes LoCon (a LoRA with 3x3 convs) and DoRA (dora_scale beside lora_down / lora_up)
LYCORIS_ONLY = {
    "locon": ("lora", {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}, "lora_down.weight"),
    "dora": ("dora", {"rank": 2, "alpha": 2.0}, "dora_scale"),
}


@pytest.mark.parametrize("case", list(TRAINED) + list(LYCORIS_ONLY))
def test_studio_adapters_export_lycoris_layout_reimport_exactly_and_load_in_lycoris(sd, tmp_path, case):
    method, fields, key = {**TRAINED, **LYCORIS_ONLY}[case]
    models = _trained(sd, method, fields)
    af = F.from_models(models, "a")
    want_unet, want_te = _unet(models["unet"]), _te(models["te"])
    report = F.save(af, tmp_path / "k.safetensors", "lycoris", dtype="fp32")  # no base needed
    assert report.energy == 1.0 and report.format == "lycoris"
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert any(k.endswith("." + key) for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == {"lora": "locon", "dora": "lora"}.get(method, method)
    if case == "locon":
        assert shapes[f"{NAME[CONV1]}.lora_down.weight"] == (2, 32, 3, 3)  # LoCon's kernel on the down factor
    if method == "lokr" and fields.get("full_matrix"):
        assert shapes[f"{NAME[CONV1]}.lokr_w2"] == (8, 8, 3, 3)  # a full W2 keeps the kernel, as LyCORIS stores it
    if method == "full":
        assert shapes[f"{NAME[CONV1]}.diff"] == (32, 32, 3, 3) and f"{NAME[OUT]}.diff_b" in keys
        assert f"{NAME[Q]}.diff_b" not in keys  # to_q has no bias
    back = F.read(tmp_path / "k.safetensors")
    if case in LYCORIS_ONLY:  # kohya's LoRA layout has one alpha per file: the scales fold into the factors
        assert back.parts["unet"].method == method
    else:
        assert A.make_config(method, back.parts["unet"].config) == A.make_config(method, af.parts["unet"].config)
        for component, part in af.parts.items():
            got = back.parts[component].tensors
            for k, t in part.tensors.items():
                if k.endswith("diff_b") and not t.any():
                    continue
                assert torch.equal(got[k], t), k  # the canonical tensors round-trip bit-exactly
    fresh = copy.deepcopy(sd)
    F.attach_file(back, fresh, "b")
    tol = 1e-5 if case in LYCORIS_ONLY else 1e-6  # folded scales round differently in fp32
    _close(_unet(fresh["unet"]), want_unet, tol)
    _close(_te(fresh["te"]), want_te, tol)
    # the native file keeps the adapter exactly too (LoKr's empty right factors included)
    F.save(af, tmp_path / "n.safetensors", "native")
    native = copy.deepcopy(sd)
    F.attach_file(F.read(tmp_path / "n.safetensors"), native, "n")
    assert torch.equal(_unet(native["unet"]), want_unet)
    # and LyCORIS's own loader applies it to the same outputs
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    from lycoris.utils.preset import read_preset
    lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(PRESET)))  # (its loader builds a network first)
    # our TE names are kohya's (lora_te_text_model_encoder_...); LyCORIS names the live model's modules,
    # and transformers 5's CLIPTextModel has no text_model level
    weights = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in
               F.files.read(tmp_path / "k.safetensors")[0].items()}
    ly = copy.deepcopy(sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, ly["te"], ly["unet"], weights_sd=weights)
    net.apply_to(ly["te"], ly["unet"], apply_text_encoder=True, apply_unet=True)
    assert len(net.unet_loras) == len(back.parts["unet"].modules())
    assert len(net.text_encoder_loras) == len(back.parts["te"].modules())
    _close(_unet(ly["unet"]), want_unet)
    _close(_te(ly["te"]), want_te)


def _measured(models: dict, af_plain, sd) -> float:
    """||dW - dW_plain||_F / ||dW||_F over every module, with biases the plain LoRA cannot hold."""
    plain = copy.deepcopy(sd)
    F.attach_file(af_plain, plain, "p")
    err2 = norm2 = 0.0
    for c, model in models.items():
        want, got = A.delta_weights(model, "a"), A.delta_weights(plain[c], "p")
        for path, layer in A.targets.adapted_layers(model).items():
            db = layer.adapters["a"].delta_bias(layer.pristine_bias)
            lost = 0.0 if db is None else float(db.double().square().sum())
            err2 += float((want[path] - got[path]).double().square().sum()) + lost
            norm2 += float(want[path].double().square().sum()) + lost
    return math.sqrt(err2 / norm2)


@pytest.mark.parametrize("case", ["loha", "lokr", "lokr-decompose-both", "full"])
def test_plain_lora_conversion_is_exact_at_full_rank_and_reports_the_error_it_makes(sd, tmp_path, case):
    method, fields, _ = TRAINED[case]
    models = _trained(sd, method, fields)
    F.save(F.from_models(models, "a"), tmp_path / "ly.safetensors", "kohya", dtype="fp32")
    af = F.read(tmp_path / "ly.safetensors")                       # convert the LyCORIS-layout file
    exact = F.save(af, tmp_path / "exact.safetensors", "kohya", energy=1.0, dtype="fp32", models=sd)
    plain = F.read(tmp_path / "exact.safetensors")
    assert {p.method for p in plain.parts.values()} == {"lora"}
    measured = _measured(models, plain, sd)
    assert measured == pytest.approx(exact.relative_error, abs=1e-5)
    if method != "full":  # (a full delta's bias is no LoRA: it is the whole of the reported error)
        assert exact.energy == pytest.approx(1.0, abs=1e-9) and measured < 1e-5
    for rank in (1, 3):
        lossy = F.save(af, tmp_path / f"r{rank}.safetensors", "kohya", rank=rank, dtype="fp32", models=sd)
        assert 0.0 < lossy.energy < 1.0 and lossy.relative_error > 1e-3
        measured = _measured(models, F.read(tmp_path / f"r{rank}.safetensors"), sd)
        assert measured == pytest.approx(lossy.relative_error, rel=1e-3)
        assert lossy.energy == pytest.approx(1 - lossy.relative_error ** 2, abs=1e-6)


# -- the layers, beyond the invariants' rank-4 configs (LoKr's factored halves on small layers) ---------
@pytest.mark.parametrize("layer", [torch.nn.Linear(64, 48), torch.nn.Conv2d(16, 24, 3, padding=1)],
                         ids=["linear", "conv"])
@pytest.mark.parametrize("method,fields", [("lokr", {"rank": 2, "decompose_both": True}),
                                           ("lokr", {"rank": 2, "factor": 4}), ("lokr", {"rank": 1, "conv_rank": 3}),
                                           ("loha", {"rank": 2}), ("loha", {"rank": 8})])
def test_forward_equals_the_merged_weight(layer, method, fields):
    torch.manual_seed(0)
    model = torch.nn.Sequential(copy.deepcopy(layer))
    W0 = model[0].weight.detach().clone()
    A.attach(model, "a", method, A.make_config(method, fields), ["0"])
    adapter = model[0].adapters["a"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(3, 64, generator=g) if W0.dim() == 2 else torch.randn(2, 16, 6, 6, generator=g)
    got = model(x)
    dW = adapter.delta_weight(model[0].pristine_weight).view_as(W0)
    want = (torch.nn.functional.linear(x, W0 + 0.7 * dW, model[0].base.bias) if W0.dim() == 2 else
            torch.nn.functional.conv2d(x, W0 + 0.7 * dW, model[0].base.bias, padding=1))
    A.set_weight(model, "a", 0.7)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(got.square().sum(), [p for p in adapter.parameters() if p.numel()])
    grads_want = torch.autograd.grad(want.square().sum(), [p for p in adapter.parameters() if p.numel()])
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("method,fields", [("loha", {"rank": 3}), ("loha", {"rank": 6}), ("lokr", {"rank": 2}),
                                           ("lokr", {"rank": 2, "decompose_both": True}), ("lokr", {"rank": 8})])
def test_the_structured_svd_is_the_delta(method, fields):
    """LoHa's and LoKr's plain-LoRA exports take dW's SVD from their factors (no (out, in) SVD): it must be one."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3))
    A.attach(model, "a", method, A.make_config(method, fields), ["0"])
    adapter = model[0].adapters["a"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    U, g, Vh = adapter.method.svd(adapter.cfg, adapter.state())
    dW = adapter.delta_weight(model[0].pristine_weight)
    torch.testing.assert_close(U @ torch.diag(g) @ Vh, dW, atol=1e-5, rtol=1e-4)
    eye = torch.eye(g.numel())
    torch.testing.assert_close(U.T @ U, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-4, rtol=0)


def test_lycoris_kinds_bake_with_a_lora_into_one_plain_lora(sd, tmp_path):
    files = []
    for i, (method, fields) in enumerate([("loha", {"rank": 2}), ("lokr", {"rank": 2}), ("lora", {"rank": 2})]):
        models = _trained(sd, method, fields, seed=i)
        files.append((F.from_models(models, "a"), [0.5, 0.8, -0.3][i], None, models))
    baked, summary = F.bake([(af, w, tw) for af, w, tw, _ in files])
    assert summary["energy"] == pytest.approx(1.0) and {p.method for p in baked.parts.values()} == {"lora"}
    mixed = copy.deepcopy(sd)
    for j, (af, w, _, _) in enumerate(files):
        F.attach_file(af, mixed, f"m{j}", weight=w)
    one = copy.deepcopy(sd)
    F.attach_file(baked, one, "baked")
    _close(_unet(one["unet"]), _unet(mixed["unet"]))
    _close(_te(one["te"]), _te(mixed["te"]))


def test_lokr_shapes_follow_lycoris_factorization():
    from studio.adapters.contract import Site
    cfg = lokr.Config(rank=8)
    shapes = lokr.expected_shapes(cfg, Site("x", 320, 768))                  # reference/lycoris.md 3's example
    assert shapes == {"w1": (16, 24), "w1_b": (0, 24), "w2": (20, 8), "w2_b": (8, 32), "alpha": ()}
    assert lokr.expected_shapes(lokr.Config(rank=8, factor=8), Site("x", 768, 768))["w1"] == (8, 8)
    from lycoris.functional.general import factorization
    for size in list(range(1, 200)) + [320, 640, 768, 1280, 2304, 2560, 3072, 5120, 10240]:
        for factor in (-1, 1, 2, 4, 7, 8, 16):
            assert lokr.factorization(size, factor) == factorization(size, factor), (size, factor)


# -- bad files: one line, naming the module ---------------------------------------------------------
def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _loha(r=2, out=32, cols=32, **drop):
    g = torch.Generator().manual_seed(0)
    t = {"hada_w1_a": torch.randn(out, r, generator=g), "hada_w1_b": torch.randn(r, cols, generator=g),
         "hada_w2_a": torch.randn(out, r, generator=g), "hada_w2_b": torch.randn(r, cols, generator=g),
         "alpha": torch.tensor(1.0)}
    return {k: v for k, v in t.items() if k not in drop}


def _write(tmp_path, modules: dict) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file({f"{name}.{k}": v for name, t in modules.items() for k, v in t.items()}, str(path))
    return path


@pytest.mark.parametrize("missing", ["hada_w1_a", "hada_w2_b"])
def test_a_loha_missing_a_factor_is_refused_naming_it(tmp_path, missing):
    path = _write(tmp_path, {NAME[Q]: _loha(**{missing: True})})
    with pytest.raises(StudioError) as err:
        F.read(path)
    assert f"module '{Q}'" in _one_line(err) and f"lack {missing}" in str(err.value)


def test_a_lokr_whose_factors_do_not_multiply_to_the_weight_is_refused_at_attach(sd, tmp_path):
    # W1 (4, 4) x W2 (8, 4): a (32, 16) delta on the (32, 32) to_q
    path = _write(tmp_path, {NAME[Q]: {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 4),
                                       "alpha": torch.tensor(1.0)}})
    af = F.read(path)
    with pytest.raises(StudioError) as err:
        F.attach_file(af, copy.deepcopy(sd), "bad")
    assert f"unet.{Q}" in _one_line(err) and "w2 of shape (8, 8)" in str(err.value)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_tucker_core_of_the_wrong_rank_is_refused(tmp_path, kind):
    if kind == "loha":
        t = _loha(r=4)
        t.update(hada_w1_a=torch.randn(4, 32), hada_w2_a=torch.randn(4, 32), hada_t1=torch.randn(4, 4, 3, 3),
                 hada_t2=torch.randn(3, 3, 3, 3))
    else:
        t = {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(2, 8), "lokr_w2_b": torch.randn(2, 8),
             "lokr_t2": torch.randn(3, 3, 3, 3), "alpha": torch.tensor(1.0)}
    path = _write(tmp_path, {NAME[CONV1]: t})
    with pytest.raises(StudioError) as err:
        F.read(path)
    assert f"module '{CONV1}'" in _one_line(err) and "Tucker core" in str(err.value)


@pytest.mark.parametrize("extra,why", [
    ({"lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2)}, "mixes LoHa keys"),
    ({"dora_scale": torch.ones(32, 1)}, "mixes the keys of dora .*dora_scale.* and loha"),
    ({"diff": torch.randn(32, 32)}, "mixes the keys of full .*diff.* and loha"),
])
def test_mixed_lycoris_and_plain_keys_on_one_module_are_refused_naming_it(tmp_path, extra, why):
    path = _write(tmp_path, {NAME[Q]: {**_loha(), **extra}})
    with pytest.raises(StudioError, match=why) as err:
        F.read(path)
    assert Q in _one_line(err) or NAME[Q] in str(err.value)


def test_lokr_and_full_modules_beside_plain_keys_are_refused_naming_the_module(tmp_path):
    plain = {"lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2)}
    for keys, why in (({"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 8)}, "mixes LoKr keys"),
                      ({"diff": torch.randn(32, 32)}, "mixes full-delta keys")):
        path = _write(tmp_path, {NAME[Q]: {**keys, **plain}})
        with pytest.raises(StudioError, match=why) as err:
            F.read(path)
        assert f"module '{Q}'" in _one_line(err)


def test_a_lokr_without_its_second_half_is_refused(tmp_path):
    path = _write(tmp_path, {NAME[Q]: {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(8, 2),
                                       "alpha": torch.tensor(1.0)}})
    with pytest.raises(StudioError, match="W2 needs lokr_w2, or lokr_w2_a with lokr_w2_b") as err:
        F.read(path)
    assert f"module '{Q}'" in _one_line(err)


# -- end to end: studio train / export / inspect ------------------------------------------------------
@pytest.mark.parametrize("method,extra", [("loha", ()), ("lokr", ("--method-args", "factor=4", "decompose_both=true"))])
def test_studio_train_exports_lycoris_layout_and_converts(tmp_path, capsys, method, extra):
    import shutil

    from studio.cli import main
    mini = str(ROOT / "sample_data" / "mini-sd")
    data = tmp_path / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:2]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    out = tmp_path / "run"
    assert main(["train", str(data), "-o", str(out), "--method", method, "--steps", "2", "--batch-size", "2",
                 "--rank", "2", "--sample-every", "0", "--save-every", "2", "--set", f"cache_dir={tmp_path / 'c'}",
                 *extra]) == 0
    native = out / "stripes.safetensors"
    assert F.read(native).parts["unet"].method == method
    if method == "lokr":
        assert F.read(native).parts["unet"].config["factor"] == 4
    with safe_open(str(out / "stripes.kohya.safetensors"), "pt") as f:  # what the trainer wrote: LyCORIS layout
        assert any(k.endswith(".hada_w1_a" if method == "loha" else ".lokr_w1") for k in f.keys())
    lycoris_file, plain_file = tmp_path / "ly.safetensors", tmp_path / "plain.safetensors"
    assert main(["export", str(native), "--format", "kohya", "-o", str(lycoris_file)]) == 0
    assert main(["export", str(native), "--format", "kohya", "--rank", "4", "--base", mini, "-o", str(plain_file)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(lycoris_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["methods"] == {"unet": method} and info["kinds"] == {"unet": "dense"}
    assert F.read(plain_file).parts["unet"].method == "lora"


@pytest.mark.parametrize("method", ["loha", "lokr", "full"])
def test_studio_train_lm(tmp_path, method):
    from lm_helpers import pirate_jsonl, tiny_lm_folder
    from studio.cli import main
    base = tiny_lm_folder(tmp_path / "llama")
    out = tmp_path / "run"
    assert main(["train", "--task", "lm", str(pirate_jsonl(tmp_path, 8)), "--base", str(base), "--out", str(out),
                 "--method", method, "--steps", "2", "--batch-size", "4", "--save-every", "2", "--rank", "2"]) == 0
    af = F.read(next(out.glob("*.safetensors")))
    assert af.parts["lm"].method == method
