"""diffusers' own loader as the referee: our kohya and diffusers exports load through
``pipe.load_lora_weights`` without key warnings and fuse to the weights our merge produces.

Tiny SD1.5-style and SDXL-shaped pipelines are built from config dicts (random weights). Hand-made
kohya files (documented layout, alpha != rank, fp16, SD1.5 and SDXL-SGM names) import and mix to
the weights computed by hand.
"""

import contextlib
import logging

import pytest
import torch
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from builders import tiny_clip, tiny_pipeline, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet
from formats_helpers import copies, deltas, linear_weights, train


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return {"unet": tiny_unet(), "te": tiny_clip()}


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(1)
    te1, te2 = tiny_sdxl_text_encoders()
    return {"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def loader_messages():
    """Every warning diffusers, transformers and PEFT log or warn while loading."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            handler.messages.extend(str(w.message) for w in caught)
            for lg, level in zip(loggers, levels):
                lg.removeHandler(handler)
                lg.setLevel(level)


def diffusers_fused(base: dict, path) -> dict[str, dict[str, torch.Tensor]]:
    """Load ``path`` with diffusers into copies of ``base``, fuse, return the fused Linear weights."""
    m = copies(base)
    pipe = tiny_pipeline(m["unet"], m.get("te", m.get("te1")), m.get("te2"))
    with loader_messages() as messages:
        pipe.load_lora_weights(str(path))
    assert not [msg for msg in messages if "key" in msg.lower() or "lora" in msg.lower()], messages
    pipe.fuse_lora()
    out = {}
    for component, model in m.items():
        injected = {n for n, mod in model.named_modules() if hasattr(mod, "base_layer")}
        weights = linear_weights(model)
        out[component] = {p: w for p, w in weights.items() if p in {n.removeprefix("text_model.") for n in injected}}
    return out


def studio_merged(base: dict, af: F.AdapterFile) -> dict[str, dict[str, torch.Tensor]]:
    """Our merge of ``af`` into ``base`` (detached again afterwards: merge / unmerge is bit-exact)."""
    F.attach_file(af, base, "x")
    try:
        for model in base.values():
            A.merge(model)
        return {c: linear_weights(model) for c, model in base.items()}
    finally:
        F.detach_file(base, "x")


def assert_fused_equal(theirs, ours, base, modules: dict[str, int]):
    for component, weights in theirs.items():
        assert len(weights) == modules[component]  # every adapted module, nothing else
        W0 = linear_weights(base[component])
        for path, W in weights.items():
            assert (W - ours[component][path]).abs().max() <= 1e-5, path
            dW = ours[component][path] - W0[path]
            assert (W - W0[path] - dW).norm() <= 1e-5 * dW.norm() + 1e-7, path


CASES_SD = [("lora", "kohya", "fp32", {}), ("lora", "diffusers", "fp32", {}), ("pissa", "kohya", "fp32", {}),
            ("svf", "diffusers", "fp32", {}), ("lora", "kohya", "fp16", {})]


@pytest.mark.parametrize("method,fmt,dtype,policy", CASES_SD)
def test_diffusers_loads_and_fuses_our_sd_exports(sd, tmp_path, method, fmt, dtype, policy):
    models = train(copies(sd), method)
    af = F.from_models(models, "a")
    path = tmp_path / f"{method}-{fmt}-{dtype}.safetensors"
    F.save(af, path, fmt, dtype=dtype, models=models, **policy)
    back = F.read(path)
    theirs = diffusers_fused(sd, path)
    assert_fused_equal(theirs, studio_merged(sd, back), sd, af.module_counts())
    if dtype == "fp16":  # against the live fp32 adapter: the spec's 5e-3 for half-precision files
        W0 = {c: linear_weights(m) for c, m in sd.items()}
        for key, dW in deltas(models, "a").items():
            component, path = key.split(".", 1)
            error = (theirs[component][path] - W0[component][path] - dW).norm() / dW.norm()
            assert error <= 5e-3, key


CASES_SDXL = [("lora", "kohya", "fp32", {}), ("pissa", "diffusers", "fp32", {}), ("svf", "kohya", "fp16", {"energy": 0.95})]


@pytest.mark.parametrize("method,fmt,dtype,policy", CASES_SDXL)
def test_diffusers_loads_and_fuses_our_sdxl_exports(sdxl, tmp_path, method, fmt, dtype, policy):
    models = train(copies(sdxl), method)
    af = F.from_models(models, "a")
    path = tmp_path / f"xl-{method}-{fmt}.safetensors"
    F.save(af, path, fmt, dtype=dtype, models=models, **policy)
    assert_fused_equal(diffusers_fused(sdxl, path), studio_merged(sdxl, F.read(path)), sdxl, af.module_counts())


def _hand_made(models: dict, names: dict, rank: int = 4, alpha: float = 1.0, seed: int = 3):
    """A kohya file written by hand: {kohya name: (component, module path)} -> tensors, fp16."""
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for name, (component, path) in names.items():
        out, inp = models[component].get_submodule(path).weight.shape
        down = (0.2 * torch.randn(rank, inp, generator=g)).half()
        up = (0.2 * torch.randn(out, rank, generator=g)).half()
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
        expected[(component, path.removeprefix("text_model."))] = (alpha / rank) * up.float() @ down.float()
    return tensors, expected


def _te_names(model, prefix, component):
    return {f"{prefix}_text_model_encoder_layers_{i}_self_attn_{p}_proj":
            (component, f"{'text_model.' if hasattr(model, 'text_model') else ''}encoder.layers.{i}.self_attn.{p}_proj")
            for i in range(len(model.get_submodule(
                ("text_model." if hasattr(model, "text_model") else "") + "encoder.layers"))) for p in ("q", "k", "v", "out")}


def _mixed_with_a_studio_lora(base, tensors, expected, tmp_path):
    file = tmp_path / "hand.safetensors"
    save_file(tensors, str(file), metadata={"ss_network_module": "networks.lora"})
    hand = F.read(file)
    assert hand.method == "lora" and all(t.dtype == torch.float32 for p in hand.parts.values() for t in p.tensors.values())
    models = train(copies(base), "lora", name="mine", seed=7)
    mine = deltas(models, "mine")
    # the hand-made file at 0.7, our own adapter at -0.3
    F.attach_file(hand, models, "hand", weight=0.7)
    for model in models.values():
        A.set_weight(model, "mine", -0.3)
        A.merge(model)
    W0 = {c: linear_weights(m) for c, m in base.items()}
    for (component, path), dW in expected.items():
        want = W0[component][path] + 0.7 * dW - 0.3 * mine[f"{component}.{path}"]
        got = linear_weights(models[component])[path]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return file


def test_hand_made_sd15_kohya_file_imports_and_mixes(sd, tmp_path):
    names = {f"lora_unet_{p.replace('.', '_')}": ("unet", p)   # diffusers-style UNet names, as kohya writes SD1.5
             for p in A.find_targets(sd["unet"], "unet-attn")}
    names.update(_te_names(sd["te"], "lora_te", "te"))
    tensors, expected = _hand_made(sd, names)
    assert any("to_out_0.lora_up" in k for k in tensors) and any("lora_te_text_model_encoder" in k for k in tensors)
    _mixed_with_a_studio_lora(sd, tensors, expected, tmp_path)


def _sgm(path: str) -> str:
    """The documented SDXL SGM numbering: input 1+3b+a, middle 1, output 3b+a (two layers per block)."""
    parts = path.split(".")
    if parts[0] == "down_blocks":
        return f"input_blocks_{1 + 3 * int(parts[1]) + int(parts[3])}_1_" + "_".join(parts[4:])
    if parts[0] == "up_blocks":
        return f"output_blocks_{3 * int(parts[1]) + int(parts[3])}_1_" + "_".join(parts[4:])
    return "middle_block_1_" + "_".join(parts[3:])


def test_hand_made_sdxl_sgm_kohya_file_imports_mixes_and_agrees_with_diffusers(sdxl, tmp_path):
    names = {f"lora_unet_{_sgm(p)}": ("unet", p) for p in A.find_targets(sdxl["unet"], "unet-attn")}
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0" in names
    names.update(_te_names(sdxl["te1"], "lora_te1", "te1"))
    names.update(_te_names(sdxl["te2"], "lora_te2", "te2"))
    tensors, expected = _hand_made(sdxl, names, rank=4, alpha=2.0)
    path = _mixed_with_a_studio_lora(sdxl, tensors, expected, tmp_path)
    hand = F.read(path)
    assert hand.base == "sdxl" and hand.source["unet_layout"] == "sgm"
    assert_fused_equal(diffusers_fused(sdxl, path), studio_merged(sdxl, hand), sdxl, hand.module_counts())
