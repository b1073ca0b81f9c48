"""``studio ui``: check the bind and the credentials, build the app, serve it.

    studio ui [--adapters DIR] [--outputs DIR] [--host 127.0.0.1] [--port 7860] [--auth USER:PASS]
              [--base NAME=PATH ...] [--datasets DIR]

The security decisions (loopback or password, reachable folders, upload limit) are made here,
before any model is loaded, so a refused launch costs nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from studio.errors import StudioError
from studio.ui.security import AUTH_ENV, MAX_UPLOAD_BYTES, check_bind, file_access

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATASETS = [REPO / "sample_data" / "styles", REPO / "sample_data" / "characters"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", default="adapters", help="the adapter library folder (trained adapters go here)")
    p.add_argument("--outputs", default="outputs/ui", help="where generated images and grids are written")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --auth")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", help=f"USER:PASS required to open the app (or set {AUTH_ENV})")
    p.add_argument("--base", action="append", default=[], metavar="NAME=PATH",
                   help="an extra base for the picker: diffusers folder, .safetensors checkpoint or hub id")
    p.add_argument("--lm-base", action="append", default=[], metavar="NAME=PATH",
                   help="an extra language model for the Text tab: transformers folder or hub id")
    p.add_argument("--datasets", help="folder whose sub-folders are training datasets (besides the samples)")


def parse_bases(specs: list[str], flag: str = "--base") -> dict[str, str]:
    bases = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise StudioError(f"bad {flag} {spec!r} in studio ui: use NAME=PATH, e.g. sd15=/models/sd15")
        bases[name] = path
    return bases


def find_datasets(extra: str | None) -> dict[str, Path]:
    """Dataset folders by name: the sample styles / characters and the sub-folders of --datasets."""
    roots = SAMPLE_DATASETS + ([Path(extra).expanduser().resolve()] if extra else [])
    if extra and not roots[-1].is_dir():
        raise StudioError(f"--datasets {extra} is not a folder in studio ui: give a folder of dataset folders")
    found = {}
    for root in roots:
        for folder in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")):
            found.setdefault(folder.name if root in SAMPLE_DATASETS else f"{root.name}/{folder.name}", folder)
    return found


def start(adapters: str | Path, outputs: str | Path, host: str = "127.0.0.1", port: int | None = 7860,
          auth: str | None = None, bases: dict[str, str] | None = None, datasets: str | None = None,
          prevent_thread_lock: bool = False, environ: dict | None = None, lm_bases: dict[str, str] | None = None):
    """Check, build and launch; returns (demo, local_url). Tests call this with prevent_thread_lock."""
    credentials = check_bind(host, auth, environ)  # before anything heavy is imported or loaded
    found = find_datasets(datasets)
    from studio.ui.app import build_app
    from studio.ui.service import Studio

    studio = Studio(adapters, outputs, bases)
    allowed, blocked = file_access(
        [studio.library.root, studio.outputs] + [p for p in SAMPLE_DATASETS if p.is_dir()],
        [REPO / ".git", REPO / "sample_data" / "mini-sd", REPO / "sample_data" / "mini-sd-train-state",
         REPO / "sample_data" / "mini-lm",
         *(Path(b) for b in {**(bases or {}), **(lm_bases or {})}.values() if Path(b).exists())])
    demo = build_app(studio, found, lm_bases=lm_bases)
    import gradio as gr

    from studio.ui.app import CSS

    if not prevent_thread_lock:
        shown = f"[{host}]" if ":" in host else host
        print(f"studio ui on http://{shown}:{port or 7860}  (adapters {studio.library.root}, outputs {studio.outputs}; "
              f"{'password required' if credentials else 'this machine only'}; Ctrl+C stops)", flush=True)
    _, local_url, _ = demo.launch(
        server_name=host, server_port=port, auth=credentials, allowed_paths=allowed, blocked_paths=blocked,
        max_file_size=MAX_UPLOAD_BYTES, prevent_thread_lock=prevent_thread_lock, share=False, quiet=True,
        show_error=False, footer_links=[], css=CSS, theme=gr.themes.Soft())
    if not prevent_thread_lock:  # launch blocked until Ctrl+C: a training run does not outlive the app
        demo.studio_runner.stop()
    return demo, local_url


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    start(args.adapters, args.outputs, args.host, args.port, args.auth, parse_bases(args.base), args.datasets,
          lm_bases=parse_bases(args.lm_base, "--lm-base"))
    return 0
