"""The Text tab's service: a causal LM with a weighted mix of LM adapters from the library."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import tiny_lm  # noqa: F401  (fixture)
from ui_helpers import ui_library  # noqa: F401  (fixture)

import studio.adapters as A
from studio import formats
from studio.errors import StudioError
from studio.models import load_causal_lm
from studio.text import complete
from studio.ui.library import Library
from studio.ui.text_service import TextStudio

PROMPT = "Q: What colour is a frog?\nA:"


def _lm_adapter(base_folder, path, method, seed):
    model, _ = load_causal_lm(str(base_folder))
    A.attach(model, "a", method, A.make_config(method, {"rank": 4} if method != "svf" else {}), "lm-attn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, "a"):
            p.add_((1.0 if method != "svf" else 2.0) * torch.randn(p.shape, generator=g))
    formats.save(formats.from_models({"lm": model}, "a"), path, "native", overwrite=True)
    return path


@pytest.fixture(scope="module")
def text_studio(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-library")
    _lm_adapter(tiny_lm, root / "pirate.safetensors", "lora", 1)
    _lm_adapter(tiny_lm, root / "svf-talk.safetensors", "svf", 2)
    return TextStudio(Library(root), {"tiny": str(tiny_lm)})


def test_mixing_lm_adapters_follows_the_rules(text_studio, tiny_lm):
    model, tokenizer = load_causal_lm(str(tiny_lm))
    bare = PROMPT + complete(model.eval(), tokenizer, [PROMPT], 12, stop=None)[0]
    assert text_studio.keys() == ["pirate", "svf-talk"]
    assert text_studio.complete("tiny", PROMPT, [], 12) == bare
    assert text_studio.complete("tiny", PROMPT, [("pirate", 0.0), ("svf-talk", 0.0)], 12) == bare
    alone = text_studio.complete("tiny", PROMPT, [("pirate", 1.0)], 12)
    assert alone != bare
    assert text_studio.complete("tiny", PROMPT, [("pirate", 1.0), ("svf-talk", 0.0)], 12) == alone
    mixed = text_studio.complete("tiny", PROMPT, [("pirate", 1.0), ("svf-talk", 1.0)], 12)
    assert mixed not in (alone, bare)


def test_image_adapters_and_bad_requests_are_refused(text_studio, ui_library):
    import shutil

    shutil.copyfile(ui_library["lora"], text_studio.library.root / "image-style.safetensors")
    with pytest.raises(StudioError, match="image-style is a .* adapter: mix it in the Generate tab"):
        text_studio.complete("tiny", PROMPT, [("image-style", 1.0)], 4)
    with pytest.raises(StudioError, match="no adapter named '../x'"):
        text_studio.complete("tiny", PROMPT, [("../x", 1.0)], 4)
    with pytest.raises(StudioError, match="new tokens must be 1..256"):
        text_studio.complete("tiny", PROMPT, [], 1000)
    with pytest.raises(StudioError, match="unknown language model 'gpt-9'"):
        text_studio.complete("gpt-9", PROMPT, [], 4)
