"""Pivotal tuning's files (issue 18): the kohya LoRA of a `--with-ti` run carries the embedding under A1111's
bundled keys (bundle_emb.<token>.string_to_param.* on SD1.5 / the mini base, .clip_l / .clip_g on SDXL);
the studio reads both parts back, `studio generate` installs the bundled token from the one file, `studio
inspect` lists it, diffusers' refusal of such files is the one it states, and a damaged bundle is one error."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import one_error_line
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "<kbot>"
BUNDLED = f"bundle_emb.{TOKEN}.string_to_param.*"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 1-step pivotal run on the mini base (LoRA on UNet and text encoder, a 2-vector token)."""
    root = tmp_path_factory.mktemp("pivotal")
    data = root / "data"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "outline").glob("*.png"))[:2]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    out = root / "run"
    assert main(["train", str(data), "--with-ti", TOKEN, "--init-word", "robot", "--vectors", "2", "--steps", "1",
                 "--batch-size", "2", "--targets", "unet-attn,te-attn", "--sample-every", "0", "--set",
                 "sample_steps=1", "--set", f"cache_dir={root / 'cache'}", "--out", str(out)]) == 0
    return out


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _without_bundle(path: Path, target: Path) -> Path:
    """The same file with its bundle_emb keys removed (what the LoRA alone is)."""
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
    save_file(tensors, str(target), metadata=_header(path))
    return target


def _a1111_bundles(keys) -> dict[str, dict[str, str]]:
    """A1111's reading of bundled keys (extensions-builtin/Lora/networks.py, load_network): the name ends at
    the first '.', then string_to_param.<k> is the .pt layout and any other tensor is taken by its name."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        head, _, part = key.partition(".")
        if head == "bundle_emb":
            name, vec = part.split(".", 1)
            found.setdefault(name, {})["string_to_param" if vec.split(".")[0] == "string_to_param" else vec] = key
    return found


def _png(folder: Path) -> np.ndarray:
    [path] = folder.glob("*.png")
    return np.asarray(Image.open(path))


def test_the_kohya_file_bundles_the_embedding_exactly_and_keeps_the_lora_as_exported(run, tmp_path):
    kohya = load_file(str(run / "data.kohya.safetensors"))
    rows = load_file(str(run / "kbot.safetensors"))["emb_params"]  # (2, 64), the separate file
    assert _a1111_bundles(kohya) == {TOKEN: {"string_to_param": BUNDLED}}
    assert kohya[BUNDLED].dtype == torch.float32 and torch.equal(kohya[BUNDLED], rows)
    # the LoRA keys are the kohya export of the run's exact file, bit for bit (the bundle changes nothing else)
    assert main(["export", str(run / "data.safetensors"), "--format", "kohya", "-o", str(tmp_path / "x.safetensors")]) == 0
    plain = load_file(str(tmp_path / "x.safetensors"))
    assert set(kohya) - set(plain) == {BUNDLED} and all(torch.equal(plain[k], kohya[k]) for k in plain)


def test_reading_gives_the_lora_and_the_embedding_and_a_reexport_keeps_the_bundle(run, tmp_path):
    from studio import formats
    from studio.formats import embedding

    af = formats.read(run / "data.kohya.safetensors")
    alone = formats.read(_without_bundle(run / "data.kohya.safetensors", tmp_path / "alone.safetensors"))
    assert set(af.parts) == set(alone.parts) == {"unet", "te"}
    for component, part in af.parts.items():
        assert part.tensors.keys() == alone.parts[component].tensors.keys()
        assert all(torch.equal(v, alone.parts[component].tensors[k]) for k, v in part.tensors.items())
    [emb] = af.source["embeddings"]
    separate = embedding.read(run / "kbot.safetensors")
    assert emb.token == separate.token == TOKEN and torch.equal(emb.vectors["te"], separate.vectors["te"])
    # studio export of the bundled file writes the bundle back bit for bit, and the same LoRA deltas
    again = tmp_path / "again.safetensors"
    assert main(["export", str(run / "data.kohya.safetensors"), "--format", "kohya", "--dtype", "fp32",
                 "-o", str(again)]) == 0
    first, second = load_file(str(run / "data.kohya.safetensors")), load_file(str(again))
    assert first.keys() == second.keys() and torch.equal(first[BUNDLED], second[BUNDLED])
    got, want = _deltas(formats.read(again)), _deltas(af)
    assert got.keys() == want.keys()
    assert all((got[k] - dW).norm() <= 1e-5 * dW.norm() for k, dW in want.items())


def _deltas(af) -> dict[str, torch.Tensor]:
    """(alpha / r) B A of every module of a plain-LoRA AdapterFile."""
    out = {}
    for component, part in af.parts.items():
        scale = part.config["alpha"] / part.config["rank"]
        for path, t in part.modules().items():
            out[f"{component}.{path}"] = scale * t["B"].flatten(1) @ t["A"].flatten(1)
    return out


def test_generate_with_the_one_file_equals_the_lora_plus_the_embedding_file(run, tmp_path):
    alone = str(_without_bundle(run / "data.kohya.safetensors", tmp_path / "alone.safetensors"))
    common = ["generate", "--steps", "2", "--seed", "5", "--prompt", f"a photo of {TOKEN}"]
    assert main([*common, "--adapter", str(run / "data.kohya.safetensors"), "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--adapter", alone, "--adapter", str(run / "kbot.safetensors"),
                 "--out", str(tmp_path / "two")]) == 0
    assert main([*common, "--adapter", alone, "--out", str(tmp_path / "lora")]) == 0
    assert np.array_equal(_png(tmp_path / "one"), _png(tmp_path / "two"))
    assert not np.array_equal(_png(tmp_path / "one"), _png(tmp_path / "lora"))  # the token did something


def test_a_mix_session_installs_and_drops_the_bundled_token(run):
    from studio.errors import StudioError
    from studio.mixing import MixEntry, MixSession
    from studio.models import load_diffusion_base

    base = load_diffusion_base(None)
    size = len(base.pipe.tokenizer)
    session = MixSession(base)
    session.sync([MixEntry(str(run / "data.kohya.safetensors"), 0.5)])
    assert session.tokens == [TOKEN] and len(base.pipe.tokenizer) == size + 2
    with pytest.raises(StudioError, match=r"kbot.safetensors and .*data.kohya.safetensors \(bundle_emb.<kbot>\) are both "
                                         r"the token '<kbot>'"):
        session.sync([MixEntry(str(run / "data.kohya.safetensors")), MixEntry(str(run / "kbot.safetensors"))])
    session.sync([])
    assert session.tokens == [] and len(base.pipe.tokenizer) == size


def test_inspect_lists_the_token_and_says_diffusers_refuses_the_file(run, capsys):
    import json

    from studio.models import load_diffusion_base

    path = str(run / "data.kohya.safetensors")
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert f"bundled embedding {TOKEN} (2 vectors, emb_params 64 wide)" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    assert "all 64 modules (installs the bundled embedding too" in lines["A1111"]
    assert f"64 of 64 modules, 1 key(s) unloaded: {BUNDLED}" in lines["ComfyUI"]
    assert "0 of 64 modules" in lines["diffusers"] and "Invalid LoRA checkpoint" in lines["diffusers"]
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embeddings"] == [{"token": TOKEN, "vectors": 2, "encoders": {"emb_params": 64}}]
    # what the diffusers line states, asked of diffusers itself
    pipe = load_diffusion_base(None).pipe
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(path)


def _damage(run: Path, target: Path, bundle: dict) -> str:
    tensors = {k: v for k, v in load_file(str(run / "data.kohya.safetensors")).items() if not k.startswith("bundle_emb")}
    save_file(tensors | bundle, str(target))
    return str(target)


@pytest.mark.parametrize("bundle, message", [
    ({BUNDLED: torch.randn(2, 32)}, r"damaged.safetensors \(bundle_emb.<kbot>\) is a SD1.5 embedding "
                                    r"\(emb_params 32 wide\) but the base is SD1.5 \(emb_params 64 wide\)"),
    ({f"bundle_emb.{TOKEN}.clip_l": torch.randn(2, 64), f"bundle_emb.{TOKEN}.clip_g": torch.randn(2, 64)},
     r"is a SDXL embedding \(clip_l 64, clip_g 64 wide\) but the base is SD1.5 \(emb_params 64 wide\)"),
    ({f"bundle_emb.{TOKEN}.weights": torch.randn(2, 64), f"bundle_emb.{TOKEN}.extra": torch.randn(2)},
     r"the bundled embedding's keys .* are no embedding: A1111 reads bundle_emb.<kbot>.string_to_param"),
])
def test_a_damaged_bundle_is_one_error_line_and_nothing_is_written(run, tmp_path, capsys, bundle, message):
    import re

    damaged = _damage(run, tmp_path / "damaged.safetensors", bundle)
    for argv in (["generate", "--prompt", f"a {TOKEN}", "--steps", "1", "--adapter", damaged,
                  "--out", str(tmp_path / "out")], ["inspect", damaged]):
        assert re.search(message, one_error_line(capsys, argv))
    assert not (tmp_path / "out").exists()


def test_a_bundle_too_narrow_beside_a_unet_only_lora_is_refused_by_generate(run, tmp_path, capsys):
    """Without text-encoder modules the file does not tell the mini base's width (inspect shows the bundle);
    generate asks the loaded base, before anything is rendered."""
    tensors = {k: v for k, v in load_file(str(run / "data.kohya.safetensors")).items() if k.startswith("lora_unet_")}
    path = tmp_path / "unet.safetensors"
    save_file(tensors | {BUNDLED: torch.randn(2, 32)}, str(path))
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0 and "emb_params 32 wide" in capsys.readouterr().out
    line = one_error_line(capsys, ["generate", "--prompt", f"a {TOKEN}", "--steps", "1", "--adapter", str(path),
                                   "--out", str(tmp_path / "out")])
    assert "unet.safetensors (bundle_emb.<kbot>) is a SD1.5 embedding (emb_params 32 wide) but the base is SD1.5 " \
           "(emb_params 64 wide)" in line
    assert not (tmp_path / "out").exists()


def test_a_token_with_a_dot_is_refused_before_training(run, tmp_path, capsys):
    data = run.parent / "data"
    out = tmp_path / "bad"
    line = one_error_line(capsys, ["train", str(data), "--with-ti", "<k.bot>", "--init-word", "robot", "--steps",
                                   "1", "--out", str(out), "--set", f"cache_dir={run.parent / 'cache'}"])
    assert "token '<k.bot>' in --with-ti has a '.', which ends a bundled embedding's name in A1111" in line
    assert not out.exists()


def test_sdxl_bundles_clip_l_and_clip_g_and_lycoris_layouts_keep_the_bundle(tmp_path):
    """The SDXL form, and a LoHa file (written by LyCORIS's layout, the bundle added after) keep it too."""
    from builders import tiny_sdxl_text_encoders, tiny_sdxl_unet
    from formats_helpers import tiny_sd

    import studio.adapters as A
    from studio import formats
    from studio.formats.embedding import Embedding

    te1, te2 = tiny_sdxl_text_encoders()
    models = {"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}
    A.attach(models["unet"], "a", "lora", A.make_config("lora", {"rank": 2}), "unet-attn")
    xl = Embedding(TOKEN, {"te1": torch.randn(2, 768), "te2": torch.randn(2, 1280)})
    af = formats.from_models(models, "a").replace(source={"embeddings": [xl]})
    formats.save(af, tmp_path / "xl.safetensors", "kohya")
    keys = load_file(str(tmp_path / "xl.safetensors"))
    assert _a1111_bundles(keys) == {TOKEN: {"clip_l": f"bundle_emb.{TOKEN}.clip_l",
                                            "clip_g": f"bundle_emb.{TOKEN}.clip_g"}}
    [back] = formats.read(tmp_path / "xl.safetensors").source["embeddings"]
    assert all(torch.equal(back.vectors[c], xl.vectors[c]) for c in ("te1", "te2"))

    sd = tiny_sd()  # a LoHa on the tiny SD1.5-layout UNet (text encoder 32 wide)
    A.attach(sd["unet"], "h", "loha", A.make_config("loha", {"rank": 2}), "unet-attn")
    emb = Embedding(TOKEN, {"te": torch.randn(1, 32)})
    loha = formats.from_models(sd, "h").replace(source={"embeddings": [emb]})
    report = formats.save(loha, tmp_path / "loha.safetensors", "kohya")
    read = formats.read(tmp_path / "loha.safetensors")
    assert read.methods == ["loha"] and torch.equal(read.source["embeddings"][0].vectors["te"], emb.vectors["te"])
    assert report.sha256 == formats.data_hash(tmp_path / "loha.safetensors")


def test_export_no_bundle_writes_the_lora_alone_that_diffusers_loads(run, tmp_path):
    from studio.cli import main

    out = tmp_path / "plain.safetensors"
    assert main(["export", str(run / "data.kohya.safetensors"), "--no-bundle", "--dtype", "fp32", "-o", str(out)]) == 0
    keys = set(load_file(str(out)))
    assert keys and not any(k.startswith("bundle_emb.") for k in keys)
    kept = tmp_path / "kept.safetensors"
    assert main(["export", str(run / "data.kohya.safetensors"), "--dtype", "fp32", "-o", str(kept)]) == 0
    assert keys == {k for k in load_file(str(kept)) if not k.startswith("bundle_emb.")}
