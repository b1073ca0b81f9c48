"""``studio generate --task lm``: a continuation from the LM with adapter files mixed in, and the
router heat map of a mixture among them (``--gate-map``). The CLI side of ``studio.text``, kept
apart so the LM core does not import the image mix session or the UI's drawing."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from studio import text
from studio.errors import StudioError
from studio.models import load_causal_lm


def load_mix(base: str | None, adapters: list[tuple[str, float]]):
    """``text.load_with_adapters`` and the files as attached: (model, tokenizer, [mixing.AttachedFile])."""
    from studio.mixing import AttachedFile, MixEntry

    model, tokenizer = load_causal_lm(base)
    model.eval()
    files = [AttachedFile(name, Path(path).stem, af, MixEntry(path, weight))
             for name, af, path, weight in text.attach_files(model, adapters)]
    return model, tokenizer, files


def run_text_generate(args: argparse.Namespace) -> int:
    """``studio generate --task lm --prompt P [--adapter FILE:W ...] [--base LM_FOLDER]``: print the continuation."""
    from studio.formats.load import parse_spec

    if not args.prompt:
        raise StudioError("studio generate --task lm needs --prompt TEXT (e.g. --prompt 'Q: What colour is a frog?\\nA:')")
    prompt = args.prompt.replace("\\n", "\n")  # a shell-typed \n is a newline
    if args.max_new_tokens < 1:
        raise StudioError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise StudioError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    specs = []
    for spec in args.adapter:
        path, weight, te_weight = parse_spec(spec)
        if te_weight is not None:
            raise StudioError(f"--adapter {spec}: a language-model adapter takes one weight (FILE:W), not a "
                              f"text-encoder weight")
        specs.append((path, weight))
    from studio.ui import gate_map

    gate_png = gate_map.check_png_path(args.gate_map) if getattr(args, "gate_map", None) else None
    model, tokenizer, files = load_mix(args.base, specs)
    if gate_png:
        gate_map.check_routed(files)
    recording = (gate_map.recording_files({"lm": model}, files, "the completion") if gate_png
                 else contextlib.nullcontext())
    with recording as maps:  # the prompt's forward, then one per new token
        text_out = text.complete(model, tokenizer, [prompt], args.max_new_tokens, stop=None,
                                 temperature=args.temperature, seed=args.seed)[0]
    print(prompt + text_out)
    if gate_png:
        from studio.generate_command import report_gate_map

        report_gate_map(maps, gate_png)
    return 0
