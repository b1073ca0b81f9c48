"""trainers/optimizers.py: every optimizer steps, checkpoints and resumes exactly; schedule-free's
evaluation weights; LoRA+ groups as PEFT forms them; the bad --optimizer / --loraplus-ratio input."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import studio.adapters as A
from builders import tiny_llama
from cli_helpers import one_error_line
from studio.cli import main
from trainers import loop, optimizers

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


def _names():
    return list(optimizers.OPTIMIZERS)  # adamw8bit included: bitsandbytes' CPU build is a test dependency


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(96, 64, generator=g) * 0.1)   # 6144 values: 8-bit state
    b = torch.nn.Parameter(torch.zeros(96))
    x, y = torch.randn(32, 64, generator=g), torch.randn(32, 96, generator=g)
    return [W, b], x, y


def _steps(params, optimizer, schedule, x, y, n):
    for _ in range(n):
        loss = ((x @ params[0].T + params[1] - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return loss.item()


@pytest.mark.parametrize("name", _names())
def test_each_optimizer_trains_and_resumes_bit_identically(name):
    params, x, y = _problem()
    first = ((x @ params[0].T + params[1] - y) ** 2).mean().item()
    opt = loop.make_optimizer([(params, 1e-2)], name)
    sched = loop.make_schedule(opt, "constant", 0, 10, name)
    _steps(params, opt, sched, x, y, 3)
    saved = [p.detach().clone() for p in params]
    states = copy.deepcopy({"optimizer": opt.state_dict(), "schedule": sched.state_dict()})  # as a checkpoint keeps it
    last = _steps(params, opt, sched, x, y, 3)
    straight = [p.detach().clone() for p in params]
    assert last < first  # it trains

    again, _, _ = _problem()
    with torch.no_grad():
        for p, v in zip(again, saved):
            p.copy_(v)
    opt2 = loop.make_optimizer([(again, 1e-2)], name)
    sched2 = loop.make_schedule(opt2, "constant", 0, 10, name)
    opt2.load_state_dict(states["optimizer"])
    sched2.load_state_dict(states["schedule"])
    _steps(again, opt2, sched2, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(straight, again))


def test_adamw8bit_keeps_8_bit_moments_on_cpu():
    params, x, y = _problem()
    opt = loop.make_optimizer([(params, 1e-2)], "adamw8bit")
    _steps(params, opt, loop.make_schedule(opt, "constant", 0, 2), x, y, 1)
    assert opt.state[params[0]]["state1"].dtype == torch.uint8  # the 6144-value matrix
    assert opt.state[params[1]]["state1"].dtype == torch.float32  # bitsandbytes keeps small tensors in fp32


def test_schedule_free_evaluation_swaps_in_the_average_and_restores_exactly():
    params, x, y = _problem()
    opt = loop.make_optimizer([(params, 1e-2)], "schedulefree")
    _steps(params, opt, loop.make_schedule(opt, "constant", 0, 10, "schedulefree"), x, y, 4)
    trained = [p.detach().clone() for p in params]
    z, beta1 = opt.state[params[0]]["z"], opt.param_groups[0]["betas"][0]
    with optimizers.evaluation("schedulefree", opt):
        # x = (y - (1 - beta1) z) / beta1: the average the package's eval() computes
        expected = (trained[0] - (1 - beta1) * z) / beta1
        assert torch.allclose(params[0], expected, atol=1e-6) and not torch.equal(params[0], trained[0])
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert opt.param_groups[0]["train_mode"]


def test_prodigy_takes_its_multiplier_for_every_group():
    params, _, _ = _problem()
    opt = loop.make_optimizer([([params[0]], 1e-3), ([params[1]], 5e-4)], "prodigy", {"d_coef": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0] and opt.param_groups[0]["d_coef"] == 0.5
    assert opt.param_groups[0]["safeguard_warmup"] and opt.param_groups[0]["use_bias_correction"]


def test_relora_pruning_zeroes_the_smallest_moments():
    params, x, y = _problem()
    opt = loop.make_optimizer([(params, 1e-2)], "adamw")
    _steps(params, opt, loop.make_schedule(opt, "constant", 0, 10), x, y, 2)
    before = opt.state[params[0]]["exp_avg"].clone()
    optimizers.prune_state("adamw", opt, params, 0.99)
    after = opt.state[params[0]]["exp_avg"]
    kept = after != 0
    assert kept.sum().item() == before.numel() - int(0.99 * before.numel())
    assert before.abs()[kept].min() >= before.abs()[~kept].max() and torch.equal(after[kept], before[kept])
    optimizers.prune_state("adamw", opt, params, 1.0)
    assert params[0] not in opt.state  # a reset: re-initialised on the next step


def test_loraplus_groups_match_peft():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs = tiny_llama(), tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    A.attach(ours, "x", "lora", A.lora.Config(rank=4), targets)
    groups = optimizers.loraplus_groups([(A.trainable_parameters(ours, "x"), 2e-4)], [ours], "x", 16.0)
    optimizer = loop.make_optimizer(groups, "adamw")
    peft_model = get_peft_model(theirs, LoraConfig(r=4, target_modules=targets))
    reference = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0)

    def ours_named(p):
        for path, layer in A.targets.adapted_layers(ours).items():
            for key, q in layer.adapters["x"].named_parameters():
                if q is p:
                    return f"{path}.{key}"

    def peft_named(p):
        name = next(n for n, q in peft_model.named_parameters() if q is p)
        path = name.removeprefix("base_model.model.").replace(".default", "")
        return path.replace(".lora_A.weight", ".A").replace(".lora_B.weight", ".B")

    mine = sorted((g["lr"], sorted(ours_named(p) for p in g["params"])) for g in optimizer.param_groups)
    peft = sorted((g["lr"], sorted(peft_named(p) for p in g["params"])) for g in reference.param_groups if g["params"])
    assert mine == peft and len(mine) == 2 and mine[1][0] == pytest.approx(16 * 2e-4)


def test_loraplus_refuses_a_method_without_up_factors():
    with pytest.raises(A.StudioError, match="--method svf has none"):
        optimizers.check_loraplus("svf", A.svf.Config())
    optimizers.check_loraplus("pissa", A.pissa.Config(rank=2))  # B is PiSSA's up factor too


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def test_adafactor_with_loraplus_trains_and_writes_kohya_metadata(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2", "--optimizer", "adafactor",
                 "--loraplus-ratio", "16", "--optimizer-args", "clip_threshold=0.5"]) == 0
    with safe_open(str(out / "stripes.kohya.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16"}
    assert meta["ss_optimizer"] == "Adafactor"
    assert json.loads(meta["studio.optimizer_args"]) == {"clip_threshold": 0.5}


def test_bad_optimizer_input_is_one_error_line(data, tmp_path, capsys, monkeypatch):
    base = ["train", str(data), "--out", str(tmp_path / "never")]
    message = one_error_line(capsys, [*base, "--optimizer", "prodigy", "--optimizer-args", "dcoef=2"])
    assert "unknown --optimizer-args ['dcoef'] for --optimizer prodigy" in message and "d_coef" in message
    assert "choose one of adamw, adamw8bit" in one_error_line(capsys, [*base, "--optimizer", "lion"])
    message = one_error_line(capsys, [*base, "--optimizer", "schedulefree", "--lr-schedule", "cosine"])
    assert "--lr-schedule constant" in message
    assert "--loraplus-ratio must be > 0" in one_error_line(capsys, [*base, "--loraplus-ratio", "0"])
    assert "one learning rate" in one_error_line(capsys, [*base, "--optimizer", "prodigy", "--loraplus-ratio", "4"])
    assert "has none" in one_error_line(capsys, [*base, "--method", "svf", "--loraplus-ratio", "4"])

    def missing():
        raise ImportError("no module named prodigyopt")

    monkeypatch.setitem(optimizers.OPTIMIZERS, "prodigy", dataclasses.replace(optimizers.OPTIMIZERS["prodigy"], load=missing))
    assert "pip install prodigyopt" in one_error_line(capsys, [*base, "--optimizer", "prodigy"])
    assert not (tmp_path / "never").exists()
