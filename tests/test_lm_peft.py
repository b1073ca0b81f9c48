"""`--format peft`: PEFT loads our exported language-model adapters and computes what the studio computes."""

import copy
import json

import pytest
import torch

import studio.adapters as A
from builders import tiny_gpt2, tiny_llama
from studio import formats
from studio.errors import StudioError

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _trained(arch: str, method: str, targets="lm-attn,lm-mlp"):
    """(pristine base copy, adapted model, AdapterFile) with every adapter parameter moved off its init."""
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    base = copy.deepcopy(model)
    cfg = A.make_config(method, {} if method == "svf" else {"rank": 4})
    A.attach(model, "task", method, cfg, targets.split(","))
    with torch.no_grad():
        for p in A.trainable_parameters(model, "task"):
            p.add_(0.2 * torch.randn_like(p))
    return base, model, formats.from_models({"lm": model}, "task")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_peft_loads_the_export_and_matches_the_merged_model(tmp_path, arch, method):
    from peft import PeftModel

    base, model, af = _trained(arch, method)
    report = formats.save(af, tmp_path / "peft", "peft")
    assert report.energy == pytest.approx(1.0) and report.relative_error < 1e-6
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    if method == "pissa":  # exact plain LoRA of rank <= 2r
        assert max([config["r"], *config["rank_pattern"].values()]) <= 8
    ids = torch.randint(0, 100, (2, 12))
    A.merge(model)
    ours, plain = _logits(model, ids), _logits(base, ids)
    assert (ours - plain).abs().max() > 1e-2  # the adapter does something
    theirs = _logits(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_svf_exports_at_a_rank_with_the_retained_energy_reported(tmp_path):
    from peft import PeftModel

    base, model, af = _trained("llama", "svf", "lm-attn")
    with pytest.raises(StudioError, match="needs its base model"):
        formats.save(af, tmp_path / "nobase", "peft")
    full = formats.save(af, tmp_path / "full", "peft", models={"lm": model})
    cut = formats.save(af, tmp_path / "cut", "peft", rank=2, models={"lm": model})
    assert full.energy == pytest.approx(1.0) and 0.0 < cut.energy < 1.0 and cut.ranks == [2]
    ids = torch.randint(0, 100, (1, 10))
    A.merge(model)
    theirs = _logits(PeftModel.from_pretrained(base, str(tmp_path / "full")).eval(), ids)
    torch.testing.assert_close(theirs, _logits(model, ids), atol=1e-5, rtol=0)


def test_peft_refuses_diffusion_adapters_and_existing_folders(tmp_path):
    from builders import tiny_unet

    unet = tiny_unet()
    A.attach(unet, "style", "lora", A.make_config("lora", {"rank": 2}), "unet-attn")
    sd = formats.from_models({"unet": unet}, "style")
    with pytest.raises(StudioError, match="Stable Diffusion adapter: export it with --format kohya"):
        formats.save(sd, tmp_path / "x", "peft")
    _, _, af = _trained("llama", "lora")
    formats.save(af, tmp_path / "out", "peft")
    with pytest.raises(StudioError, match="already exists and is not empty: pass --overwrite"):
        formats.save(af, tmp_path / "out", "peft")
    with pytest.raises(StudioError, match="Stable Diffusion adapters; language-model adapters export with --format peft"):
        formats.save(af, tmp_path / "lm.safetensors", "kohya")
    formats.save(af, tmp_path / "out", "peft", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
