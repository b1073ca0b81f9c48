"""bake: the baked file reproduces the live mix (exact mode) or reports its error (at a rank)."""

import json
import math

import pytest
import torch

import studio.adapters as A
import studio.formats as F
from builders import tiny_clip, tiny_llama, tiny_unet
from formats_helpers import copies, deltas, linear_weights, train
from studio.errors import StudioError

ATTN1 = {"unet": r".*attn1\.to_(q|v)", "te": r".*q_proj"}       # a subset: the union must be taken
ATTN2 = {"unet": r".*attn2\.to_(k|out\.0)"}                     # UNet only


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return {"unet": tiny_unet(), "te": tiny_clip()}


@pytest.fixture(scope="module")
def mix(sd):
    """Three adapters of three methods on overlapping module sets, as files, plus their live mix."""
    models = copies(sd)
    train(models, "lora", name="l", seed=1)
    train(models, "pissa", name="p", seed=2, targets=ATTN1)
    train({"unet": models["unet"]}, "svf", name="s", seed=3, targets=ATTN2)
    files = {n: F.from_models(models, n) for n in ("l", "p", "s")}
    weights = [("l", 0.8, 0.2), ("p", -0.3, None), ("s", 0.5, None)]
    for name, w, te_w in weights:
        F.set_file_weight(models, name, w, te_w)
    expected = {}
    for component, model in models.items():
        for name, w, te_w in weights:
            if name not in A.adapter_names(model):
                continue
            for path, dW in A.delta_weights(model, name).items():
                use = te_w if component == "te" and te_w is not None else w
                key = f"{component}.{path}"
                expected[key] = expected.get(key, 0) + use * dW
    for model in models.values():
        A.merge(model)
    live = {c: linear_weights(m) for c, m in models.items()}
    inputs = [(files[n], w, te_w) for n, w, te_w in weights]
    return inputs, live, expected


def test_exact_bake_reproduces_the_live_mix(sd, mix, tmp_path):
    inputs, live, _ = mix
    baked, summary = F.bake(inputs, models=sd)
    assert summary["energy"] == pytest.approx(1.0) and summary["relative_error"] < 1e-6
    F.save(baked, tmp_path / "mix.safetensors", "kohya", dtype="fp32")
    back = F.read(tmp_path / "mix.safetensors")
    assert back.module_counts() == {"unet": 32, "te": 8}  # the union of the three adapters' modules
    fresh = copies(sd)
    F.attach_file(back, fresh, "mix")
    for model in fresh.values():
        A.merge(model)
    for component, model in fresh.items():
        for path, W in linear_weights(model).items():
            torch.testing.assert_close(W, live[component][path], atol=1e-5, rtol=1e-5)
    sources = json.loads(back.source["header"]["studio.baked_from"])
    assert [s["weight"] for s in sources] == [0.8, -0.3, 0.5] and sources[0]["te_weight"] == 0.2


def test_bake_at_a_rank_reports_its_error(sd, mix, tmp_path):
    inputs, _, expected = mix
    baked, summary = F.bake(inputs, rank=2, models=sd)
    F.save(baked, tmp_path / "r2.safetensors", "kohya", dtype="fp32")
    fresh = copies(sd)
    F.attach_file(F.read(tmp_path / "r2.safetensors"), fresh, "mix")
    got = deltas(fresh, "mix")
    squared, total = 0.0, 0.0
    for key, dW in expected.items():
        squared += (got[key].double() - dW.double()).pow(2).sum().item()
        total += dW.double().pow(2).sum().item()
        S = torch.linalg.svdvals(dW.double())  # per module: the Eckart-Young optimum
        assert float((got[key].double() - dW.double()).norm()) == pytest.approx(float(S[2:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-6)
    assert summary["error"] == pytest.approx(math.sqrt(squared), rel=1e-4)
    assert summary["relative_error"] == pytest.approx(math.sqrt(squared / total), rel=1e-4)
    assert 0 < summary["energy"] < 1


def test_bake_refuses_adapters_of_different_bases(sd):
    image = F.from_models(train(copies(sd), "lora"), "a")
    lm = F.from_models(train({"lm": tiny_llama()}, "lora"), "a")
    with pytest.raises(StudioError, match="different bases"):
        F.bake([(image, 1.0, None), (lm, 1.0, None)])
