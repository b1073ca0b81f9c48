"""Load order of the trainers with --base-dtype: the adapters are initialised on the fp32 base, the
frozen base is cast, and only then does anything go to the device. Measured at the trainers' one
move to the device (the pipeline's / model's ``.to``): a bf16 base arrives there with half the frozen
bytes of an fp32 one, and with exactly the same initial adapter tensors."""

import shutil
from pathlib import Path

import pytest
import torch

from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from studio.adapters.layer import Adapter
from studio.cli import main
from trainers import memory

STYLE = Path(__file__).resolve().parents[1] / "sample_data" / "styles" / "stripes"


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:2]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


class Moved(Exception):
    """Raised at the move to the device: what arrives there is all a test needs."""


def _arrival(models: list[torch.nn.Module]) -> tuple[int, set, dict[str, torch.Tensor]]:
    """(floating frozen bytes, their dtypes, every adapter tensor by path) of ``models`` as they are."""
    frozen, dtypes, adapters = 0, set(), {}
    for i, model in enumerate(models):
        keep = memory.adapter_parameters(model)
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in keep and t.is_floating_point():
                frozen += t.numel() * t.element_size()
                dtypes.add(t.dtype)
        for path, module in model.named_modules():
            if isinstance(module, Adapter):
                adapters |= {f"{i}.{path}.{k}": v.detach().clone() for k, v in module.state().items()}
    return frozen, dtypes, adapters


def _record_at(monkeypatch, cls, models_of) -> list:
    seen = []

    def to(self, *args, **kwargs):
        seen.append(_arrival(models_of(self)))
        raise Moved
    monkeypatch.setattr(cls, "to", to)
    return seen


def _same_start(fp32, bf16) -> None:
    (full, full_dtypes, want), (half, half_dtypes, got) = fp32, bf16
    assert full_dtypes == {torch.float32} and half_dtypes == {torch.bfloat16}
    assert half * 2 == full, (half, full)  # half the frozen bytes ever reach the device
    assert want and want.keys() == got.keys()
    for key in want:  # the inits read the fp32 W0 in both runs: bit-identical, fp32
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert all(t.dtype == torch.float32 for t in got.values() if t.is_floating_point())


@pytest.mark.parametrize("method, targets", [("pissa", "unet-transformer,te-attn"), ("dora", "unet-attn")])
def test_diffusion_base_is_cast_before_the_device_and_inits_see_fp32(data, tmp_path, monkeypatch, method, targets):
    from diffusers import DiffusionPipeline

    seen = _record_at(monkeypatch, DiffusionPipeline, lambda pipe: [pipe.unet, pipe.text_encoder, pipe.vae])
    for dtype in ("fp32", "bf16"):
        with pytest.raises(Moved):
            main(["train", str(data), "--out", str(tmp_path / dtype), "--method", method, "--targets", targets,
                  "--base-dtype", dtype, "--steps", "1", "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert len(seen) == 2  # one move per run, after the adapters exist
    _same_start(*seen)
    names = seen[0][2]
    assert any(k.endswith(".A0") for k in names) if method == "pissa" else any(k.endswith(".m") for k in names)
    assert any(k.startswith("1.") for k in names) == ("te-attn" in targets)  # text-encoder adapters arrive too


def test_language_model_is_cast_before_the_device_and_inits_see_fp32(tiny_lm, tmp_path, monkeypatch):  # noqa: F811
    from transformers import PreTrainedModel

    seen = _record_at(monkeypatch, PreTrainedModel, lambda model: [model])
    data = pirate_jsonl(tmp_path, 8)
    for dtype in ("fp32", "bf16"):
        with pytest.raises(Moved):
            main(["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(tmp_path / dtype),
                  "--method", "pissa", "--base-dtype", dtype, "--steps", "1"])
    assert len(seen) == 2
    _same_start(*seen)
