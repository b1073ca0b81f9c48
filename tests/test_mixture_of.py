"""``studio train DATA --mixture-of A.safetensors B.safetensors``: trained LoRA files as frozen MoLoRA experts
behind a router that alone trains (studio/adapters/compose.py). Two tiny LoRAs (stripes, outline; different
ranks and scales) trained for a few steps on the mini base, then a router over them on images of both."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import crash_at_step, one_error_line
from studio import formats
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _images(root: Path, styles: list[str], per_style: int) -> Path:
    data = root / "-".join(styles)
    data.mkdir()
    for style in styles:
        for png in sorted((ROOT / "sample_data" / "styles" / style).glob("*.png"))[:per_style]:
            shutil.copy(png, data / f"{style}-{png.name}")
            shutil.copy(png.with_suffix(".txt"), data / f"{style}-{png.stem}.txt")
    return data


def _train(data: Path, out: Path, steps: int, *extra) -> list[str]:
    return ["train", str(data), "-o", str(out), "--steps", str(steps), "--batch-size", "2", "--sample-every", "0",
            "--set", f"cache_dir={data.parent / 'cache'}", "--set", "sample_steps=2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stripes: rank 4, alpha 8 (s = 2); outline: rank 2, alpha 1 (s = 0.5); the router: 3 steps on both."""
    tmp = tmp_path_factory.mktemp("mixture_of")
    stripes, outline = tmp / "stripes.safetensors", tmp / "outline.safetensors"
    for style, path, rank, alpha in (("stripes", stripes, "4", "8"), ("outline", outline, "2", "1")):
        run = tmp / f"run-{style}"
        assert main(_train(_images(tmp, [style], 2), run, 2, "--rank", rank, "--alpha", alpha,
                           "--unet-lr", "1e-2")) == 0
        shutil.copy(run / f"{style}.safetensors", path)  # the native file, named after the data folder
    both = _images(tmp, ["stripes", "outline"], 2)
    mixed = tmp / "mixed"
    assert main(_train(both, mixed, 3, "--mixture-of", str(stripes), str(outline), "--unet-lr", "1e-2",
                       "--optimizer-args", "weight_decay=0")) == 0
    (path,) = mixed.glob("*.safetensors")  # native only: a routed mixture has no kohya form
    return {"stripes": stripes, "outline": outline, "mixture": path, "data": both, "tmp": tmp}


def _modules(af, component="unet"):
    return af.parts[component].modules()


def test_only_the_routers_train_and_the_experts_are_the_files_tensors(runs):
    mixture = formats.read(runs["mixture"])
    part = mixture.parts["unet"]
    assert part.method == "molora"
    assert [s[0] for s in part.config["sources"]] == ["stripes", "outline"]
    moved = 0
    for i, name in enumerate(("stripes", "outline")):
        expert = _modules(formats.read(runs[name]))
        assert set(expert) == set(_modules(mixture))
        for path, t in _modules(mixture).items():
            r = expert[path]["A"].shape[0]
            assert torch.equal(t["A"][i, :r], expert[path]["A"].flatten(1)), path      # bit-identical
            assert torch.equal(t["B"][i, :, :r], expert[path]["B"]), path
            assert not t["A"][i, r:].any() and not t["B"][i, :, r:].any()             # the padding stays zero
    for t in _modules(mixture).values():
        moved += int(t["R"].abs().sum() > 0) + int(t["c"].abs().sum() > 0)
    assert moved == 2 * len(_modules(mixture))  # every router (R and c) left its zero init


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def test_a_one_hot_router_equals_that_expert_alone_and_a_constant_one_the_average(runs):
    from studio.models import load_diffusion_base

    base = load_diffusion_base()
    unet = base.components["unet"]
    mixture = formats.read(runs["mixture"])
    outputs = {}
    for name in ("stripes", "outline"):
        formats.attach_file(formats.read(runs[name]), base.components, name)
        outputs[name] = _unet_output(unet)
        formats.detach_file(base.components, name)
    formats.attach_file(formats.read(runs["stripes"]), base.components, "s", weight=0.5)
    formats.attach_file(formats.read(runs["outline"]), base.components, "o", weight=0.5)
    outputs["average"] = _unet_output(unet)
    formats.detach_file(base.components, "s")
    formats.detach_file(base.components, "o")
    plain = _unet_output(unet)
    for i, name in enumerate(("stripes", "outline", "average")):
        routers = {}
        for key, t in mixture.parts["unet"].tensors.items():
            if key.endswith(".R"):
                t = torch.zeros_like(t)          # no input dependence ...
            elif key.endswith(".c"):             # ... and a bias that puts every gate on expert i (or 1/2 each)
                t = torch.zeros_like(t) if name == "average" else torch.full_like(t, -1e4).index_fill_(0, torch.tensor(i), 1e4)
            routers[key] = t
        forced = mixture.replace(parts={"unet": formats.Part("molora", mixture.parts["unet"].config, routers)})
        formats.attach_file(forced, base.components, "mix")
        got = _unet_output(unet)
        formats.detach_file(base.components, "mix")
        want = outputs[name]
        assert (want - plain).abs().max() > 1e-3                      # the expert does something
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), name


def test_the_file_reloads_exactly_and_inspect_names_the_experts(runs, tmp_path, capsys):
    from studio.models import load_diffusion_base

    mixture = formats.read(runs["mixture"])
    base = load_diffusion_base()
    formats.attach_file(mixture, base.components, "mix")
    again = formats.from_models(base.components, "mix")
    copy = tmp_path / "copy.safetensors"
    formats.save(again, copy, "native")
    reread = formats.read(copy)
    assert reread.parts["unet"].config == mixture.parts["unet"].config
    a, b = mixture.tensors(), reread.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["inspect", str(runs["mixture"])]) == 0
    text = capsys.readouterr().out
    assert "from stripes (rank 4, scale 2), outline (rank 2, scale 0.5)" in text and "soft per token" in text


def test_generate_renders_the_mixture_and_it_changes_the_image(runs, tmp_path, capsys):
    def render(name, *adapters):
        argv = ["generate", "--prompt", "stripes, a red circle on a blue background", "--steps", "4", "--seed", "2",
                "--out", str(tmp_path / name)]
        for a in adapters:
            argv += ["--adapter", a]
        assert main(argv) == 0, capsys.readouterr().err
        (png,) = sorted((tmp_path / name).glob("*.png"))
        return np.asarray(Image.open(png).convert("RGB")).astype(int)

    assert np.abs(render("mixed", str(runs["mixture"])) - render("plain")).mean() > 0.1


def test_bad_expert_files_are_one_error_line_and_nothing_is_written(runs, tmp_path, capsys):
    not_adapter = tmp_path / "notes.safetensors"
    not_adapter.write_bytes(b"this is no safetensors file")
    lm = tmp_path / "lm.safetensors"
    lm_part = formats.Part("lora", {"rank": 2}, {"model.layers.0.self_attn.q_proj.A": torch.zeros(2, 8),
                                                 "model.layers.0.self_attn.q_proj.B": torch.zeros(8, 2)})
    formats.save(formats.AdapterFile("lm", {"lm": lm_part}), lm, "native")
    stripes = formats.read(runs["stripes"])
    with_te = tmp_path / "with_te.safetensors"
    te = formats.Part("lora", {"rank": 2}, {"encoder.layers.0.self_attn.q_proj.A": torch.zeros(2, 32),
                                            "encoder.layers.0.self_attn.q_proj.B": torch.zeros(32, 2)})
    formats.save(stripes.replace(parts={**stripes.parts, "te": te}), with_te, "native")
    cases = {"notes.safetensors": [str(not_adapter), str(runs["stripes"])],
             "UNet experts only": [str(runs["outline"]), str(with_te)],
             "two or more": [str(runs["stripes"])],
             "one base": [str(runs["stripes"]), str(lm)],
             "nesting": [str(runs["stripes"]), str(runs["mixture"])]}
    for i, (expect, files) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        line = one_error_line(capsys, _train(runs["data"], out, 2, "--mixture-of", *files))
        assert expect in line, line
        assert not out.exists()
    line = one_error_line(capsys, _train(runs["data"], tmp_path / "x", 2, "--method", "loha", "--mixture-of",
                                         str(runs["stripes"]), str(runs["outline"])))
    assert "drop --method" in line


def test_compose_refuses_other_methods_by_name_and_experts_on_other_layers(runs):
    from studio.adapters import compose
    from studio.errors import StudioError

    stripes, outline = (formats.read(runs[n]).parts["unet"] for n in ("stripes", "outline"))
    experts = [("stripes", "lora", stripes.config, stripes.modules()), ("outline", "lora", outline.config,
                                                                         outline.modules())]
    config, tensors = compose.lora_experts(experts, {"top_k": 1})
    assert config["top_k"] == 1 and config["experts"] == 2 and config["rank"] == 4
    with pytest.raises(StudioError, match="loha adapter, which cannot be an expert.*--format kohya"):
        compose.lora_experts([experts[0], ("hada", "loha", {}, {})])
    fewer = dict(list(outline.modules().items())[1:])
    with pytest.raises(StudioError, match="adapt different layers"):
        compose.lora_experts([experts[0], ("outline", "lora", outline.config, fewer)])
    with pytest.raises(StudioError, match="top-k 3 is larger than the 2 experts"):
        compose.lora_experts(experts, {"top_k": 3})



def test_a_mixture_of_run_resumed_after_a_crash_is_bit_identical(runs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def args(out):
        return _train(runs["data"], out, 4, "--save-every", "2", "--unet-lr", "1e-2", "--mixture-of",
                      str(runs["stripes"]), str(runs["outline"]))

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(args(straight)) == 0
    calls = crash_at_step(monkeypatch, args(crashed), 3)
    assert main(["train", "--resume", str(crashed)]) == 0
    assert calls["steps"] == 2  # steps 3 and 4 only, from the checkpoint
    (a,), (b,) = ([load_file(str(p)) for p in run.glob("*.safetensors")] for run in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
