"""``studio bake --freeze-gates PROMPTS.txt`` on language-model mixtures (tiny Llama): a one-hot router bakes to
that expert alone, the recorded gates are the routers' token means recomputed from the layer inputs, the reported
error is a recomputation of the baked file against the live mix, and bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line
from lm_helpers import tiny_lm  # noqa: F401  (fixture)
from ui_helpers import ui_library  # noqa: F401  (fixture)

import studio.adapters as A
from studio import formats
from studio.cli import main
from studio.freeze_gates import next_token_logprobs
from studio.models import load_causal_lm

PROMPTS = ["Q: What colour is a frog?\\nA:", "Q: Where does a whale live?\\nA:", "A frog is green."]
"""As typed in a prompts file (one per line, \\n for a newline)."""


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _as_read(prompts=PROMPTS) -> list[str]:
    return [p.replace("\\n", "\n") for p in prompts]


def _mixture(tiny_lm, path: Path, method: str, options: dict, seed: int, hot: int | None = None) -> Path:
    """A native LM mixture on every attention projection, tensors moved off their init; ``hot``: the router
    forced to that expert (R = 0, c one-hot by a margin that makes the other gates exactly 0 in fp32)."""
    model, _ = load_causal_lm(str(tiny_lm))
    A.attach(model, "m", method, A.make_config(method, options), "lm-attn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, "m"):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        if hot is not None:
            for layer in A.targets.layers_of(model, "m").values():
                adapter = layer.adapters["m"]
                adapter.R.zero_()
                adapter.c.fill_(-200.0)
                adapter.c[hot] = 200.0
    formats.save(formats.from_models({"lm": model}, "m"), path, "native")
    return path


def _bake(tiny_lm, tmp_path, capsys, *specs) -> tuple[Path, str]:
    out = tmp_path / "frozen.safetensors"
    capsys.readouterr()
    assert main(["bake", *specs, "--freeze-gates", str(_prompts(tmp_path)), "--base", str(tiny_lm),
                 "--format", "native", "-o", str(out)]) == 0, capsys.readouterr().err
    return out, capsys.readouterr().out


@pytest.mark.parametrize("method,options", [("molora", {"experts": 3, "rank": 2}),
                                            ("mola", {"experts": 3, "top_k": 2, "rank": 2})])
def test_a_one_hot_router_bakes_to_that_experts_lora(tiny_lm, tmp_path, capsys, method, options):
    mixture = _mixture(tiny_lm, tmp_path / "mix.safetensors", method, options, seed=3, hot=1)
    out, printed = _bake(tiny_lm, tmp_path, capsys, f"{mixture}:1")
    assert "froze the gates of 1 routed mixture(s) over 3 prompt(s)" in printed
    baked = formats.read(out)
    assert baked.base == "lm" and baked.method == "lora"
    part = formats.read(mixture).parts["lm"]
    scale = part.config["alpha"] / part.config["rank"] if part.config.get("alpha") else 1.0
    model, _ = load_causal_lm(str(tiny_lm))
    formats.attach_file(baked, {"lm": model}, "b")
    deltas = A.delta_weights(model, "b")
    assert deltas.keys() == part.modules().keys()
    for path, t in part.modules().items():
        want = scale * t["B"][1] @ t["A"][1]                           # expert 1 alone: s B_1 A_1
        # fp32 to a few ulps: the bake re-factorises the rank-E r sum (its exact path is an SVD in fp32)
        torch.testing.assert_close(deltas[path], want, atol=1e-6, rtol=1e-5)
    (gates,) = json.loads(baked.metadata["studio.frozen_gates"]).values()
    assert all(g == [0.0, 1.0, 0.0] for g in gates["lm"].values())
    report = json.loads(baked.metadata["studio.freeze_gates"])
    assert report["mean_kl"] < 1e-9 and report["top1_agreement"] == 1.0 and report["max_abs_prob_error"] < 1e-5


def test_a_one_hot_mov_bakes_to_that_ia3_vector(tiny_lm, tmp_path, capsys):
    mixture = _mixture(tiny_lm, tmp_path / "mov.safetensors", "mov", {"experts": 2}, seed=4, hot=0)
    out, _ = _bake(tiny_lm, tmp_path, capsys, f"{mixture}:1")
    vectors = {p: {"l": t["L"][0]} for p, t in formats.read(mixture).parts["lm"].modules().items()}
    model, tokenizer = load_causal_lm(str(tiny_lm))
    A.attach(model.eval(), "ia3", "ia3", A.make_config("ia3", {}), saved=vectors)   # expert 0 as plain (IA)^3
    want = next_token_logprobs(model, tokenizer, _as_read())
    A.detach(model, "ia3")
    formats.attach_file(formats.read(out), {"lm": model}, "b")
    for got, ref in zip(next_token_logprobs(model, tokenizer, _as_read()), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_recorded_gates_and_the_reported_error_are_recomputed_by_hand(tiny_lm, tmp_path, capsys):
    mixture = _mixture(tiny_lm, tmp_path / "mix.safetensors", "molora", {"experts": 3, "rank": 2}, seed=5)
    pirate = _lm_lora(tiny_lm, tmp_path / "lora.safetensors")
    out, printed = _bake(tiny_lm, tmp_path, capsys, f"{mixture}:0.8", f"{pirate}:0.5")
    baked = formats.read(out)
    report = json.loads(baked.metadata["studio.freeze_gates"])
    (gates,) = json.loads(baked.metadata["studio.frozen_gates"]).values()

    # the gates: softmax(R x + c) at each token of each prompt's forward, the mean over its tokens, then over prompts
    model, tokenizer = load_causal_lm(str(tiny_lm))
    model.eval()
    live = [(mixture, 0.8), (pirate, 0.5)]
    for i, (path, w) in enumerate(live):
        formats.attach_file(formats.read(path), {"lm": model}, f"live{i}", w)
    inputs: dict[str, list] = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, p=p: inputs.setdefault(p, []).append(args[0][0]))
               for p, layer in A.targets.layers_of(model, "live0").items()]
    live_logprobs = next_token_logprobs(model, tokenizer, _as_read())
    for h in handles:
        h.remove()
    tensors = formats.read(mixture).parts["lm"].modules()
    for path, xs in inputs.items():
        R, c = tensors[path]["R"].double(), tensors[path]["c"].double()
        want = torch.stack([(x.double() @ R.T + c).softmax(-1).mean(0) for x in xs]).mean(0)
        torch.testing.assert_close(torch.tensor(gates["lm"][path], dtype=torch.float64), want, atol=2e-6, rtol=0)

    # the error: the written file alone against the live mix, per position of every prompt
    for i in range(len(live)):
        A.detach(model, f"live{i}")
    formats.attach_file(baked, {"lm": model}, "baked")
    static = next_token_logprobs(model, tokenizer, _as_read())
    kl = [float((l.exp() * (l - s)).sum(-1).mean()) for l, s in zip(live_logprobs, static)]
    assert report["per_prompt"] == pytest.approx(kl, abs=1e-6)
    assert report["mean_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-6)
    assert report["mean_kl"] > 1e-4                       # the router weighs experts per token: not exact
    assert report["tokens"] == sum(len(l) for l in live_logprobs)
    same = torch.cat([l.argmax(-1) == s.argmax(-1) for l, s in zip(live_logprobs, static)]).double().mean()
    assert report["top1_agreement"] == pytest.approx(float(same))
    biggest = max(float((l.exp() - s.exp()).abs().max()) for l, s in zip(live_logprobs, static))
    assert report["max_abs_prob_error"] == pytest.approx(biggest, rel=1e-6)
    assert f"mean KL {report['mean_kl']:.4g} nats per token" in printed


def _lm_lora(tiny_lm, path: Path) -> Path:
    model, _ = load_causal_lm(str(tiny_lm))
    A.attach(model, "a", "lora", A.make_config("lora", {"rank": 2}), "lm-attn")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in A.trainable_parameters(model, "a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    formats.save(formats.from_models({"lm": model}, "a"), path, "native")
    return path


def test_bad_lm_freeze_gates_input_is_one_error_line_and_writes_nothing(tiny_lm, ui_library, tmp_path, capsys):
    mixture = _mixture(tiny_lm, tmp_path / "mix.safetensors", "molora", {"experts": 2, "rank": 2}, seed=6)
    out = tmp_path / "frozen.safetensors"
    bake = ["bake", f"{mixture}:1", "--freeze-gates", str(_prompts(tmp_path)), "--base", str(tiny_lm), "-o", str(out)]
    line = one_error_line(capsys, bake)                                  # the default --format kohya
    assert "--format kohya holds Stable Diffusion adapters" in line and "add --format native" in line
    assert "--format peft" in one_error_line(capsys, [*bake, "--format", "lycoris"])
    line = one_error_line(capsys, ["bake", f"{mixture}:1", f"{ui_library['lora']}:1", *bake[2:], "--format", "native"])
    assert "is a language-model adapter and the others are image adapters" in line
    line = one_error_line(capsys, [*bake, "--format", "native", "--base", str(tmp_path / "nowhere")])
    assert "does not exist" in line
    assert not out.exists()
