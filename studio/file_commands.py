"""The ``studio export``, ``studio inspect`` and ``studio bake`` subcommands (registered in cli.py).

CLI glue at cli.py's layer, beside ``generate_command.py``: it loads ``--base`` through ``studio.models``
and writes through ``studio.formats``; ``--format``'s choices and help come from ``formats.layouts``.

Each ``*_arguments`` fills an argparse parser; each ``*_run`` takes the parsed namespace, prints
what happened and returns the exit code. Errors are StudioErrors (cli.py prints ``error: ...``
and exits 2). Heavy imports stay inside the run functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.adapters.registry import METHODS, get
from studio.errors import StudioError
from studio.formats.layouts import DEFAULT, NAMES, describe, layout
from studio.formats.load import parse_spec
from studio.formats.names import FAMILY_NAMES

DTYPE_CHOICES = ("fp16", "bf16", "fp32")


# -- shared ------------------------------------------------------------------------------------
def _load_base(base: str, components: list[str]) -> dict:
    """The base models an adapter needs (converting a method whose delta uses W0, 1x1-conv detection), as
    {component: model}.

    Stable Diffusion bases go through ``studio.models.load_diffusion_base`` (diffusers folder, single-file
    ``.safetensors`` checkpoint or hub id); language-model adapters load a transformers causal-LM folder.
    """
    if "lm" in components:
        return {"lm": _load_lm(base)}
    from studio.models import load_diffusion_base

    try:
        loaded = load_diffusion_base(base)
    except ValueError as err:  # diffusers' word for a folder missing pipeline components
        raise StudioError(f"{base}: cannot load the base model ({str(err).splitlines()[0]}): give the complete "
                          f"diffusers pipeline folder (or .safetensors checkpoint) the adapter was trained on") from None
    models = loaded.components
    missing = [c for c in components if c not in models]
    if missing:
        raise StudioError(f"{base} is an {FAMILY_NAMES[loaded.family]} base ({', '.join(models)}) but the adapter "
                          f"adapts {', '.join(missing)}: give the base the adapter was trained on")
    return models


def _load_lm(folder: str):
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise StudioError(f"{folder}: a language-model adapter needs --base to be a transformers model folder "
                          f"(with config.json)")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise StudioError(f"{folder}: cannot load the base model ({err}): give the folder the adapter was trained on") from None


def _policy_arguments(p: argparse.ArgumentParser, exact_flag: bool) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="keep the R largest singular values per module")
    if exact_flag:
        group.add_argument("--exact", action="store_true", help="exact rank concatenation (the default)")
    else:
        group.add_argument("--energy", type=float, help="keep per module the fewest components retaining this "
                                                        "fraction of ||dW||^2 (1 = exact)")


def _output_arguments(p: argparse.ArgumentParser, default_format: str) -> None:
    p.add_argument("--format", choices=NAMES, default=default_format, help=f"default {default_format}; {describe()}")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="tensor dtype (default fp16; native is always fp32)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file (--format peft: an output folder)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    needing = ", ".join(name for name, m in METHODS.items() if m.TRAITS.needs_base)
    p.add_argument("--base", help="base model (diffusers folder, .safetensors checkpoint or hub id; a transformers "
                                  f"folder for LM adapters): needed to convert adapters whose delta uses the base "
                                  f"weight ({needing}); when given it also decides which modules are 1x1 convolutions")
    p.add_argument("--unet-layout", choices=("sgm", "diffusers"),
                   help="SDXL kohya UNet names: sgm (input_blocks..., default) or diffusers (down_blocks...)")


def _print_report(report, say=print) -> None:
    ranks = ", ".join(str(r) for r in report.ranks) or "-"
    modules = ", ".join(f"{c} {n}" for c, n in report.modules.items())
    alpha = "" if report.alpha is None else f", alpha {report.alpha:g}"
    say(f"wrote {report.path} ({report.format}, {report.dtype}, rank {ranks}{alpha}; modules: {modules})")
    say(f"retained energy {report.energy:.6f}, relative Frobenius error {report.relative_error:.3g}")
    if report.energy < 1.0 and report.per_module:
        worst = sorted(report.per_module.items(), key=lambda kv: kv[1])[:5]
        say("lowest per module: " + ", ".join(f"{k} {v:.4f}" for k, v in worst)
            + " (all stored in studio.energy_retained)")
    for note in report.notes:
        say(f"note: {note}")
    say(f"sha256 {report.sha256} (A1111 short hash {report.sha256[:12]})")


def _models_for(args, files_) -> dict | None:
    """The base for a kohya / diffusers write: needed for methods whose delta uses W0 (TRAITS.needs_base); when
    given, it also tells which modules
    are 1x1 convolutions (else the family rule decides, see ``packing.conv_kernels``)."""
    if args.format == "native":
        return None
    lossless = args.rank is None and args.energy is None and all(layout(args.format).keeps_exactly(af) for af in files_)
    needing = [] if lossless else _needing_base(af for af in files_)
    if needing and not args.base:
        raise StudioError(f"{', '.join(needing)} adapters become plain LoRAs only with their base model's weights: "
                          f"pass --base FOLDER (the base the adapter was trained on), or export --format native")
    if not args.base:
        return None
    return _load_base(args.base, sorted({c for af in files_ for c in af.parts}))


def _needing_base(files_) -> list[str]:
    """Methods among the files' parts whose plain-LoRA form needs the base weights (TRAITS.needs_base)."""
    return sorted({p.method for af in files_ for p in af.parts.values() if get(p.method).TRAITS.needs_base})


# -- export ------------------------------------------------------------------------------------
def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter .safetensors file (native, kohya or diffusers)")
    _policy_arguments(p, exact_flag=False)
    _output_arguments(p, DEFAULT)
    p.add_argument("--no-bundle", action="store_true",
                   help="leave out a pivotal-tuning file's bundled embedding (bundle_emb.* keys: A1111 installs them, "
                        "diffusers refuses a file that has them)")


def export_run(args: argparse.Namespace) -> int:
    from studio.formats import read, save
    from studio.formats.export import default_energy
    from studio.formats.kohya import EMBEDDINGS

    af = read(args.adapter)
    bundled = af.source.get(EMBEDDINGS)
    if bundled and args.no_bundle:
        af.source.pop(EMBEDDINGS)
    elif bundled and args.format != "kohya":  # only kohya files carry bundle_emb keys
        print(f"note: the bundled embedding ({', '.join(e.token for e in bundled)}) stays out of a {args.format} file: "
              f"use the embedding file written beside the run")
    energy = args.energy
    if args.rank is None and energy is None and default_energy(af, args.format) is not None:
        energy = default_energy(af, args.format)
        print(f"{', '.join(af.methods)}: no --rank or --energy given, keeping {energy:.0%} of each module's energy "
              f"(--energy 1 writes the exact full-rank file)")
    models = _models_for(args, [af])
    report = save(af, args.out, args.format, rank=args.rank, energy=energy, dtype=args.dtype, models=models,
                  unet_layout=args.unet_layout, overwrite=args.overwrite)
    _print_report(report)
    if args.format == "diffusers":
        print("note: the diffusers layout loads in diffusers only; use --format kohya for A1111, Forge, ComfyUI")
    if args.format == "peft" and not (af.prompt and af.parts):  # LoRA + prefix: two folders, the notes say how
        print(f"load it with peft.PeftModel.from_pretrained(model, {args.out!r}) on the base it was trained on")
    return 0


# -- inspect -----------------------------------------------------------------------------------
def inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def inspect_run(args: argparse.Namespace) -> int:
    from studio.formats.inspection import inspect_file, render_json, render_text

    info = inspect_file(args.file)
    print(render_json(info) if args.json else render_text(info))
    return 0


# -- bake --------------------------------------------------------------------------------------
def bake_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="FILE:W[:TE_W]", help="adapters with weights, e.g. a.safetensors:0.8")
    _policy_arguments(p, exact_flag=True)
    _output_arguments(p, DEFAULT)
    p.add_argument("--freeze-gates", metavar="PROMPTS.txt",
                   help="bake routed mixtures (molora, mov, mola, loramoe) at their average gates over these prompts "
                        "(one per line) run with the mix live: rendered on an image base, one forward each on a "
                        "language model (--format native); the baked file's error on them is measured")
    p.add_argument("--gate-steps", type=int, default=20,
                   help="denoising steps per prompt for --freeze-gates on an image base (default 20)")


def bake_run(args: argparse.Namespace) -> int:
    from studio.formats import bake, read, save
    from studio.formats.files import check_target

    check_target(args.out, args.overwrite)  # fail before the work
    specs = [parse_spec(s) for s in args.adapters]
    inputs = [(read(path), weight, te_weight) for path, weight, te_weight in specs]
    if args.freeze_gates:
        return _bake_frozen(args, inputs)
    needing = _needing_base(af for af, _, _ in inputs)
    if needing and not args.base:
        raise StudioError(f"baking {', '.join(needing)} adapters needs their base model: pass --base FOLDER")
    models = _load_base(args.base, sorted({c for af, _, _ in inputs for c in af.parts})) if args.base else None
    baked, summary = bake(inputs, rank=args.rank, models=models)
    mode = f"rank {args.rank}" if args.rank else "exact"
    print(f"baked {len(inputs)} adapters ({mode}): retained energy {summary['energy']:.6f}, "
          f"Frobenius error {summary['error']:.4g} (relative {summary['relative_error']:.3g})")
    report = save(baked, args.out, args.format, dtype=args.dtype, models=models, unet_layout=args.unet_layout,
                  overwrite=args.overwrite)
    _print_report(report)
    return 0


def _bake_frozen(args: argparse.Namespace, inputs: list) -> int:
    """``bake --freeze-gates``: image and language-model mixtures alike (``studio.freeze_gates.bake_frozen``)."""
    from studio import freeze_gates

    return freeze_gates.bake_frozen(args, inputs, _print_report)
