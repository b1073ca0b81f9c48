"""Validation loss (trainers/validation.py): the same numbers in two runs and across a kill + resume,
``--keep-best`` holds the adapter of the lowest logged value, and the bad input is one error line."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_helpers import one_error_line
from studio.cli import main
from trainers import validation

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def _args(data, out, cache):
    # --unet-lr 0.03: at this LR the held-out loss turns upwards before the last step (see
    # test_keep_best_...), so "best" and "last" are different adapters
    return ["train", str(data), "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--sample-every", "0",
            "--save-every", "2", "--save-adapter-every", "1", "--unet-lr", "0.03", "--val-split", "0.25",
            "--val-every", "1", "--keep-best", "--set", f"cache_dir={cache}", "--set", "sample_steps=2"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    assert main(_args(data, root / "run", root / "cache")) == 0
    return root / "run"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _records(run: Path) -> list[dict]:
    return validation.read_records(run / validation.RECORD)


def test_validation_loss_is_identical_across_two_runs(straight, data, tmp_path):
    records = _records(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    values = [r["val_loss"] for r in records]
    assert all(math.isfinite(v) and v > 0 for v in values) and len(set(values)) == STEPS  # it moves as it trains
    assert main(_args(data, tmp_path / "again", tmp_path / "cache")) == 0
    assert _records(tmp_path / "again") == records  # loss, lr and val_loss equal to the last bit
    assert _same_tensors(tmp_path / "again" / "stripes-best.safetensors", straight / "stripes-best.safetensors")


def test_keep_best_is_the_adapter_at_the_lowest_logged_val_loss(straight):
    records = _records(straight)
    best = min(records, key=lambda r: r["val_loss"])["step"]  # ties: min keeps the earliest, as --keep-best does
    assert best < STEPS, records  # the curve turns upward, so best is not simply the last adapter
    kept = straight / "stripes-best.safetensors"
    assert _same_tensors(kept, straight / f"stripes-step{best:07d}.safetensors")
    assert not _same_tensors(kept, straight / "stripes.safetensors")
    with safe_open(str(kept), "pt") as f:
        assert f.metadata()["ss_steps"] == str(best)


class Killed(Exception):
    pass


def test_resume_after_a_kill_keeps_validation_and_best(straight, data, tmp_path, monkeypatch):
    """Killed right after recording step 3 (its validation done, its best file written), so the
    resume from the step-2 checkpoint must drop record 3 and redo it to the same numbers."""
    out = tmp_path / "killed"
    write = validation.LossLog.write

    def dying_write(self, step, *args):
        write(self, step, *args)
        if step == 3:
            raise Killed

    monkeypatch.setattr(validation.LossLog, "write", dying_write)
    with pytest.raises(Killed):
        main(_args(data, out, tmp_path / "cache"))
    monkeypatch.setattr(validation.LossLog, "write", write)
    assert [r["step"] for r in _records(out)] == [1, 2, 3] and not (out / "stripes.safetensors").exists()
    assert main(["train", "--resume", str(out)]) == 0
    assert _records(out) == _records(straight)
    assert (out / validation.RECORD).read_text().count("\n") == STEPS  # one line per step: no repeated record
    for name in ("stripes.safetensors", "stripes-best.safetensors"):
        assert _same_tensors(out / name, straight / name), name


def test_held_out_split_is_a_seeded_partition():
    items = list(range(10))
    train, held = validation.held_out(items, 0.25, 7, "data")
    assert len(held) == round(0.25 * 10) and sorted(train + held) == items  # disjoint, nothing lost
    assert validation.held_out(items, 0.25, 7, "data") == (train, held)  # the seed alone picks them
    assert any(validation.held_out(items, 0.25, s, "data")[1] != held for s in range(8, 12))
    assert len(validation.held_out(items, 0.01, 0, "data")[1]) == 1  # at least one image


def test_val_data_folder_is_scored_and_not_trained_on(data, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    for png in sorted(STYLE.glob("*.png"))[10:12]:
        shutil.copy(png, held)
        shutil.copy(png.with_suffix(".txt"), held)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "2", "--sample-every", "0", "--val-data", str(held),
                 "--val-every", "0", "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2"]) == 0
    records = _records(out)
    assert "val_loss" not in records[0] and math.isfinite(records[1]["val_loss"])  # --val-every 0: at the end only
    with safe_open(str(out / "stripes.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "4"  # every data image trains; the folder is extra


def test_bad_validation_input_is_one_error_line_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(data), "--out", str(out), "--steps", "2", "--sample-every", "0",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    line = one_error_line(capsys, [*base, "--val-split", "0.9"])
    assert "--val-split 0.9 leaves no training images" in line and str(data) in line and "4 images" in line
    assert "--keep-best needs a validation loss" in one_error_line(capsys, [*base, "--keep-best"])
    assert "--val-split must be in [0, 1)" in one_error_line(capsys, [*base, "--val-split", "1"])
    assert "both given" in one_error_line(capsys, [*base, "--val-split", "0.25", "--val-data", str(data)])
    assert "--val-every must be >= 0" in one_error_line(capsys, [*base, "--val-split", "0.25", "--val-every", "-1"])
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_evaluation_after_a_fused_step_sees_the_new_factors():
    """Fused AdamW writes the parameters without bumping their version counters, which key the
    adapter layers' cached stacked factors (1x1-conv proj_in / proj_out here) under no_grad: the
    trainer's after-step hook (extras.Extras.stepped) must invalidate them, or validation and
    samples run on an earlier step's adapter."""
    from types import SimpleNamespace

    import studio.adapters as A
    from builders import tiny_unet
    from trainers import extras, loop

    torch.manual_seed(0)
    unet = tiny_unet()
    unet.requires_grad_(False)
    A.attach(unet, "a", "lora", A.registry.make_config("lora", {"rank": 4}), "unet-transformer")
    params = A.trainable_parameters(unet, "a")
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 7, 32, generator=g)
    optimizer = loop.make_optimizer([(params, 1e-2)], "adamw")
    schedule = loop.make_schedule(optimizer, "constant", 0, 10)
    cfg = SimpleNamespace(relora_every=None, ema_decay=None, optimizer="adamw")
    extra = extras.Extras(cfg, {"unet": unet}, "a", optimizer, params)

    def evaluated():
        with validation.evaluating([unet]):
            return unet(x, t, encoder_hidden_states=ctx).sample

    for _ in range(2):
        before = evaluated()  # fills the layers' caches
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        loop.apply_step(None, params, optimizer, schedule, 0.0, 1, after=extra.hooks(0, 10))
        with torch.enable_grad():  # with gradients the layers never use their cache
            fresh = unet(x, t, encoder_hidden_states=ctx).sample.detach()
        assert not torch.equal(fresh, before)  # the step moved the adapter
        assert torch.equal(evaluated(), fresh)


def test_keep_best_under_relora_holds_the_folded_adapter(data, tmp_path):
    """ReLoRA's restarted factors alone are not the adapter: the best file is folded like every other file
    (the accumulated delta + the live factors), equal to the per-step file of the best step."""
    out = tmp_path / "run"
    assert main(_args(data, out, tmp_path / "cache") + ["--relora-every", "2"]) == 0
    records = _records(out)
    best = min(records, key=lambda r: r["val_loss"])["step"]
    kept = out / "stripes-best.safetensors"
    assert _same_tensors(kept, out / f"stripes-step{best:07d}.safetensors") if best < STEPS else \
        _same_tensors(kept, out / "stripes.safetensors")
    if best > 2:  # after the first restart the folded file has twice the live rank (the default 8)
        assert {t.shape[0] for k, t in _tensors(kept).items() if k.endswith(".A")} == {16}
