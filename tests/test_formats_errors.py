"""Every bad file and bad request: one StudioError naming the file and the fix, nothing overwritten."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import studio.formats as F
from builders import tiny_clip, tiny_llama, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet
from formats_helpers import copies, deltas, train
from studio.errors import StudioError
from studio.adapters.targets import adapted_layers
from studio.formats import files

LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return {"unet": tiny_unet(), "te": tiny_clip()}


def _kohya(**extra):
    tensors = {f"{LORA}.lora_down.weight": torch.randn(2, 32), f"{LORA}.lora_up.weight": torch.randn(32, 2),
               f"{LORA}.alpha": torch.tensor(2.0)}
    tensors.update(extra)
    return tensors


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(autouse=True)
def _never_unpickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# -- algorithms refused by name ----------------------------------------------------------------
@pytest.mark.parametrize("key,name", [
    (f"{LORA}.a1.weight", "GLoRA"), (f"{LORA}.oft_blocks", "OFT / BOFT"),  # (Tucker lora_mid imports now)
    (f"{LORA}.w_norm", "LyCORIS norm"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector", "DoRA"),
])
def test_unsupported_algorithms_are_refused_by_name(tmp_path, key, name):
    path = _write(tmp_path / "x.safetensors", _kohya(**{key: torch.ones(2)}))
    with pytest.raises(StudioError, match=f"x.safetensors is a {name}.*not supported.*plain LoRA"):
        F.read(path)


@pytest.mark.parametrize("key,name", [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a",
                                       "LyCORIS LoHa"),
                                      ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.diff",
                                       r"LyCORIS full \(diff\)")])
def test_lycoris_modules_outside_kohya_names_are_refused_saying_where_they_are_read(tmp_path, key, name):
    path = _write(tmp_path / "x.safetensors", {key: torch.ones(2)})
    with pytest.raises(StudioError, match=f"x.safetensors is a {name} file in a key layout.*kohya-named files"):
        F.read(path)


def test_kohya_leftover_keys_are_listed(tmp_path):
    path = _write(tmp_path / "x.safetensors", _kohya(**{f"{LORA}.scale": torch.tensor(1.0),
                                                        "lora_unet_foo.bias": torch.ones(3)}))
    with pytest.raises(StudioError, match=r"2 key\(s\) the kohya reader does not understand: "
                                          r"lora_unet_down.*\.scale, lora_unet_foo\.bias.*nothing was loaded"):
        F.read(path)


def test_kohya_keys_mixed_with_foreign_keys_are_listed(tmp_path):
    path = _write(tmp_path / "x.safetensors", _kohya(**{"bundle_emb.x": torch.ones(3)}))
    with pytest.raises(StudioError, match="mixes kohya keys with 1 other key.*bundle_emb.x"):
        F.read(path)


def test_diffusers_leftover_keys_are_listed(tmp_path):
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = _write(tmp_path / "x.safetensors", {f"{p}.lora_A.weight": torch.randn(2, 32),
                                               f"{p}.lora_B.weight": torch.randn(32, 2),
                                               f"{p}.lora_B.bias": torch.randn(32)})
    with pytest.raises(StudioError, match=r"1 key\(s\) the diffusers reader.*lora_B\.bias"):
        F.read(path)


def test_mixed_sgm_and_diffusers_unet_names_are_refused(tmp_path):
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = _write(tmp_path / "x.safetensors", _kohya(**{f"{sgm}.lora_down.weight": torch.randn(2, 32),
                                                        f"{sgm}.lora_up.weight": torch.randn(32, 2)}))
    with pytest.raises(StudioError, match="mixes SGM.*diffusers.*one layout"):
        F.read(path)


def test_unknown_layout(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"model.weight": torch.ones(2)})
    with pytest.raises(StudioError, match="not an adapter layout.*model.weight"):
        F.read(path)


# -- damaged and hostile files -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(StudioError, match=f"{name} is a pickle checkpoint.*never unpickled"):
        F.read(path)


@pytest.mark.parametrize("head", [b"\x80\x04\x95\x10\x00\x00\x00\x00\x00cos\nsystem", b"PK\x03\x04" + b"\x00" * 30])
def test_a_pickle_renamed_to_safetensors_is_refused_unread(tmp_path, head):
    path = tmp_path / "fake.safetensors"
    path.write_bytes(head)
    with pytest.raises(StudioError, match="fake.safetensors is a pickle / zip checkpoint"):
        F.read(path)


def _raw(tmp_path):
    return _write(tmp_path / "good.safetensors", _kohya()).read_bytes()


def _with_header(blob: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _shift(header):
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [o + 4 for o in header[first]["data_offsets"]]


@pytest.mark.parametrize("make,message", [
    (lambda blob: b"", "is empty"),
    (lambda blob: blob[:5], "truncated"),
    (lambda blob: blob[:-10], "truncated: the header promises"),
    (lambda blob: struct.pack("<Q", 1 << 40) + blob[8:], "header claims .* bytes"),
    (lambda blob: struct.pack("<Q", 10) + b"{not json}", "header is not JSON"),
    (lambda blob: b"just some text, not a tensor file", "no safetensors header"),
    (lambda blob: _with_header(blob, _shift), "offsets lie"),
])
def test_damaged_files(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(_raw(tmp_path)))
    with pytest.raises(StudioError, match=f"bad.safetensors.*{message}"):
        F.read(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(StudioError, match="nope.safetensors: no such file"):
        F.read(tmp_path / "nope.safetensors")
    with pytest.raises(StudioError, match="is a folder"):
        F.read(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(tmp_path, value):
    tensors = _kohya()
    tensors[f"{LORA}.lora_up.weight"][3, 1] = value
    with pytest.raises(StudioError, match="lora_up.weight' has NaN or infinite values"):
        F.read(_write(tmp_path / "x.safetensors", tensors))


def test_damaged_native_header(tmp_path, sd):
    af = F.from_models(train(copies(sd), "lora"), "a")
    F.save(af, tmp_path / "n.safetensors")
    tensors, meta = files.read(tmp_path / "n.safetensors")
    _write(tmp_path / "n2.safetensors", tensors, {**meta, "studio.adapter": "{broken"})
    with pytest.raises(StudioError, match="n2.safetensors: the studio.adapter header field.*damaged"):
        F.read(tmp_path / "n2.safetensors")
    _write(tmp_path / "n3.safetensors", tensors, {**meta, "studio.adapter": json.dumps({"unet": {"method": "glora"}})})
    with pytest.raises(StudioError, match="unknown method 'glora'"):
        F.read(tmp_path / "n3.safetensors")


# -- files that do not fit the base ------------------------------------------------------------
def test_shapes_that_do_not_fit_name_the_module_and_the_family(sd, tmp_path):
    from builders import SD15_UNET, meta_unet
    from test_formats_names import shape_adapter
    af = shape_adapter({"unet": meta_unet(SD15_UNET)}, "sd15")
    F.save(af, tmp_path / "sd15.safetensors", "kohya")
    models = copies(sd)
    with pytest.raises(StudioError, match=r"sd15.safetensors does not fit this base \(a custom-size SD model\): module "
                                          r"'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k' needs A "
                                          r"of shape \(1, 32\) but the file has \(1, 320\); the file seems made for SD1.5"):
        F.attach_file(F.read(tmp_path / "sd15.safetensors"), models, "x")
    assert not any("Adapted" in type(m).__name__ for m in models["unet"].modules())  # nothing attached


def test_an_sd15_adapter_on_an_sdxl_base(sd, tmp_path):
    af = F.from_models(train(copies(sd), "lora"), "a", base="sd15")
    te1, te2 = tiny_sdxl_text_encoders()
    with pytest.raises(StudioError, match="is an SD1.5 adapter but the base is SDXL: load it on an SD1.5 base"):
        F.attach_file(af, {"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}, "x")


def test_language_model_and_diffusion_adapters_stay_on_their_bases(sd):
    lm = F.from_models(train({"lm": tiny_llama()}, "lora"), "a")
    with pytest.raises(StudioError, match="is a language-model adapter: load it on a language model"):
        F.attach_file(lm, copies(sd), "x")
    image = F.from_models(train(copies(sd), "lora"), "a")
    with pytest.raises(StudioError, match="is a Stable Diffusion adapter: load it on a diffusion base"):
        F.attach_file(image, {"lm": tiny_llama()}, "x")


def test_a_failure_part_way_leaves_no_adapter_attached(sd):
    af = F.from_models(train(copies(sd), "lora"), "a")
    models = copies(sd)
    import studio.adapters as A
    A.attach(models["te"], "x", "lora", targets="te-attn")  # the name is taken on the text encoder only
    with pytest.raises(StudioError, match="already attached"):
        F.attach_file(af, models, "x")
    assert "x" not in A.adapter_names(models["unet"])


# -- half precision ----------------------------------------------------------------------------
def _scaled_lora(sd, factors: dict[str, float]):
    models = train(copies(sd), "lora")
    for model in models.values():
        for path, layer in adapted_layers(model).items():
            for key, f in factors.items():
                if key in path:
                    with torch.no_grad():
                        layer.adapters["a"].B.mul_(f)
    return models


@pytest.mark.parametrize("factor,why", [(1e11, "overflow"), (1e-11, "underflow")])
def test_half_precision_rescales_instead_of_overflowing_or_underflowing(sd, tmp_path, factor, why):
    models = _scaled_lora(sd, {"": factor})
    report = F.save(F.from_models(models, "a"), tmp_path / "h.safetensors", "kohya", dtype="fp16")
    assert len(report.notes) == 1 and why in report.notes[0] and "delta is unchanged" in report.notes[0]
    fresh = copies(sd)
    F.attach_file(F.read(tmp_path / "h.safetensors"), fresh, "b")
    got, want = deltas(fresh, "b"), deltas(models, "a")
    for key, dW in want.items():
        assert (got[key] - dW).norm() <= 5e-3 * dW.norm(), key


def test_half_precision_refuses_a_range_it_cannot_hold(sd, tmp_path):
    models = _scaled_lora(sd, {"attn1.to_q": 1e7, "attn2.to_k": 1e-7})
    af = F.from_models(models, "a")
    with pytest.raises(StudioError, match="span more than fp16 can hold.*--dtype fp32 or bf16"):
        F.save(af, tmp_path / "h.safetensors", "kohya", dtype="fp16")
    assert not (tmp_path / "h.safetensors").exists()
    F.save(af, tmp_path / "h.safetensors", "kohya", dtype="bf16")  # bf16 has the range


def test_a_diverged_adapter_is_not_exported(sd, tmp_path):
    models = _scaled_lora(sd, {"attn1.to_q": float("nan")})
    with pytest.raises(StudioError, match="NaN"):
        F.save(F.from_models(models, "a"), tmp_path / "x.safetensors", "kohya")


# -- writing -----------------------------------------------------------------------------------
def test_outputs_are_checked_before_any_work(sd, tmp_path):
    af = F.from_models(train(copies(sd), "lora"), "a")
    (tmp_path / "old.safetensors").write_bytes(b"precious")
    with pytest.raises(StudioError, match="old.safetensors already exists: pass --overwrite"):
        F.save(af, tmp_path / "old.safetensors", "kohya")
    with pytest.raises(StudioError, match="must be a .safetensors file"):
        F.save(af, tmp_path / "x.pt", "kohya")
    with pytest.raises(StudioError, match="does not exist: create it first"):
        F.save(af, tmp_path / "no" / "x.safetensors", "kohya")
    assert (tmp_path / "old.safetensors").read_bytes() == b"precious"


def test_written_files_get_ordinary_permissions(sd, tmp_path):
    af = F.from_models(train(copies(sd), "lora"), "a")
    F.save(af, tmp_path / "new.safetensors", "kohya")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(tmp_path / "new.safetensors", 0o640)
    F.save(af, tmp_path / "new.safetensors", "kohya", overwrite=True)
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode


def test_an_interrupted_write_keeps_the_previous_file(sd, tmp_path, monkeypatch):
    af = F.from_models(train(copies(sd), "lora"), "a")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def crash(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        F.save(af, target, "kohya", overwrite=True)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.safetensors"]  # no temp file left behind
