"""``studio generate``: images from a base plus a weighted mix of adapter files (``--task image``),
or text from a language model (``--task lm``, provided by ``studio.text``).

    studio generate --prompt "stripes, a red circle" --adapter out/stripes.safetensors:0.8 \\
        --adapter out/outline.safetensors:0.5:0 --seed 3 --count 4 --out renders/

Each image is written as ``DIR/NNNNN-SEED.png`` with an A1111-style ``parameters`` chunk. The
mix goes through :class:`studio.mixing.MixSession`, the same code the web UI runs, so the UI and
this command give identical pixels for identical settings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
from pathlib import Path

from studio.errors import StudioError

DEFAULTS = dict(steps=20, cfg=4.0, sampler="dpmpp_2m", seed=0)
SIZE_FACTOR = 4
"""Sizes above this many times the base's native size per side are refused without --force-size:
the 64-px mini base asked for 2048 px renders 1024 x the pixels, for many minutes, and what it
draws there is noise (it never saw such latents)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("image", "lm"), default="image", help="image (default) or lm (text)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:W[:TE_W]]",
                   help="adapter file with UNet weight and optional text-encoder weight; repeat to mix")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the first image (then +1 each)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--cfg", type=float, default=DEFAULTS["cfg"], help="classifier-free guidance scale")
    p.add_argument("--size", help=f"WxH or N pixels (default: the base's native size; at most {SIZE_FACTOR} x the "
                                  "native size per side unless --force-size)")
    p.add_argument("--force-size", action="store_true",
                   help="render a --size above the limit anyway (up to 2048 px; the time grows with the pixels)")
    p.add_argument("--sampler", default=DEFAULTS["sampler"], help="ddim, euler, euler_a or dpmpp_2m")
    p.add_argument("--count", type=int, default=1, help="images, seeds SEED..SEED+N-1")
    p.add_argument("--merge", action="store_true", help="merge the mix into the weights once (faster batches)")
    p.add_argument("--base", help="diffusers folder, .safetensors checkpoint or hub id (default: the mini base)")
    p.add_argument("--out", default="outputs/generate", help="output folder")
    p.add_argument("--gate-map", metavar="FILE.png",
                   help="write the routed mixtures' mean gate per expert and block as a heat map (every image of "
                        "the command; --task lm: the completion's forwards)")
    # language-model options, read by studio.text when --task lm
    p.add_argument("--max-new-tokens", type=int, default=64, help="(lm) tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="(lm) 0 = greedy")


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match:
        raise StudioError(f"bad size {text!r} in --size: use WxH (e.g. 512x768) or one number for a square")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def adapter_spec(spec: str) -> tuple[str, float, float | None]:
    """``FILE[:W[:TE_W]]`` as (file, weight, text-encoder weight). A file name may hold ':' itself,
    so a part that is not a number reads as part of the name; when what precedes it is an adapter
    file, the user meant a weight, and that is what the error names (not a missing file)."""
    from studio.formats.load import parse_spec

    path, weight, te_weight = parse_spec(spec)
    if ":" in path and not Path(path).exists():
        parts = path.split(":")
        for i in range(len(parts) - 1, 0, -1):
            head = ":".join(parts[:i])
            if head.endswith(".safetensors") or Path(head).is_file():
                bad = [p for p in parts[i:] if not _is_number(p)]
                what = f"weight {bad[0]!r} is not a number" if bad else "more than two weights are given"
                raise StudioError(f"{what} in --adapter {spec}: write {head}:0.8 (UNet weight) or "
                                  f"{head}:0.8:0.5 (UNet and text-encoder weights)")
    return path, weight, te_weight


def check_size(width: int | None, height: int | None, native: int, force: bool) -> list[str]:
    """Refuse a size far above the base's native one (unless forced); a forced one gets a note
    with its cost in pixels against a native image."""
    if width is None:
        return []
    limit = SIZE_FACTOR * native
    if max(width, height) <= limit:
        return []
    from studio.pipeline import MAX_SIZE

    cost = min(width, MAX_SIZE) * min(height, MAX_SIZE) / native ** 2
    if not force:
        raise StudioError(f"size {width}x{height} in --size is more than {SIZE_FACTOR} x this base's native {native} px "
                          f"per side (about {cost:,.0f} x the pixels, and the time, of a native image): give at most "
                          f"{limit}x{limit}, or add --force-size to render it anyway")
    return [f"--force-size: {min(width, MAX_SIZE)}x{min(height, MAX_SIZE)} is about {cost:,.0f} x the pixels of this "
            f"base's native {native}x{native}; expect at least that many times the time per image"]


def next_index(out: Path) -> int:
    """A1111-style running number: one past the highest NNNNN- prefix in ``out``."""
    numbers = [int(m.group(1)) for f in out.glob("*.png") if (m := re.match(r"(\d{5})-", f.name))]
    return max(numbers, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    if args.task == "lm":
        return _run_text(args)
    from studio.mixing import MixEntry, MixSession
    from studio.models import load_diffusion_base
    from studio.pipeline import default_size, parameters_text, save_png, within_limits
    from studio.ui import gate_map

    if not 1 <= args.count <= 1000:
        raise StudioError(f"count {args.count} out of range in --count: give 1 to 1000")
    if args.steps < 1:
        raise StudioError(f"steps {args.steps} out of range in --steps: give at least 1 (e.g. --steps 20)")
    gate_png = gate_map.check_png_path(args.gate_map, made=args.out) if args.gate_map else None
    width, height = parse_size(args.size)
    entries = [MixEntry(*adapter_spec(spec)) for spec in args.adapter]
    base = load_diffusion_base(args.base)
    for note in check_size(width, height, default_size(base.pipe), args.force_size):
        print(f"note: {note}")
    base.pipe.set_progress_bar_config(disable=True)
    session = MixSession(base)
    session.sync(entries)
    if gate_png:
        gate_map.check_routed(session.attached())
    settings = []
    for i in range(args.count):
        s = session.settings(prompt=args.prompt, negative=args.negative, seed=args.seed + i, steps=args.steps,
                             cfg=args.cfg, width=width, height=height, sampler=args.sampler)
        s, notes = within_limits(base.pipe, s)
        if i == 0:
            for note in notes:
                print(f"note: {note}")
        settings.append(s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    index = next_index(out)
    scope = "the image" if len(settings) == 1 else f"{len(settings)} images"
    recording = gate_map.recording(session, scope) if gate_png else contextlib.nullcontext()
    with session.merged() if args.merge else contextlib.nullcontext(), recording as maps:  # (routers never merge)
        for i, s in enumerate(tqdm(settings, desc="generate", unit="image", disable=len(settings) == 1)):
            image = session.render([s])[0]
            path = out / f"{index + i:05d}-{s.seed}.png"
            save_png(image, path, parameters_text(s, image.shape[1], image.shape[0]))
            print(f"wrote {path}")
    if gate_png:
        report_gate_map(maps, gate_png)
    return 0


def report_gate_map(maps, target: Path) -> None:
    """Write the heat map of ``maps`` and say what it holds."""
    from studio.ui import gate_map

    gate_map.write_png(maps, target)
    shapes = ", ".join(f"{m.title}: {len(m.rows)} blocks x {max(len(g) for _, g in m.rows)} experts" for m in maps)
    print(f"wrote {target} (router mean gate per expert and block; {shapes})")


def _run_text(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("studio.text") is None:
        raise StudioError("the language-model path (studio.text) is not installed in --task lm: "
                          "use --task image, or install the version with studio/text.py")
    from studio import text_generate

    return text_generate.run_text_generate(args)
