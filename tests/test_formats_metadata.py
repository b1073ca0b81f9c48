"""Header fields, the tensor hash, and what ``inspect`` reports."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import studio.formats as F
from builders import tiny_clip, tiny_unet
from formats_helpers import copies, train
from studio.formats.inspection import render_json, render_text

TRAINING = dict(title="Stripes", author="me", trigger_phrase="zq stripes, zq", training_comment="trigger: zq stripes",
                tag_frequency={"sample_data/styles/stripes": {"zq stripes": 12, "circle": 5, "square": 3}},
                steps=300, learning_rate=1e-4, seed=7, resolution=64, optimizer="AdamW")


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    models = train({"unet": tiny_unet(), "te": tiny_clip()}, "lora")
    return F.from_models(models, "a", base="sd15", metadata=F.training_metadata(**TRAINING))


def data_section_sha256(path) -> str:
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_kohya_header_fields(adapter, tmp_path):
    path = tmp_path / "stripes.safetensors"
    F.save(adapter, path, "kohya")
    meta = header(path)
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_v2": "False",
        "ss_base_model_version": "sd_v1", "ss_output_name": "stripes", "ss_training_comment": "trigger: zq stripes",
        "ss_steps": "300", "ss_learning_rate": "0.0001", "ss_seed": "7", "ss_resolution": "(64, 64)",
        "ss_optimizer": "AdamW", "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.title": "Stripes", "modelspec.author": "me", "modelspec.resolution": "64x64",
        "modelspec.trigger_phrase": "zq stripes, zq", "modelspec.prediction_type": "epsilon",
        "studio.format": "kohya", "studio.adapter_type": "lora", "studio.export_rank_policy": "exact",
        "studio.base": "sd15", "studio.dtype": "fp16",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_tag_frequency"]) == TRAINING["tag_frequency"]
    assert meta["modelspec.date"].startswith("20") and meta["modelspec.implementation_version"].startswith("adapter-studio/")
    digest = data_section_sha256(path)
    assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == "0x" + digest
    assert F.data_hash(path) == digest


def test_editing_metadata_keeps_the_tensor_hash(adapter, tmp_path):
    path = tmp_path / "a.safetensors"
    F.save(adapter, path, "kohya")
    meta = header(path)
    save_file(load_file(str(path)), str(tmp_path / "b.safetensors"), metadata={**meta, "modelspec.title": "renamed",
                                                                                "ss_training_comment": "x" * 999})
    assert data_section_sha256(tmp_path / "b.safetensors") == meta["sshs_model_hash"]
    info = F.inspect_file(tmp_path / "b.safetensors")
    assert info["hash"]["matches"] is True


def test_sdxl_and_diffusers_fields(adapter, tmp_path):
    F.save(adapter.replace(base="sdxl", parts={"unet": adapter.parts["unet"]}), tmp_path / "xl.safetensors", "kohya",
           unet_layout="diffusers")
    meta = header(tmp_path / "xl.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    F.save(adapter, tmp_path / "d.safetensors", "diffusers")
    meta = header(tmp_path / "d.safetensors")
    config = json.loads(meta["lora_adapter_metadata"])
    assert meta["format"] == "pt" and config["unet.r"] == 2 and config["unet.lora_alpha"] == 2.0
    assert config["text_encoder.r"] == 2 and "diffusers only" in meta["studio.note"]
    assert meta["sshs_model_hash"] == data_section_sha256(tmp_path / "d.safetensors")


def test_native_files_carry_the_exact_adapter_and_the_training_fields(adapter, tmp_path):
    F.save(adapter, tmp_path / "n.safetensors")
    meta = header(tmp_path / "n.safetensors")
    assert meta["studio.format"] == "native" and json.loads(meta["studio.adapter"])["unet"]["method"] == "lora"
    assert "ss_network_module" not in meta  # not a networks.lora file
    back = F.read(tmp_path / "n.safetensors")
    assert back.metadata["modelspec.trigger_phrase"] == "zq stripes, zq"
    assert "studio.adapter" not in back.metadata and "sshs_model_hash" not in back.metadata  # layout keys recomputed


def test_descriptive_fields_survive_conversions(adapter, tmp_path):
    F.save(adapter, tmp_path / "n.safetensors")
    F.save(F.read(tmp_path / "n.safetensors"), tmp_path / "k.safetensors", "kohya")
    F.save(F.read(tmp_path / "k.safetensors"), tmp_path / "k2.safetensors", "kohya")
    meta = header(tmp_path / "k2.safetensors")
    assert meta["ss_training_comment"] == "trigger: zq stripes" and meta["modelspec.title"] == "Stripes"
    assert meta["ss_output_name"] == "k2"  # A1111's alias follows the file unless one was given
    F.save(adapter.replace(metadata={**adapter.metadata, **F.training_metadata(output_name="zq-stripes")}),
           tmp_path / "k3.safetensors", "kohya")
    assert header(tmp_path / "k3.safetensors")["ss_output_name"] == "zq-stripes"


def test_inspect_reports_everything(adapter, tmp_path):
    path = tmp_path / "stripes.safetensors"
    F.save(adapter, path, "kohya")
    info = F.inspect_file(path)
    assert info["format"] == "kohya" and info["base"] == "sd15" and info["methods"] == {"unet": "lora", "te": "lora"}
    assert info["ranks"] == {"unet": [2], "te": [2]} and info["alphas"] == {"unet": [2.0], "te": [2.0]}
    assert info["modules"] == {"unet": 32, "te": 8} and info["dtypes"] == ["float16"]
    assert info["trigger_words"] == ["zq stripes", "zq"]
    assert info["top_tags"] == [("zq stripes", 12), ("circle", 5), ("square", 3)]
    assert info["hash"]["matches"] is True and info["hash"]["short"] == info["hash"]["sha256"][:12]
    assert info["metadata"]["ss_output_name"] == "stripes"
    text = render_text(info)
    for needle in ("format:    kohya", "SD1.5", "unet  lora     32 modules, rank 2, alpha 2", "trigger:   zq stripes, zq",
                   "zq stripes (12)", "matches metadata", "ss_network_module = networks.lora"):
        assert needle in text
    assert json.loads(render_json(info))["modules"]["te"] == 8
