"""Routed mixtures (MoLoRA, MoV, MoLA, LoRAMoE) end to end: ``studio train`` on the mini base and on a tiny
Llama, native files that reload exactly, ``studio inspect``, kohya / lycoris / diffusers / PEFT exports and a
plain ``studio bake`` refused in one line, ``studio bake --freeze-gates`` (exact for a constant router, its
error measured otherwise), a mixture mixed in ``studio generate``, bad --method-args."""

import glob
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import studio.adapters as A
from cli_helpers import crash_at_step, one_error_line
from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from studio import formats
from studio.cli import main
from ui_helpers import ui_library  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["molora", "mov", "mola", "loramoe"]
BALANCED = ["mola", "loramoe"]  # the methods with a load-balancing loss
EXPERTS = {"mov": ("L",), "molora": ("A", "B"), "mola": ("A", "B"), "loramoe": ("A", "B")}
ROUTER = ("R", "c")
NO_DECAY = ["--optimizer-args", "weight_decay=0"]  # only a gradient moves a tensor


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("mixture") / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:4]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    return data


def _image_args(data: Path, out: Path, method: str, steps: int, *extra) -> list[str]:
    return ["train", str(data), "-o", str(out), "--method", method, "--steps", str(steps), "--batch-size", "2",
            "--sample-every", "0", "--set", f"cache_dir={data.parent / 'cache'}", "--set", "sample_steps=2", *extra]


def _lm_args(data: Path, base: Path, out: Path, method: str, steps: int, *extra) -> list[str]:
    return ["train", "--task", "lm", str(data), "--base", str(base), "--out", str(out), "--method", method,
            "--steps", str(steps), "--batch-size", "4", "--warmup-steps", "0", *extra]


def _image_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def _lm_losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(run / "logs" / "events.*"))
    log = EventAccumulator(events)
    log.Reload()
    return [e.value for e in log.Scalars("loss")]


@pytest.fixture(scope="module")
def runs(images, tiny_lm, tmp_path_factory):
    """Three steps of every method on both tasks, a checkpoint after each (MoLA on the LM with a profile)."""
    tmp = tmp_path_factory.mktemp("mixture_runs")
    text = pirate_jsonl(tmp, 16)
    out = {}
    for method in METHODS:
        run = out["image", method] = tmp / f"image-{method}"
        assert main(_image_args(images, run, method, 3, "--save-every", "1", *NO_DECAY)) == 0
        run = out["lm", method] = tmp / f"lm-{method}"
        profile = ["--method-args", "profile=inverted"] if method == "mola" else []
        assert main(_lm_args(text, tiny_lm, run, method, 3, "--save-every", "1", *profile, *NO_DECAY)) == 0
    return out


def _native(run: Path) -> Path:
    (path,) = [p for p in run.glob("*.safetensors") if not p.name.endswith(".kohya.safetensors")]
    return path


def _by_module(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    grouped = {}
    for key, value in tensors.items():
        path, _, name = key.rpartition(".")
        grouped.setdefault(path, {})[name] = value
    return grouped


# -- 1. training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["image", "lm"])
@pytest.mark.parametrize("method", METHODS)
def test_training_moves_every_router_and_expert(runs, task, method):
    run = runs[task, method]
    losses = _image_losses(run) if task == "image" else _lm_losses(run)
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert not list(run.glob("*.kohya.safetensors"))  # no plain-LoRA twin of a routed mixture
    af = formats.read(_native(run))
    assert af.method == method and A.registry.get(method).TRAITS.kind == "functional"
    # the last two checkpoints are kept; with no weight decay, Adam moves a tensor only after a gradient
    first = _by_module(load_file(str(run / "checkpoints" / "step-0000002" / "adapter.safetensors")))
    last = _by_module(load_file(str(run / "checkpoints" / "step-0000003" / "adapter.safetensors")))
    assert first.keys() == last.keys() and len(first) == sum(af.module_counts().values())
    for module, tensors in last.items():
        assert set(tensors) == set(EXPERTS[method] + ROUTER), (module, set(tensors))
        for name in EXPERTS[method] + ROUTER:
            assert not torch.equal(tensors[name], first[module][name]), (module, name)
        moved = (tensors[EXPERTS[method][-1]] - first[module][EXPERTS[method][-1]]).flatten(1).abs().amax(1) > 0
        needed = len(moved) if method != "mola" else af.parts[task if task == "lm" else "unet"].config["top_k"]
        assert moved.sum() >= needed, (module, moved)  # every expert of a soft mixture trains; top-k: at least k


@pytest.mark.parametrize("task", ["image", "lm"])
@pytest.mark.parametrize("method", BALANCED)
def test_balance_loss_is_added_to_the_training_loss_and_trains_the_router(images, tiny_lm, tmp_path, task, method):
    """One step at balance 0, b and 2b: the logged loss is L + b T (T > 0, the same T), and only the
    routers differ: at step 1 the experts' up-factors are zero, so only the balance loss reaches R."""
    text = pirate_jsonl(tmp_path, 16)
    logged, adapters = {}, {}
    for b in (0.0, 0.05, 0.1):
        out = tmp_path / f"b{b}"
        extra = ("--method-args", f"balance={b}", *NO_DECAY)
        args = (_image_args(images, out, method, 1, *extra) if task == "image" else
                _lm_args(text, tiny_lm, out, method, 1, *extra))
        assert main(args) == 0
        (logged[b],) = _image_losses(out) if task == "image" else _lm_losses(out)
        adapters[b] = _by_module(formats.read(_native(out)).tensors())
    term = logged[0.05] - logged[0.0]
    assert term > 1e-4, logged
    assert abs((logged[0.1] - logged[0.0]) - 2 * term) < 1e-3 * term + 1e-6, logged
    for module, tensors in adapters[0.0].items():
        assert torch.equal(tensors["A"], adapters[0.05][module]["A"])       # no expert saw the balance loss
        assert not torch.equal(tensors["R"], adapters[0.05][module]["R"])   # every router did



@pytest.mark.parametrize("task", ["image", "lm"])
def test_a_mola_run_resumed_after_a_crash_is_bit_identical(images, tiny_lm, tmp_path, monkeypatch, task):
    """Top-k routing, the balance loss and a layer profile: the resumed run rebuilds the same experts
    per block from config.toml and ends on the straight run's tensors exactly."""
    text = pirate_jsonl(tmp_path, 16)
    extra = ("--save-every", "2", "--method-args", "profile=inverted", "balance=0.05")

    def args(out):
        return (_image_args(images, out, "mola", 4, *extra) if task == "image" else
                _lm_args(text, tiny_lm, out, "mola", 4, *extra))

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(args(straight)) == 0
    calls = crash_at_step(monkeypatch, args(crashed), 3)
    assert (crashed / "checkpoints" / "step-0000002").is_dir() and not list(crashed.glob("*.safetensors"))
    assert main(["train", *(["--task", "lm"] if task == "lm" else []), "--resume", str(crashed)]) == 0
    assert calls["steps"] == 2  # it took steps 3 and 4 only, from the checkpoint
    a, b = load_file(str(_native(straight))), load_file(str(_native(crashed)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len({a[k].shape[0] for k in a if k.endswith(".R")}) > 1  # the profile gave blocks different counts


# -- 2. files --------------------------------------------------------------------------------------
def _randomise(models: dict, name: str) -> None:
    """Move every tensor off its init (B off zero, MoV's vectors off one)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in models.values():
            for p in A.trainable_parameters(model, name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=context).sample


@pytest.mark.parametrize("method", METHODS)
def test_native_file_reloads_experts_and_routers_exactly_on_the_mini_base(method, tmp_path):
    from studio.models import load_diffusion_base

    base = load_diffusion_base()
    unet = base.components["unet"]
    plain = _unet_output(unet)
    A.attach(unet, "m", method, A.make_config(method, {"experts": 3} if method != "loramoe" else
                                                      {"experts": 3, "knowledge": 1}), "unet-transformer")
    _randomise({"unet": unet}, "m")
    want = _unet_output(unet)
    assert (want - plain).abs().mean() > 1e-3                              # the mixture does something
    path = tmp_path / "mix.safetensors"
    formats.save(formats.from_models({"unet": unet}, "m"), path, "native")
    A.detach(unet, "m")
    af = formats.read(path)
    assert af.parts["unet"].method == method
    formats.attach_file(af, {"unet": unet}, "again")
    torch.testing.assert_close(_unet_output(unet), want, atol=0, rtol=0)   # bit-identical outputs
    A.detach(unet, "again")


def test_mola_layer_profile_and_explicit_counts_reload_on_a_language_model(tiny_lm, tmp_path):
    from studio.models import load_causal_lm

    model, _ = load_causal_lm(str(tiny_lm))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    for name, options in (("p", {"profile": "hourglass"}), ("n", {"counts": "3,5", "top_k": 3})):
        A.attach(model, name, "mola", A.make_config("mola", {"rank": 2, **options}), "lm-attn,lm-mlp")
        _randomise({"lm": model}, name)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        path = tmp_path / f"{name}.safetensors"
        formats.save(formats.from_models({"lm": model}, name), path, "native")
        A.detach(model, name)
        af = formats.read(path)
        formats.attach_file(af, {"lm": model}, "again")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
        A.detach(model, "again")
        experts = {p: t.shape[0] for p, t in af.parts["lm"].tensors.items() if p.endswith(".R")}
        expected = (8, 2) if name == "p" else (3, 5)  # hourglass 8-2-2-8 over two layers: quarters 0 and 2
        assert all(n == expected[int(p.split("layers.")[1].split(".")[0])] for p, n in experts.items()), experts


UNET_DEPTH = ["down_blocks.0", "down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.1",
              "down_blocks.1.attentions.0.transformer_blocks.0", "mid_block.attentions.0",
              "mid_block.attentions.0.transformer_blocks.0", "up_blocks.1",
              "up_blocks.1.attentions.0.transformer_blocks.0",
              "up_blocks.1.attentions.1.transformer_blocks.0", "up_blocks.2",
              "up_blocks.2.attentions.0.transformer_blocks.0", "up_blocks.2.attentions.1.transformer_blocks.0"]
"""The mini base's mixture blocks as the data flows (diffusers registers up_blocks before mid_block)."""


def test_expert_counts_follow_the_depth_of_the_unet_and_of_deep_language_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from builders import TINY_LLAMA
    from studio.models import load_diffusion_base

    unet = load_diffusion_base().components["unet"]
    A.attach(unet, "m", "mola", A.make_config("mola", {"counts": list(range(1, 13)), "top_k": 1, "rank": 2}),
             "unet-transformer")
    for path, layer in A.targets.layers_of(unet, "m").items():
        block = max((b for b in UNET_DEPTH if path.startswith(b + ".")), key=len)
        assert layer.adapters["m"].R.shape[0] == UNET_DEPTH.index(block) + 1, path
    A.detach(unet, "m")
    deep = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 12}))
    A.attach(deep, "m", "mola", A.make_config("mola", {"profile": "inverted", "rank": 2}), "lm-mlp")
    for path, layer in A.targets.layers_of(deep, "m").items():  # layers 0-2 get 2 experts, ..., 9-11 get 8
        assert layer.adapters["m"].R.shape[0] == (2, 4, 6, 8)[int(path.split("layers.")[1].split(".")[0]) // 3], path


# -- 3. inspect ------------------------------------------------------------------------------------
def _inspect(capsys, path, *extra) -> str:
    capsys.readouterr()
    assert main(["inspect", str(path), *extra]) == 0
    return capsys.readouterr().out


def test_inspect_shows_experts_routing_and_experts_per_block(runs, ui_library, capsys):
    mola = json.loads(_inspect(capsys, _native(runs["lm", "mola"]), "--json"))["mixtures"]["lm"]
    assert mola["routing"].startswith("top-2 per token") and "Switch" in mola["balance"]
    assert mola["routing"].endswith("layers of 2 or fewer experts use them all")
    assert mola["profile"] == "inverted profile, 2-4-6-8 over quarters of the depth"
    # inverted 2-4-6-8 over the two layers of the tiny Llama: quarters 0 and 2
    assert [(b["block"], b["experts"], b["modules"]) for b in mola["per_block"]] == [
        ("model.layers.0", [2], 7), ("model.layers.1", [6], 7)]
    assert mola["experts_total"] == 7 * 2 + 7 * 6
    text = _inspect(capsys, _native(runs["lm", "mola"]))
    assert "routing:  top-2 per token" in text and "model.layers.1  6 experts x 7 modules" in text
    loramoe = json.loads(_inspect(capsys, _native(runs["lm", "loramoe"]), "--json"))["mixtures"]["lm"]
    assert loramoe["routing"].startswith("soft") and "experts 1-3 world knowledge" in loramoe["balance"]
    for method in ("molora", "mov"):
        info = json.loads(_inspect(capsys, _native(runs["image", method]), "--json"))
        unet = info["mixtures"]["unet"]
        assert unet["routing"].startswith("soft") and unet["balance"] is None
        assert sum(b["modules"] for b in unet["per_block"]) == info["modules"]["unet"]
        assert {e for b in unet["per_block"] for e in b["experts"]} == {4}
        rank = info["options"]["unet"].get("rank")  # the trainer's --rank, 8
        assert unet["experts"] == (f"LoRA experts of rank {rank}" if method == "molora" else "(IA)^3 vector experts")
    assert json.loads(_inspect(capsys, ui_library["lora"], "--json"))["mixtures"] == {}


# -- 4. exports and bake ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "lycoris", "diffusers"])
def test_static_exports_of_a_mixture_are_refused_in_one_line(runs, fmt, tmp_path, capsys):
    out = tmp_path / f"out.{fmt}.safetensors"
    line = one_error_line(capsys, ["export", str(_native(runs["image", "mola"])), "--format", fmt, "-o", str(out)])
    assert f"--format {fmt} refused for the routed mixture of experts (mola)" in line
    assert "no fixed weight delta" in line and "use the native file" in line and "kohya file" in line
    assert not out.exists()


def test_peft_export_and_bake_of_a_mixture_are_refused_in_one_line(runs, ui_library, tmp_path, capsys):
    out = tmp_path / "peft"
    line = one_error_line(capsys, ["export", str(_native(runs["lm", "loramoe"])), "--format", "peft", "-o", str(out)])
    assert "routed mixture of experts (loramoe)" in line and "train --method lora for a PEFT adapter" in line
    baked = tmp_path / "baked.safetensors"
    line = one_error_line(capsys, ["bake", f"{ui_library['lora']}:1", f"{_native(runs['image', 'molora'])}:0.5",
                                   "-o", str(baked)])
    assert line.startswith("error: studio bake refused for the routed mixture of experts (molora)")
    assert "studio bake --freeze-gates PROMPTS.txt writes the static mix at its average gates" in line
    assert not out.exists() and not baked.exists()
    # the native layout keeps it: a re-export is the same tensors
    again = tmp_path / "again.safetensors"
    assert main(["export", str(_native(runs["image", "molora"])), "--format", "native", "-o", str(again)]) == 0
    a, b = load_file(str(_native(runs["image", "molora"]))), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 5. generate -----------------------------------------------------------------------------------
def _render(tmp_path, capsys, name, *adapters):
    out = tmp_path / name
    argv = ["generate", "--prompt", "stripes, a red circle on a blue background", "--steps", "6", "--seed", "2",
            "--out", str(out)]
    for a in adapters:
        argv += ["--adapter", a]
    assert main(argv) == 0, capsys.readouterr().err
    (png,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB")).astype(int), Image.open(png).text["parameters"]


@pytest.fixture(scope="module")
def strong_mixture(images, tmp_path_factory) -> Path:
    """MoLoRA at 10x the learning rate, so six steps move the images."""
    run = tmp_path_factory.mktemp("strong") / "molora"
    assert main(_image_args(images, run, "molora", 6, "--unet-lr", "1e-2", "--save-every", "6")) == 0
    return _native(run)


def test_a_mixture_mixes_with_a_lora_in_generate_at_a_weight(strong_mixture, ui_library, tmp_path, capsys):
    mixture, lora = strong_mixture, ui_library["lora"]
    alone, _ = _render(tmp_path, capsys, "alone", f"{lora}:0.7")
    mixed, text = _render(tmp_path, capsys, "mixed", f"{lora}:0.7", f"{mixture}:1")
    off, _ = _render(tmp_path, capsys, "off", f"{lora}:0.7", f"{mixture}:0")
    double, _ = _render(tmp_path, capsys, "double", f"{lora}:0.7", f"{mixture}:2")
    assert np.abs(mixed - alone).mean() > 0.5 and np.abs(double - mixed).mean() > 0.5
    assert np.array_equal(off, alone)                                       # weight 0 = without it
    assert f'Lora weights: "stripy: 0.7, {mixture.stem}: 1"' in text


def test_a_mixture_file_is_one_card_in_the_ui_library(strong_mixture, tmp_path):
    from studio.ui.library import Library

    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copy(strong_mixture, root / "mix.safetensors")
    (card,) = Library(root).scan()
    assert card.error is None and card.method == "molora" and card.base == "sd-custom" and card.ranks == "8"


# -- 6. bake --freeze-gates --------------------------------------------------------------------------
PROMPT = "stripes, a red circle on a blue background"


def _prompts(tmp_path, *prompts) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts or (PROMPT,)) + "\n")
    return path


def _constant_router_file(tmp_path, method: str) -> tuple[Path, dict]:
    """A mixture on the mini base's UNet whose router ignores its input (R = 0): gates softmax(c) everywhere
    (top-k of them for MoLA), so its average gates are known and its static mix is exact."""
    from studio.models import load_diffusion_base

    unet = load_diffusion_base().components["unet"]
    options = {"experts": 3, "top_k": 2} if method == "mola" else {"experts": 3}
    A.attach(unet, "m", method, A.make_config(method, options), "unet-transformer")
    _randomise({"unet": unet}, "m")
    want = {}
    with torch.no_grad():
        for path, layer in A.targets.layers_of(unet, "m").items():
            a = layer.adapters["m"]
            a.R.zero_()
            p = a.c.softmax(0)
            if method == "mola":  # top-2 of softmax(c), renormalised
                p = torch.zeros(3).scatter(0, p.topk(2).indices, p.topk(2).values / p.topk(2).values.sum())
            want[path] = p
    path = tmp_path / f"{method}-constant.safetensors"
    formats.save(formats.from_models({"unet": unet}, "m"), path, "native")
    A.detach(unet, "m")
    return path, want


@pytest.mark.parametrize("method", ["molora", "mola", "mov"])
def test_freeze_gates_of_a_constant_router_is_the_exact_static_mix(method, ui_library, tmp_path, capsys):
    mixture, want = _constant_router_file(tmp_path, method)
    out = tmp_path / "frozen.safetensors"
    capsys.readouterr()
    assert main(["bake", f"{mixture}:0.8", f"{ui_library['lora']}:0.7", "--freeze-gates", str(_prompts(tmp_path)),
                 "--gate-steps", "4", "--dtype", "fp32", "-o", str(out)]) == 0
    assert "froze the gates of 1 routed mixture(s) over 1 prompt(s) x 4 steps" in capsys.readouterr().out
    af = formats.read(out)
    assert af.source["format"] == "kohya" and af.method == "lora"
    (gates,) = json.loads(af.metadata["studio.frozen_gates"]).values()
    assert gates["unet"].keys() == want.keys()
    for path, g in gates["unet"].items():
        torch.testing.assert_close(torch.tensor(g), want[path], atol=2e-6, rtol=0)
    report = json.loads(af.metadata["studio.freeze_gates"])
    assert report["prompts"] == 1 and report["max_abs_pixel_error"] <= 1  # float rounding only
    live, _ = _render(tmp_path, capsys, "live", f"{mixture}:0.8", f"{ui_library['lora']}:0.7")
    baked, _ = _render(tmp_path, capsys, "baked", f"{out}:1")
    assert np.abs(live - baked).max() <= 1


def test_freeze_gates_of_a_trained_mixture_reports_the_error_it_has(strong_mixture, tmp_path, capsys):
    out = tmp_path / "frozen.safetensors"
    prompts = _prompts(tmp_path, PROMPT, "stripes, a green square on a black background")
    capsys.readouterr()
    assert main(["bake", f"{strong_mixture}:1", "--freeze-gates", str(prompts), "--gate-steps", "6",
                 "-o", str(out)]) == 0  # fp16 kohya: the error measured is the written file's
    printed = capsys.readouterr().out
    report = json.loads(formats.read(out).metadata["studio.freeze_gates"])
    assert f"mean |pixel error| {report['mean_abs_pixel_error']:.3f} of 255" in printed
    # the router's gates vary per token, so the static mix differs; the report is what a render shows
    # (generate's seeds for prompt i are seed + i, as the bake's)
    assert report["mean_abs_pixel_error"] > 0.1
    errors = []
    for i, prompt in enumerate((PROMPT, "stripes, a green square on a black background")):
        argv = ["--prompt", prompt, "--steps", "6", "--seed", str(i)]
        live, baked = (_render_argv(tmp_path, capsys, f"{name}{i}", argv, spec)
                       for name, spec in (("live", f"{strong_mixture}:1"), ("baked", f"{out}:1")))
        errors.append(np.abs(live - baked).mean())
    assert report["per_prompt"] == pytest.approx(errors, abs=1e-4)


def _render_argv(tmp_path, capsys, name, argv, adapter):
    out = tmp_path / name
    assert main(["generate", *argv, "--out", str(out), "--adapter", adapter]) == 0, capsys.readouterr().err
    (png,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB")).astype(float)


def test_freeze_gates_bad_input_is_one_error_line(runs, ui_library, tmp_path, capsys):
    mixture, out = _native(runs["image", "molora"]), tmp_path / "frozen.safetensors"
    bake = ["bake", f"{mixture}:1", "-o", str(out), "--freeze-gates"]
    assert "prompts file" in one_error_line(capsys, [*bake, str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "has 0 prompts" in one_error_line(capsys, [*bake, str(tmp_path / "empty.txt")])
    assert "--gate-steps" in one_error_line(capsys, [*bake, str(_prompts(tmp_path)), "--gate-steps", "0"])
    line = one_error_line(capsys, ["bake", f"{ui_library['lora']}:1", "-o", str(out), "--freeze-gates",
                                   str(_prompts(tmp_path))])
    assert "none of the adapters is a routed mixture" in line
    line = one_error_line(capsys, ["bake", f"{_native(runs['lm', 'mola'])}:1", "-o", str(out), "--freeze-gates",
                                   str(_prompts(tmp_path))])  # (tests/test_mixture_lm_freeze.py: the LM path)
    assert "--format kohya holds Stable Diffusion adapters" in line and "language-model adapters" in line
    assert not out.exists()


# -- 7. bad options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,args,message", [
    ("mola", ["profile=diamond"], "unknown expert profile 'diamond'"),
    ("mola", ["counts=2,4,6"], "expert counts [2, 4, 6] give 3 blocks but the targets have 2"),
    ("mola", ["counts=2,x"], "counts must be a whole number, got 'x'"),
    ("mola", ["profile=inverted", "counts=2,4"], "both set the experts per block"),
    ("mola", ["top_k=9"], "top-k 9 is larger than the 8 experts of a layer"),
    ("mola", ["profile=triangle", "top_k=3"], "top-k 3 is larger than the 2 experts of a layer"),
    ("mola", ["top_k=-1"], "top-k -1 is negative"),
    ("mola", ["experts=many"], "experts must be a whole number, got 'many'"),
    ("mola", ["balance=-1"], "balance -1 is negative"),
    ("mola", ["balance=inf"], "balance must be a finite number, got inf"),
    ("molora", ["experts=0"], "expert counts must be positive"),
    ("mov", ["experts=two"], "MoV experts must be a whole number"),
    ("loramoe", ["knowledge=6"], "knowledge 6 must leave experts in both groups of 6"),
    ("loramoe", ["profile=inverted"], "LoRAMoE keeps the same experts in every layer"),
    ("mola", ["expert_profile=inverted"], "unknown --method-args option(s) ['expert_profile']"),
])
def test_bad_mixture_options_are_one_error_line_and_write_nothing(tiny_lm, tmp_path, capsys, method, args, message):
    out = tmp_path / "run"
    line = one_error_line(capsys, _lm_args(pirate_jsonl(tmp_path, 8), tiny_lm, out, method, 1, "--method-args", *args))
    assert message in line, line
    assert "--method-args" in line or "unknown" in line or "targets have" in line
    assert not out.exists()


def test_counts_that_do_not_fit_the_unet_are_one_error_line(images, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error_line(capsys, _image_args(images, out, "mola", 1, "--method-args", "counts=8,6,4,2"))
    assert "expert counts [8, 6, 4, 2] give 4 blocks but the targets have 12" in line and "profile=" in line
    assert not out.exists()
