"""Textual inversion (studio/prompt/ti.py, studio/formats/embedding.py): training on the mini base,
the A1111 / ComfyUI file layouts (SD1.5 emb_params, SDXL clip_l / clip_g), diffusers'
load_textual_inversion as the reference reader, generate by token, and bad input."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_helpers import one_error_line
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "<kbot>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti") / "data"
    folder.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "outline").glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


@pytest.fixture(scope="module")
def run(data):
    """One 3-step TI run on the mini base through the CLI, keeping a handle on the base it trained."""
    import trainers.diffusion as diffusion
    from studio.models import load_diffusion_base

    bases = []

    def keep(*args, **kwargs):
        bases.append(load_diffusion_base(*args, **kwargs))
        return bases[-1]

    out = data.parent / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "load_diffusion_base", keep)
        code = main(["train", str(data), "--method", "ti", "--token", TOKEN, "--init-word", "robot", "--vectors", "2",
                     "--steps", "3", "--batch-size", "2", "--sample-every", "0", "--set", "sample_steps=2",
                     "--out", str(out), "--set", f"cache_dir={data.parent / 'cache'}"])
    assert code == 0
    return out, bases[0]


def _mini():
    from studio.models import load_diffusion_base
    return load_diffusion_base(None)


def test_only_the_new_rows_train(run):
    from studio.prompt.ti import TokenEmbedding
    out, trained = run
    fresh = _mini()
    table = trained.pipe.text_encoder.get_input_embeddings()
    assert isinstance(table, TokenEmbedding) and table.vectors.shape == (2, 64)
    # AdamW decays every element of a parameter it holds: the frozen table is not one of them
    assert torch.equal(table.base.weight, fresh.pipe.text_encoder.get_input_embeddings().weight)
    for model in ("text_encoder", "unet"):
        pristine = dict(getattr(fresh.pipe, model).named_parameters())
        for key, p in getattr(trained.pipe, model).named_parameters():
            if key.endswith("vectors"):
                continue
            assert torch.equal(p, pristine[key.replace("token_embedding.base.", "token_embedding.")]), key
    robot = fresh.pipe.tokenizer("robot", add_special_tokens=False)["input_ids"][0]
    start = fresh.pipe.text_encoder.get_input_embeddings().weight[robot]
    assert (table.vectors - start).abs().max() > 1e-4  # both vectors moved away from the init word
    saved = load_file(str(out / "checkpoints" / "step-0000003" / "adapter.safetensors"))
    assert set(saved) == {"te.ti.vectors"} and torch.equal(saved["te.ti.vectors"], table.vectors.detach())


def test_a_resumed_run_ends_bit_identical(run, data, tmp_path):
    out, _ = run
    common = ["--method", "ti", "--token", TOKEN, "--init-word", "robot", "--vectors", "2", "--batch-size", "2",
              "--sample-every", "0", "--set", "sample_steps=2", "--set", f"cache_dir={data.parent / 'cache'}"]
    part = tmp_path / "part"
    assert main(["train", str(data), *common, "--steps", "2", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--steps", "3"]) == 0  # from the step-2 checkpoint
    assert torch.equal(load_file(str(part / "kbot.safetensors"))["emb_params"],
                       load_file(str(out / "kbot.safetensors"))["emb_params"])


def test_the_file_is_a1111s_layout_and_diffusers_loads_it_to_the_same_text_embeddings(run):
    from studio.formats import embedding
    from studio.prompt.ti import Installed
    out, _ = run
    path = out / "kbot.safetensors"  # A1111 / ComfyUI take the file name as the word
    tensors = load_file(str(path))
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (2, 64)
    assert tensors["emb_params"].dtype == torch.float32

    ours = _mini()
    Installed(ours.pipe).sync([embedding.read(path)])
    reference = _mini()  # diffusers' own reader, given the token as A1111 files need
    reference.pipe.load_textual_inversion(str(path), token=TOKEN)
    prompt = f"a photo of {TOKEN} on a red background"
    with torch.no_grad():
        mine = ours.pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        theirs = reference.pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        plain = _mini().pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(mine, theirs)
    assert not torch.allclose(mine, plain, atol=1e-3)  # the token means something now

    info = embedding.describe(path)
    assert (info["token"], info["vectors"], info["encoders"]) == (TOKEN, 2, {"emb_params": 64})


def test_a_hand_built_a1111_file_imports_and_inspect_reads_it(tmp_path, capsys):
    from studio.formats import embedding
    rows = torch.randn(3, 64)
    save_file({"emb_params": rows}, str(tmp_path / "robo.safetensors"))  # no header: the name is the token
    emb = embedding.read(tmp_path / "robo.safetensors")
    assert emb.token == "robo" and torch.equal(emb.vectors["te"], rows)
    assert main(["inspect", str(tmp_path / "robo.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "token:     robo (3 vectors" in text and "emb_params 64 wide" in text


@pytest.mark.parametrize("tensors, token, family, widths", [
    ({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, "robo", "sdxl", {"te1": 768, "te2": 1280}),
    ({"string_to_param.*": torch.randn(2, 768)}, "robo", "sd15", {"te": 768}),  # A1111's .pt layout, flattened
    ({"<cat-toy>": torch.randn(768)}, "<cat-toy>", "sd15", {"te": 768}),  # diffusers' learned_embeds
])
def test_other_documented_layouts_import(tmp_path, capsys, tensors, token, family, widths):
    from studio.formats import embedding
    save_file(tensors, str(tmp_path / "robo.safetensors"))
    emb = embedding.read(tmp_path / "robo.safetensors")
    assert (emb.token, emb.family, emb.widths) == (token, family, widths)
    assert main(["inspect", str(tmp_path / "robo.safetensors")]) == 0
    assert f"base:      {embedding.FAMILY_NAMES[family]} ({family})" in capsys.readouterr().out


def _sdxl_pipe(tmp: Path, widths=(16, 24)):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from builders import TINY_CLIP_16, TINY_CLIP_PROJ, tiny_sdxl_unet, tiny_vae
    from studio.shapes.tokenizer import load_tokenizer, write_tokenizer

    torch.manual_seed(0)
    folder = write_tokenizer(tmp / "tok", 16)
    tok, tok2 = load_tokenizer(folder), load_tokenizer(folder)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP_16, **ids, "hidden_size": widths[0]}))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY_CLIP_PROJ, **ids, "hidden_size": widths[1]}))
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=tiny_sdxl_unet(), scheduler=DDPMScheduler())


def _sdxl_embeds(pipe, prompt):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def test_sdxl_trains_both_encoders_and_writes_clip_l_clip_g(tmp_path):
    from studio.formats import embedding
    from studio.prompt import ti

    pipe = _sdxl_pipe(tmp_path)
    word = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("circle", add_special_tokens=False)["input_ids"])
    rows = ti.add_trainable(pipe, TOKEN, "circle", 2, "the test")
    assert set(rows) == {"te1", "te2"} and len(word) == 1
    frozen = [m.base.weight.clone() for m in rows.values()]
    optimizer = torch.optim.AdamW([m.vectors for m in rows.values()], lr=1e-2, weight_decay=1e-2)
    for _ in range(3):  # the encoders' outputs on a prompt with the token, pushed towards zero
        embeds, pooled = _sdxl_embeds(pipe, f"a {TOKEN} circle")
        (embeds.square().mean() + pooled.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(m.base.weight, w) for m, w in zip(rows.values(), frozen))
    with torch.no_grad():
        trained = _sdxl_embeds(pipe, f"a {TOKEN} circle")

    emb = embedding.Embedding(TOKEN, ti.trained_rows(pipe), where="test")
    embedding.write(emb, tmp_path / "kbot.safetensors")
    tensors = load_file(str(tmp_path / "kbot.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 16), "clip_g": (2, 24)}
    back = embedding.read(tmp_path / "kbot.safetensors")
    assert back.token == TOKEN and back.family == "sdxl"

    fresh = _sdxl_pipe(tmp_path)  # the same random base, no training module: the rows in the tables
    ti.Installed(fresh).sync([back])
    with torch.no_grad():
        installed = _sdxl_embeds(fresh, f"a {TOKEN} circle")
    for a, b in zip(installed, trained):
        assert torch.allclose(a, b, atol=1e-6)
    # an SDXL embedding offered to the mini base (SD1.5 layout): the widths are named
    with pytest.raises(Exception, match=r"SDXL embedding \(clip_l 16, clip_g 24 wide\).*emb_params 64"):
        ti.Installed(_mini().pipe).sync([back])


def test_studio_train_on_an_sdxl_base_trains_both_encoders(data, tmp_path):
    pipe = _sdxl_pipe(tmp_path, widths=(16, 16))  # the tiny SDXL UNet's cross-attention is 16 + 16 wide
    pipe.save_pretrained(tmp_path / "sdxl")
    out = tmp_path / "run"
    assert main(["train", str(data), "--base", str(tmp_path / "sdxl"), "--method", "ti", "--token", TOKEN,
                 "--init-word", "circle", "--vectors", "2", "--steps", "2", "--batch-size", "2", "--resolution", "32",
                 "--sample-every", "0", "--set", "sample_steps=1", "--out", str(out),
                 "--set", f"cache_dir={tmp_path / 'cache'}"]) == 0
    tensors = load_file(str(out / "kbot.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 16), "clip_g": (2, 16)}
    circle = pipe.tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    for key, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        start = encoder.get_input_embeddings().weight[circle]
        assert (tensors[key] - start).abs().max() > 1e-4, key  # each encoder's rows trained


def _png(folder: Path) -> np.ndarray:
    [path] = folder.glob("*.png")
    return np.asarray(Image.open(path))


def test_generate_uses_the_embedding_by_its_token(run, tmp_path, capsys):
    out, _ = run
    file = str(out / "kbot.safetensors")
    common = ["generate", "--steps", "2", "--seed", "3"]
    prompt = f"a photo of {TOKEN}"
    assert main([*common, "--prompt", prompt, "--adapter", file, "--out", str(tmp_path / "with")]) == 0
    assert main([*common, "--prompt", prompt, "--out", str(tmp_path / "without")]) == 0
    assert np.abs(_png(tmp_path / "with").astype(int) - _png(tmp_path / "without")).max() > 0
    capsys.readouterr()
    # a prompt without the token: a warning, and the image is the base's own
    assert main([*common, "--prompt", "a photo", "--adapter", file, "--out", str(tmp_path / "untouched")]) == 0
    assert f"warning: the embedding token {TOKEN} appears in no prompt" in capsys.readouterr().err
    assert main([*common, "--prompt", "a photo", "--out", str(tmp_path / "plain")]) == 0
    assert np.array_equal(_png(tmp_path / "untouched"), _png(tmp_path / "plain"))


def test_a_mix_drops_an_embedding_without_a_trace(run):
    from studio.errors import StudioError
    from studio.mixing import MixEntry, MixSession
    out, _ = run
    base = _mini()
    size, words = len(base.pipe.tokenizer), base.pipe.text_encoder.get_input_embeddings().num_embeddings
    session = MixSession(base)
    session.sync([MixEntry(str(out / "kbot.safetensors"))])
    assert session.tokens == [TOKEN] and len(base.pipe.tokenizer) == size + 2
    session.sync([])
    assert len(base.pipe.tokenizer) == size and base.pipe.text_encoder.get_input_embeddings().num_embeddings == words
    # a set with a file that does not fit is refused whole, and the next sync installs again
    xl = out.parent / "xl.safetensors"
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(xl))
    with pytest.raises(Exception, match="SDXL embedding"):
        session.sync([MixEntry(str(out / "kbot.safetensors")), MixEntry(str(xl))])
    assert session.tokens == [] and len(base.pipe.tokenizer) == size
    session.sync([MixEntry(str(out / "kbot.safetensors"))])
    assert session.tokens == [TOKEN] and len(base.pipe.tokenizer) == size + 2


@pytest.mark.parametrize("args, message", [
    (["--init-word", "kbot"], "--init-word 'kbot' in the train config is 4 tokens"),
    (["--token", "robot"], "--token 'robot' in the train config is already in the base's vocabulary: pick a new word "
                           "such as '<robot>'"),
    (["--vectors", "0"], "--vectors 0: an embedding needs at least one vector"),
    (["--init-word", " "], "tokenises to nothing"),
])
def test_bad_input_is_one_error_line_and_nothing_is_written(data, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    argv = ["train", str(data), "--method", "ti", "--token", TOKEN, "--init-word", "robot", "--steps", "1",
            "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", *args]
    assert message in one_error_line(capsys, argv)
    assert not out.exists()


def test_an_sdxl_embedding_in_generate_on_the_mini_base(tmp_path, capsys):
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "xl.safetensors"))
    line = one_error_line(capsys, ["generate", "--prompt", "a xl", "--adapter", str(tmp_path / "xl.safetensors"),
                                   "--out", str(tmp_path / "out")])
    assert "is a SDXL embedding (clip_l 768, clip_g 1280 wide) but the base is SD1.5 (emb_params 64 wide)" in line
    assert not (tmp_path / "out").exists()


def test_pivotal_tuning_trains_a_lora_and_the_token_which_stops_early(data, tmp_path):
    from studio import formats
    common = ["--with-ti", TOKEN, "--init-word", "robot", "--vectors", "2", "--batch-size", "2", "--targets",
              "unet-attn,te-attn", "--sample-every", "0", "--set", "sample_steps=1",
              "--set", f"cache_dir={data.parent / 'cache'}"]
    assert main(["train", str(data), *common, "--steps", "1", "--out", str(tmp_path / "one")]) == 0
    assert main(["train", str(data), *common, "--steps", "3", "--ti-steps", "1", "--out", str(tmp_path / "three")]) == 0
    rows = [load_file(str(tmp_path / run / "kbot.safetensors"))["emb_params"] for run in ("one", "three")]
    assert torch.equal(rows[0], rows[1])  # the embedding trained at step 1 only, and exactly as a 1-step run
    loras = [formats.read(tmp_path / run / "data.safetensors") for run in ("one", "three")]
    assert set(loras[1].parts) == {"unet", "te"}
    for component, part in loras[1].parts.items():  # the LoRA went on training after the embedding stopped
        first = loras[0].parts[component].tensors
        assert any(not torch.equal(v, first[k]) for k, v in part.tensors.items() if k.endswith(".B")), component
    assert (tmp_path / "three" / "data.kohya.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--with-ti", "robot"], "--with-ti 'robot' in the train config is already in the base's vocabulary"),
    (["--with-ti", TOKEN, "--ti-steps", "0"], "--ti-steps must be positive, got 0"),
    (["--token", TOKEN], "beside a LoRA give the token as --with-ti '<kbot>'"),
    (["--with-ti", TOKEN, "--trigger", "kbot"], "--trigger 'kbot' lacks the token '<kbot>'"),
])
def test_pivotal_bad_input_is_one_error_line(data, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    argv = ["train", str(data), "--init-word", "robot", "--steps", "1", "--out", str(out),
            "--set", f"cache_dir={tmp_path / 'cache'}", *args]
    assert message in one_error_line(capsys, argv)
    assert not out.exists()


def test_export_and_bake_of_an_embedding_say_what_it_is(run, tmp_path, capsys):
    out, _ = run
    file = str(out / "kbot.safetensors")
    target = str(tmp_path / "x.safetensors")
    for argv in (["export", file, "-o", target], ["bake", file, "-o", target]):
        assert "is a textual-inversion embedding, not a layer adapter" in one_error_line(capsys, argv)
        assert not (tmp_path / "x.safetensors").exists()


def test_an_embedding_in_a_language_model_mix_is_one_error(tmp_path):
    """The Text tab's session has no pipeline (and so no token table to grow): an embedding there is
    refused by name instead of failing on the missing pipeline."""
    from types import SimpleNamespace

    from studio.errors import StudioError
    from studio.mixing import MixEntry, MixSession

    path = tmp_path / "kbot.safetensors"
    save_file({"emb_params": torch.randn(2, 64)}, str(path))
    session = MixSession(SimpleNamespace(components={"lm": torch.nn.Linear(2, 2)}))  # a LanguageBase's shape
    with pytest.raises(StudioError, match="kbot.safetensors: textual-inversion embeddings apply to Stable Diffusion"):
        session.sync([MixEntry(str(path))])
    session.sync([])  # and the session stays usable


def test_a_half_precision_base_trains_a_token_and_renders_its_samples(data, tmp_path):
    """With --base-dtype bf16 the text encoder stays a bf16 model to diffusers (its first parameter is the
    frozen table, not the fp32 rows): the final sample grid renders instead of a dtype traceback."""
    out = tmp_path / "bf16"
    assert main(["train", str(data), "--method", "ti", "--token", TOKEN, "--init-word", "robot", "--vectors", "2",
                 "--steps", "1", "--batch-size", "2", "--base-dtype", "bf16", "--set", "sample_steps=1",
                 "--out", str(out), "--set", f"cache_dir={data.parent / 'cache'}"]) == 0
    assert (out / "samples" / "step-0000001.png").is_file()
    assert load_file(str(out / "kbot.safetensors"))["emb_params"].dtype == torch.float32
