"""``studio bake --freeze-gates PROMPTS.txt``: a routed mixture baked as the static mix at its average gates.

A routed mixture's delta depends on the input, so no plain LoRA equals it. On a set of prompts its
router has an average gate per expert and layer, g; at fixed gates the mixture is a static adapter
(the method's ``freeze`` hook):

    LoRA experts (MoLoRA, MoLA, LoRAMoE):  dW = sum_i g_i s B_i A_i    one LoRA of rank E r
    MoV:                                    l = sum_i g_i l_i           one (IA)^3 vector

which the ordinary bake then mixes with the other inputs. g averages every forward of running the
prompts with the whole mix live, each forward's gates first averaged over its tokens (``mixture.route``
leaves them in ``scratch``, ``GateRecorder`` takes them):

    image bases:     every denoising step of rendering each prompt, both classifier-free-guidance branches;
    language models: one forward over each prompt's tokens (the text the mixture reads; a prompts-file
                     line's literal \\n is a newline, as in ``studio generate --task lm``).

The error is measured, not assumed: the prompts run again with the baked file alone and are compared with
the live mix -- images pixel by pixel (same seeds); a language model's next-token distributions at every
prompt position: the mean KL(live || baked) in nats, the largest probability difference, and how often
the two agree on the most likely token.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import studio.adapters as A
from studio import formats
from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile
from studio.formats.lowrank import uniform_part
from studio.formats.packing import kernel_of
from studio.formats.names import TEXT_ENCODERS, canonical_te_path

MAX_PROMPTS = 64


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    file = Path(path)
    if not file.is_file():
        raise StudioError(f"prompts file {path} does not exist in --freeze-gates: give a text file with one prompt "
                          f"per line")
    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise StudioError(f"prompts file {path} is not UTF-8 text in --freeze-gates: give one prompt per "
                          f"line") from None
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise StudioError(f"prompts file {path} has {len(prompts)} prompts in --freeze-gates: give 1 to {MAX_PROMPTS} "
                          f"(one per line) that show what the mixture will be used for")
    return prompts


def routed_components(af: AdapterFile) -> list[str]:
    """The components of ``af`` that hold a routed mixture (a method with the ``freeze`` hook)."""
    return [c for c, part in af.parts.items() if hasattr(A.registry.get(part.method), "freeze")]


class GateRecorder:
    """Forward hooks on every routed layer of ``files`` ({attached name: AdapterFile} on ``models``): the
    running mean of their ``mean_gate``, one value per forward. Used by the bake here and by the heat map
    (``studio.ui.gate_map``); ``with GateRecorder(...) as recorder:`` removes the hooks on exit."""

    def __init__(self, models: dict, files: dict[str, AdapterFile]):
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.handles = []
        for name, af in files.items():
            for component in routed_components(af):
                for path, layer in A.targets.layers_of(models[component], name).items():
                    adapter = layer.adapters[name]
                    adapter.scratch.pop("mean_gate", None)  # a value left by an earlier forward is not this run's
                    key = (name, component, canonical_te_path(path) if component in TEXT_ENCODERS else path)
                    self.handles.append(layer.register_forward_hook(self._hook(key, adapter)))

    def _hook(self, key, adapter):
        def record(module, inputs, output):
            gate = adapter.scratch.pop("mean_gate", None)  # taken: a layer that did not route leaves nothing stale
            if gate is not None:
                self.sums[key] = self.sums.get(key, 0) + gate.double()
                self.counts[key] = self.counts.get(key, 0) + 1
        return record

    def gates(self, name: str, component: str) -> dict[str, torch.Tensor]:
        """{module path (the file's key): mean gate (E,), float64} of the layers of ``name`` that routed."""
        return {path: self.sums[k] / self.counts[k] for k in self.sums
                for n, c, path in [k] if n == name and c == component}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_inputs(inputs: list[tuple]) -> bool:
    """Whether the bake is of language-model adapters, after the checks both paths share."""
    if not any(routed_components(af) for af, _, _ in inputs):
        raise StudioError("--freeze-gates given but none of the adapters is a routed mixture: drop --freeze-gates "
                          "(a plain bake is exact)")
    lm = {af.base == "lm" for af, _, _ in inputs}
    if len(lm) > 1:
        odd = next(af for af, _, _ in inputs if af.base == "lm")
        raise StudioError(f"{odd.source.get('path', odd.name)} is a language-model adapter and the others are image "
                          f"adapters in --freeze-gates: bake the two kinds separately")
    return lm.pop()


@contextlib.contextmanager
def _attached(inputs: list[tuple], models: dict):
    """Every input attached live on ``models`` for the block, as {name: AdapterFile} (freeze0, freeze1, ...)."""
    names = {f"freeze{i}": af for i, (af, _, _) in enumerate(inputs)}
    done = []
    try:
        for (name, af), (_, w, te_w) in zip(names.items(), inputs):
            formats.attach_file(af, models, name, w, te_w)
            done.append(name)
        yield names
    finally:
        for name in done:
            formats.detach_file(models, name)


def _frozen(inputs: list[tuple], names: dict[str, AdapterFile], recorder: GateRecorder, models: dict):
    """(inputs with each mixture replaced by its ``freeze`` at the recorded gates, {file: {component: {path: g}}})."""
    frozen, gates = [], {}
    for (name, af), (_, w, te_w) in zip(names.items(), inputs):
        routed = routed_components(af)
        if not routed:
            frozen.append((af, w, te_w))
            continue
        parts, where = dict(af.parts), af.source.get("path", af.name)
        for component in routed:
            part, g = af.parts[component], recorder.gates(name, component)
            modules = part.modules()
            missing = sorted(set(modules) - set(g))
            if missing:
                raise StudioError(f"the router of module '{missing[0]}' in {where} never ran on the prompts: "
                                  f"the mixture adapts a model the prompts do not use")
            kernels = {p: kernel_of(component, p, af.base, models[component]) for p in modules}
            static, entries = A.registry.get(part.method).freeze(part.config, modules, g, kernels)
            parts[component] = uniform_part(static, entries, where, kernels)
            gates.setdefault(str(where), {})[component] = {p: [round(v, 6) for v in g[p].tolist()] for p in modules}
        frozen.append((AdapterFile(af.base, parts, metadata=dict(af.metadata), source=dict(af.source)), w, te_w))
    return frozen, gates


# -- image bases ----------------------------------------------------------------------------------
def _settings(prompts: list[str], steps: int, seed: int):
    from studio.pipeline import Settings

    return [Settings(prompt=p, seed=seed + i, steps=steps) for i, p in enumerate(prompts)]


def freeze(inputs: list[tuple], prompts: list[str], base, steps: int, seed: int = 0):
    """Render ``prompts`` with the mix of ``inputs`` [(AdapterFile, w, te_w)] live on ``base`` (a
    ``studio.models.DiffusionBase``), and return (inputs with each mixture frozen at its average gates,
    the live images, the average gates {file: {component: {path: [g_i]}}})."""
    from studio.pipeline import generate

    if _check_inputs(inputs):
        raise StudioError("these are language-model adapters: freeze them with freeze_lm (studio bake --freeze-gates "
                          "does so for language-model files)")
    models = base.components
    with _attached(inputs, models) as names, GateRecorder(models, names) as recorder:
        base.pipe.set_progress_bar_config(disable=True)
        live = generate(base.pipe, _settings(prompts, steps, seed))
    frozen, gates = _frozen(inputs, names, recorder, models)
    return frozen, live, gates


def measure(baked: AdapterFile, base, prompts: list[str], steps: int, seed: int, live: list[np.ndarray]) -> dict:
    """The baked file alone against the live mix on the same prompts and seeds: pixel errors (0-255)."""
    from studio.pipeline import generate

    formats.attach_file(baked, base.components, "frozen")
    try:
        static = generate(base.pipe, _settings(prompts, steps, seed))
    finally:
        formats.detach_file(base.components, "frozen")
    diffs = [np.abs(s.astype(np.float64) - l.astype(np.float64)) for s, l in zip(static, live)]
    errors = [float(d.mean()) for d in diffs]
    return {"prompts": len(prompts), "steps": steps, "seed": seed, "mean_abs_pixel_error": float(np.mean(errors)),
            "max_abs_pixel_error": max(float(d.max()) for d in diffs), "per_prompt": [round(e, 4) for e in errors]}


# -- language models ------------------------------------------------------------------------------
def lm_prompts(prompts: list[str]) -> list[str]:
    """Prompts-file lines as the language model reads them: a typed \\n is a newline (``studio generate --task lm``)."""
    return [p.replace("\\n", "\n") for p in prompts]


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """log p(next token) at every position of each prompt, (tokens, vocab) float64, one unpadded forward each."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out.append(model(**ids).logits[0].double().log_softmax(-1))
    return out


def freeze_lm(inputs: list[tuple], prompts: list[str], model, tokenizer):
    """``freeze`` for language-model adapters: one live forward per prompt over its tokens (``model`` a
    transformers causal LM in eval mode); returns (frozen inputs, the live next-token log-probabilities, gates)."""
    if not _check_inputs(inputs):
        raise StudioError("these are image adapters: freeze them with freeze (studio bake --freeze-gates renders "
                          "the prompts on the image base)")
    models = {"lm": model}
    with _attached(inputs, models) as names, GateRecorder(models, names) as recorder:
        live = next_token_logprobs(model, tokenizer, prompts)
    frozen, gates = _frozen(inputs, names, recorder, models)
    return frozen, live, gates


def measure_lm(baked: AdapterFile, model, tokenizer, prompts: list[str], live: list[torch.Tensor]) -> dict:
    """The baked file alone against the live mix on the same prompts: per position KL(live || baked) (nats),
    |p_live - p_baked| over the vocabulary, and whether the most likely next token is the same."""
    formats.attach_file(baked, {"lm": model}, "frozen")
    try:
        static = next_token_logprobs(model, tokenizer, prompts)
    finally:
        formats.detach_file({"lm": model}, "frozen")
    kl = [(l.exp() * (l - s)).sum(-1) for l, s in zip(live, static)]             # (tokens,) per prompt
    per_prompt = [float(k.mean()) for k in kl]
    agree = torch.cat([l.argmax(-1) == s.argmax(-1) for l, s in zip(live, static)])
    return {"prompts": len(prompts), "tokens": int(agree.numel()), "mean_kl": float(np.mean(per_prompt)),
            "max_abs_prob_error": max(float((l.exp() - s.exp()).abs().max()) for l, s in zip(live, static)),
            "top1_agreement": float(agree.double().mean()), "per_prompt": [round(k, 6) for k in per_prompt]}


def metadata(report: dict, gates: dict) -> dict[str, str]:
    return {"studio.freeze_gates": json.dumps(report), "studio.frozen_gates": json.dumps(gates)}


# -- the command ----------------------------------------------------------------------------------
LM_FORMAT = "native"
"""What a language-model bake writes: kohya, LyCORIS and diffusers files hold Stable Diffusion adapters, and
``studio bake`` writes one .safetensors file, not PEFT's folder (``studio export FILE --format peft`` makes it)."""


def bake_frozen(args, inputs: list[tuple], show) -> int:
    """``studio bake ... --freeze-gates PROMPTS.txt``: the mixtures among ``inputs`` frozen at their average gates on
    the prompts, then the ordinary bake, then the written file run against the live mix on the same prompts.
    ``show(report)`` prints the bake's ExportReport as ``studio bake`` does."""
    prompts = read_prompts(args.freeze_gates)
    if args.gate_steps < 1:
        raise StudioError(f"steps {args.gate_steps} out of range in --gate-steps: give at least 1 "
                          f"(e.g. --gate-steps 20)")
    if _check_inputs(inputs):
        return _bake_frozen_lm(args, inputs, lm_prompts(prompts), show)
    from studio.formats import bake, read, save
    from studio.models import load_diffusion_base

    base = load_diffusion_base(args.base)
    frozen, live, gates = freeze(inputs, prompts, base, args.gate_steps)
    baked, summary = bake(frozen, rank=args.rank, models=base.components)
    options = dict(dtype=args.dtype, models=base.components, unet_layout=args.unet_layout)
    with tempfile.TemporaryDirectory() as scratch:  # measure the file as written (its dtype, its layout)
        trial = Path(scratch) / Path(args.out).name
        save(baked, trial, args.format, **options)
        report = measure(read(trial), base, prompts, args.gate_steps, 0, live)
    baked = baked.replace(metadata={**baked.metadata, **metadata(report, gates)})
    print(f"froze the gates of {len(gates)} routed mixture(s) over {len(prompts)} prompt(s) x {args.gate_steps} steps; "
          f"baked {len(inputs)} adapters ({_mode(args)}): retained energy {summary['energy']:.6f}")
    print(f"measured on those prompts, the written file vs the live mix: mean |pixel error| "
          f"{report['mean_abs_pixel_error']:.3f} of 255 (max {report['max_abs_pixel_error']:.0f}; per prompt "
          f"{report['per_prompt']})")
    show(save(baked, args.out, args.format, overwrite=args.overwrite, **options))
    return 0


def _bake_frozen_lm(args, inputs: list[tuple], prompts: list[str], show) -> int:
    from studio.formats import bake, read, save
    from studio.models import load_causal_lm

    if args.format != LM_FORMAT:
        raise StudioError(f"--format {args.format} holds Stable Diffusion adapters, and these are language-model "
                          f"adapters in --freeze-gates: add --format {LM_FORMAT} (then studio export FILE --format "
                          f"peft for a PEFT folder)")
    model, tokenizer = load_causal_lm(args.base)
    model.eval()
    frozen, live, gates = freeze_lm(inputs, prompts, model, tokenizer)
    baked, summary = bake(frozen, rank=args.rank, models={"lm": model})
    with tempfile.TemporaryDirectory() as scratch:  # measure the file as written (native: always fp32)
        trial = Path(scratch) / "frozen.safetensors"
        save(baked, trial, LM_FORMAT, models={"lm": model})
        report = measure_lm(read(trial), model, tokenizer, prompts, live)
    baked = baked.replace(metadata={**baked.metadata, **metadata(report, gates)})
    print(f"froze the gates of {len(gates)} routed mixture(s) over {len(prompts)} prompt(s) ({report['tokens']} "
          f"tokens); baked {len(inputs)} adapters ({_mode(args)}): retained energy {summary['energy']:.6f}")
    print(f"measured on those prompts, the baked file vs the live mix: mean KL {report['mean_kl']:.4g} nats per token "
          f"(max |probability error| {report['max_abs_prob_error']:.3g}; same most likely token at "
          f"{report['top1_agreement']:.1%} of positions; per prompt {report['per_prompt']})")
    show(save(baked, args.out, LM_FORMAT, overwrite=args.overwrite, models={"lm": model}))
    return 0


def _mode(args) -> str:
    return f"rank {args.rank}" if args.rank else "exact"

