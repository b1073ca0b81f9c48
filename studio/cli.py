"""The ``studio`` command: one dict of subcommands, each a small function.

Every subcommand is ``name -> (help, add_arguments, run)``. ``run`` receives the parsed
arguments and returns an exit code. Heavy imports (torch, diffusers) happen inside ``run`` so
``studio --help`` answers instantly. A :class:`~studio.errors.StudioError` anywhere becomes
one ``error: ...`` line on stderr and exit code 2 -- never a traceback. A closed output pipe
(``studio inspect X | head``) ends the command quietly with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, NamedTuple

from studio.allocator import keep_freed_memory
from studio.errors import StudioError
from studio.formats import layouts  # the table of file layouts: light, its modules load on use


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="all", help="one adapter method (see `studio train --help`) or all")
    p.add_argument("--steps", type=int, default=60, help="training steps per method")
    p.add_argument("--seed", type=int, default=0)


def _demo_run(args: argparse.Namespace) -> int:
    from studio.demo import run_demo

    return run_demo(method=args.method, steps=args.steps, seed=args.seed)


def _make_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder of the diffusers pipeline, e.g. sample_data/mini-sd")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--resume", action="store_true", help="continue training the pipeline in OUT")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 if sharing the CPU)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of the diffusion stage")
    p.add_argument("--steps", type=int, default=200_000, help="diffusion steps in this sitting")
    p.add_argument("--vae-minutes", type=float, default=8.0, help="wall-clock budget of the VAE stage")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wild", type=float, default=0.0, help="fraction of uncaptioned texture images per batch")
    p.add_argument("--save-minutes", type=float, default=10.0, help="save improving weights this often")
    p.add_argument("--seed", type=int, default=0)


def _make_base_run(args: argparse.Namespace) -> int:
    from trainers.mini_base import MiniBaseConfig, make_base

    cfg = MiniBaseConfig(out=args.out, quick=args.quick, overwrite=args.overwrite,
                         resume=args.resume, threads=args.threads, minutes=args.minutes,
                         steps=args.steps, vae_minutes=args.vae_minutes, batch=args.batch,
                         lr=args.lr, wild=args.wild, save_minutes=args.save_minutes, seed=args.seed)
    make_base(cfg, say=lambda msg: print(msg, flush=True))
    return 0


def _make_lm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder of the transformers model, e.g. sample_data/mini-lm")
    p.add_argument("--text", default="sample_data/text", help="folder the sample texts are written to")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--batch", type=int, default=16, help="blocks of 256 tokens per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 if sharing the CPU)")
    p.add_argument("--seed", type=int, default=0)


def _make_lm_run(args: argparse.Namespace) -> int:
    from trainers.mini_lm import MiniLMConfig, make_lm

    cfg = MiniLMConfig(out=args.out, text=args.text, quick=args.quick, overwrite=args.overwrite, minutes=args.minutes,
                       batch=args.batch, lr=args.lr, threads=args.threads, seed=args.seed)
    make_lm(cfg, say=lambda msg: print(msg, flush=True))
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from trainers.commands import add_arguments

    add_arguments(p)


def _train_run(args: argparse.Namespace) -> int:
    from trainers.commands import run

    return run(args)


def train_config_class(task: str = "image") -> type:
    """The config dataclass ``studio train --task TASK`` fills. The UI's Train tab builds its form
    from it and runs the command on what the form gives: the UI reaches trainers only through here."""
    from trainers.commands import configs

    return configs()[task]


def train_config(*layers: tuple[dict, str], task: str = "image"):
    """``studio train``'s config from (values, source) layers, checked as the command checks it."""
    from studio.config import build
    from trainers.commands import checked

    return checked(build(train_config_class(task), *layers))


def _module(module: str, name: str) -> Callable:
    """``studio.<module>.<name>``, imported only when the subcommand runs."""
    def call(arg):
        import importlib
        return getattr(importlib.import_module(f"studio.{module}"), name)(arg)
    return call


COMMANDS: dict[str, Command] = {
    "train": Command("train a style or character adapter on a folder of captioned images",
                     _train_arguments, _train_run),
    "demo": Command("fit every adapter method on a tiny model and print what happened",
                    _demo_arguments, _demo_run),
    "make-base": Command("train the embedded mini base model (shapes world) into a diffusers folder",
                         _make_base_arguments, _make_base_run),
    "make-lm": Command("train the embedded mini language model (text world) into a transformers folder",
                       _make_lm_arguments, _make_lm_run),
    "export": Command(f"write an adapter in another file layout: {', '.join(layouts.NAMES)} (default {layouts.DEFAULT})",
                      _module("file_commands", "export_arguments"), _module("file_commands", "export_run")),
    "inspect": Command("show what an adapter file is: format, base, method, ranks, trigger words, hash, metadata",
                       _module("file_commands", "inspect_arguments"), _module("file_commands", "inspect_run")),
    "bake": Command("bake weighted adapters into one LoRA file (exact, or at a rank with the error reported)",
                    _module("file_commands", "bake_arguments"), _module("file_commands", "bake_run")),
    "generate": Command("generate images from a base and a weighted mix of adapters (--task lm: text)",
                        _module("generate_command", "add_arguments"), _module("generate_command", "run")),
    "ui": Command("the web UI: mix adapters with sliders, bake, train, inspect (binds 127.0.0.1)",
                  _module("ui.launch", "add_arguments"), _module("ui.launch", "run")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time notes about torchvision
    # diffusers imports bitsandbytes whenever it is installed (the [gpu] extra), and its CPU backend asks
    # the `kernels` package at import for a 4-bit kernel the studio never uses, each warning when that
    # fails or is skipped offline: lines a user cannot act on
    for noisy in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # every command's steps reuse freed activation memory instead of faulting it in again: an SD1.5
    # UNet step is 12-20 % shorter on CPU, training and generating alike (studio/allocator.py)
    keep_freed_memory()
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here, not as a traceback at interpreter exit
    except BrokenPipeError:
        # the reader went away (`studio inspect X | head`): stop quietly. Python's recipe
        # (docs.python.org/3/library/signal.html#note-on-sigpipe): point stdout at devnull so the
        # final flush at exit does not raise again, and exit 1 as Python does on EPIPE.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured, replaced)
            pass
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted by the user", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
