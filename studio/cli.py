"""The ``studio`` command: one dict of subcommands, each a small function.

Every subcommand is ``name -> (help, add_arguments, run)``. ``run`` receives the parsed
arguments and returns an exit code. Heavy imports (torch, diffusers) happen inside ``run`` so
``studio --help`` answers instantly. A :class:`~studio.errors.StudioError` anywhere becomes
one ``error: ...`` line on stderr and exit code 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

from studio.errors import StudioError


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="all", help="lora, pissa, milora, svf or all")
    p.add_argument("--steps", type=int, default=60, help="training steps per method")
    p.add_argument("--seed", type=int, default=0)


def _demo_run(args: argparse.Namespace) -> int:
    from studio.demo import run_demo

    return run_demo(method=args.method, steps=args.steps, seed=args.seed)


COMMANDS: dict[str, Command] = {
    "demo": Command("fit every adapter method on a tiny model and print what happened",
                    _demo_arguments, _demo_run),
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
