"""canonical -> each format -> canonical, for every method (fp32: exact to float round-off)."""

import pytest
import torch

import studio.adapters as A
import studio.formats as F
from builders import tiny_clip, tiny_llama, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet
from formats_helpers import assert_deltas_close, copies, deltas, train
from studio.errors import StudioError

METHODS = ["lora", "pissa", "milora", "svf"]


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return {"unet": tiny_unet(), "te": tiny_clip()}


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(1)
    te1, te2 = tiny_sdxl_text_encoders()
    return {"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}


@pytest.fixture(scope="module")
def trained(sd):
    """One trained copy of the base per method (shared by the format cases)."""
    return {method: train(copies(sd), method) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", ["native", "kohya", "diffusers"])
def test_every_method_round_trips_through_every_format(sd, trained, tmp_path, method, fmt):
    models = trained[method]
    af = F.from_models(models, "a")
    path = tmp_path / f"{method}.safetensors"
    report = F.save(af, path, fmt, dtype=None if fmt == "native" else "fp32", models=models)
    back = F.read(path)
    assert back.source["format"] == fmt
    if fmt == "native":  # the exact object, method and tensors
        assert back.method == method and back.base == af.base
        for c, part in af.parts.items():
            assert back.parts[c].config == part.config
            assert back.parts[c].tensors.keys() == part.tensors.keys()
            for k, v in part.tensors.items():
                assert torch.equal(back.parts[c].tensors[k], v)
    else:  # a plain LoRA with the same delta
        assert back.method == "lora" and report.energy == pytest.approx(1.0)
        if method in ("pissa", "milora"):
            assert report.ranks == [4]  # rank <= 2r, exact
    F.attach_file(back, sd, "b")  # on the pristine base (SVF checks it is the same weight)
    try:
        assert_deltas_close(deltas(sd, "b"), deltas(models, "a"), rtol=1e-5)
    finally:
        F.detach_file(sd, "b")


def test_sdxl_round_trips_in_both_unet_layouts(sdxl, tmp_path):
    models = train(copies(sdxl), "lora")
    af = F.from_models(models, "a")
    assert af.base == "sdxl" and set(af.parts) == {"unet", "te1", "te2"}
    for layout in ("sgm", "diffusers"):
        path = tmp_path / f"{layout}.safetensors"
        F.save(af, path, "kohya", dtype="fp32", unet_layout=layout)
        back = F.read(path)
        assert back.base == "sdxl" and back.source["unet_layout"] == layout
        fresh = copies(sdxl)
        F.attach_file(back, fresh, "b")
        assert_deltas_close(deltas(fresh, "b"), deltas(models, "a"))


def test_plain_lora_factors_are_sorted_and_balanced(trained):
    models = trained["pissa"]
    factors, summary = F.plain_lora(F.from_models(models, "a"), F.export.Policy())
    for mods in factors.values():
        for f in mods.values():
            col = f.up.norm(dim=0)
            row = f.down.norm(dim=1)
            torch.testing.assert_close(col, row, rtol=1e-4, atol=1e-6)     # magnitude split evenly
            assert torch.all(col[:-1] >= col[1:] - 1e-6)                     # ordered by singular value
    assert summary["energy"] == pytest.approx(1.0)


def test_pissa_export_never_stores_the_cancelling_initial_factors(sd):
    models = train(copies(sd), "pissa", scale=1e-3)
    af = F.from_models(models, "a")
    factors, _ = F.plain_lora(af, F.export.Policy())
    scale = A.make_config("pissa", af.parts["unet"].config).scale
    for component, part in af.parts.items():
        for path, tensors in part.modules().items():
            f = factors[component][path]
            nuclear = torch.linalg.svdvals(f.up @ f.down).sum()
            # balanced factors: ||up||_F^2 = ||down||_F^2 = ||dW||_* ...
            assert f.up.pow(2).sum() == pytest.approx(float(nuclear), rel=1e-4)
            # ... far below the principal part s B0 A0 of W0 that PEFT's concatenation would store
            assert f.up.pow(2).sum() < 0.1 * scale * tensors["B0"].pow(2).sum()


def test_svf_truncation_error_equals_the_dropped_singular_values(sd, trained, tmp_path):
    models = trained["svf"]
    af = F.from_models(models, "a")
    report = F.save(af, tmp_path / "svf3.safetensors", "kohya", rank=3, dtype="fp32", models=models)
    assert report.ranks == [3] and report.energy < 1.0
    back = F.read(tmp_path / "svf3.safetensors")
    F.attach_file(back, sd, "b")
    got, want = deltas(sd, "b"), deltas(models, "a")
    F.detach_file(sd, "b")
    for key, dW in want.items():
        S = torch.linalg.svdvals(dW.double())
        predicted = S[3:].pow(2).sum().sqrt()
        measured = (got[key].double() - dW.double()).norm()
        assert abs(measured - predicted) <= 1e-4 * predicted + 1e-7, key
        assert report.per_module[key] == pytest.approx(1 - (S[3:] ** 2).sum().item() / (S ** 2).sum().item(), abs=1e-5)
    meta = back.source["header"]
    assert float(meta["studio.energy_retained_total"]) == pytest.approx(report.energy, abs=1e-6)
    assert meta["studio.export_rank_policy"] == "rank=3"


def test_svf_energy_threshold_keeps_enough_per_module(trained, tmp_path):
    models = trained["svf"]
    report = F.save(F.from_models(models, "a"), tmp_path / "e.safetensors", "kohya", energy=0.9, dtype="fp32",
                    models=models)
    assert min(report.per_module.values()) >= 0.9 and report.energy < 1.0
    assert len(report.ranks) > 1  # dynamic ranks


def test_svf_needs_its_base_to_become_a_lora(trained, tmp_path):
    af = F.from_models(trained["svf"], "a")
    with pytest.raises(StudioError, match="needs its base model: pass --base"):
        F.save(af, tmp_path / "x.safetensors", "kohya")


def test_language_model_adapters_save_natively_and_refuse_sd_layouts(tmp_path):
    models = train({"lm": tiny_llama()}, "lora")
    af = F.from_models(models, "a")
    assert af.base == "lm"
    F.save(af, tmp_path / "lm.safetensors", "native")
    fresh = {"lm": tiny_llama()}  # a LoRA delta does not depend on the base weights
    F.attach_file(F.read(tmp_path / "lm.safetensors"), fresh, "b")
    assert_deltas_close(deltas(fresh, "b"), deltas(models, "a"), rtol=0)
    for fmt in ("kohya", "diffusers", "peft"):
        with pytest.raises(StudioError, match="--format peft|Stable Diffusion"):
            F.save(af, tmp_path / f"lm-{fmt}.safetensors", fmt)


def _factor_pairs(model, targets, rank=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, module in A.find_targets(model, targets).items():
        out[path] = (torch.randn(rank, module.in_features, generator=g), torch.randn(module.out_features, rank, generator=g))
    return out


@pytest.mark.parametrize("layout", ["processor", "lora.down", "peft-no-metadata", "kohya-te1"])
def test_older_and_foreign_layouts_import(sd, tmp_path, layout):
    """Attention-processor names (to_q_lora.down), lora.down / lora_linear_layer, bare PEFT keys
    (scale 1) and an SD1 kohya file written with lora_te1_ all read into the same plain LoRA."""
    from safetensors.torch import save_file
    unet, te = _factor_pairs(sd["unet"], "unet-attn"), _factor_pairs(sd["te"], "te-attn")
    tensors = {}
    for path, (down, up) in unet.items():
        if layout == "processor":
            proj = path.split(".")[-1] if not path.endswith("to_out.0") else "to_out"
            module = path[: path.rindex(".to_")]
            key = f"unet.{module}.processor.{proj}_lora"
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        elif layout == "lora.down":
            tensors[f"unet.{path}.lora.down.weight"], tensors[f"unet.{path}.lora.up.weight"] = down, up
        elif layout == "peft-no-metadata":
            tensors[f"unet.{path}.lora_A.weight"], tensors[f"unet.{path}.lora_B.weight"] = down, up
        else:
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(3.0)
    for path, (down, up) in te.items():
        if layout == "processor":
            proj = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[path.split(".")[-1]]
            key = f"text_encoder.text_model.{path.rpartition('.')[0]}.{proj}_lora"
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        elif layout == "lora.down":
            key = f"text_encoder.text_model.{path}.lora_linear_layer"
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        elif layout == "peft-no-metadata":
            tensors[f"text_encoder.{path}.lora_A.weight"], tensors[f"text_encoder.{path}.lora_B.weight"] = down, up
        else:
            name = "lora_te1_text_model_" + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
    save_file(tensors, str(tmp_path / "old.safetensors"))
    af = F.read(tmp_path / "old.safetensors")
    assert set(af.parts) == {"unet", "te"} and af.method == "lora"
    F.attach_file(af, sd, "old")
    try:
        got = deltas(sd, "old")
    finally:
        F.detach_file(sd, "old")
    for component, pairs in (("unet", unet), ("te", te)):
        for path, (down, up) in pairs.items():
            torch.testing.assert_close(got[f"{component}.{path}"], up @ down, rtol=1e-5, atol=1e-5)
