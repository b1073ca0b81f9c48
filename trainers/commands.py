"""``studio train`` arguments: flags, --config TOML and --set fill one trainer config.

One parser serves both tasks. Its flags are the fields of ``DiffusionTrainConfig`` and
``LMTrainConfig`` (``--field-name``, help = the field's docstring, grouped by section), so a new
field is a new flag with nothing to add here. A flag of the other task is an unknown key of
this task's config and is refused by name, with the nearest valid key suggested.

Precedence (later wins): the saved config.toml of a run being resumed, --config, flags, --set.
Flags default to "not given", so only what the user typed overrides the layers below it. The
task comes from the same layers (``task = "lm"`` in a config file selects the LM trainer).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from studio.errors import StudioError

ALIASES = {"out": ("-o",)}
"""Short flags of config fields (``-o DIR`` as in export / bake / generate)."""
POSITIONAL = ("data", "task")
"""Fields with a hand-written argument: the positional DATA and --task (it picks the config class)."""


def configs() -> dict:
    from trainers.diffusion_config import DiffusionTrainConfig
    from trainers.language_config import LMTrainConfig

    return {"image": DiffusionTrainConfig, "lm": LMTrainConfig}


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if value not in (None, "", [], {}) else None


def _help(name: str, docs: dict, fields: dict) -> str:
    """The field's first docstring sentence and its default, per task where the tasks differ."""
    from studio.config import first_sentence

    tasks = [t for t in fields if name in fields[t]]
    texts = {t: first_sentence(docs[t].get(name, "")) for t in tasks}
    defaults = {t: _default(fields[t][name]) for t in tasks}
    if len(set(texts.values())) == 1:
        text = texts[tasks[0]]
    else:
        text = " ".join(texts[t] if t == "image" else f"--task {t}: {texts[t]}" for t in tasks)
    shown = [(t, d) for t, d in defaults.items() if d is not None]
    if shown and len({str(d) for _, d in shown}) == 1 and len(shown) == len(tasks):
        text += f" [default: {shown[0][1]}]"
    elif shown:
        text += " [default: " + "; ".join(f"{d}" if t == "image" else f"--task {t}: {d}" for t, d in shown) + "]"
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from studio import prompt
    from studio.adapters import registry
    from studio.config import add_flag, field_docs, field_types
    from trainers.spec import AdapterSpec, TrainSpec

    classes = configs()
    fields = {t: {f.name: f for f in dataclasses.fields(c)} for t, c in classes.items()}
    docs = {t: field_docs(c) for t, c in classes.items()}
    kinds = {t: field_types(c) for t, c in classes.items()}
    p.add_argument("data", nargs="?", help="folder of images with same-name .txt captions (--task lm: a .txt or "
                                           ".jsonl file, default the sample task)")
    p.add_argument("--task", choices=list(classes), help="image (default) or lm (causal language model); "
                                                         "also read from the config's task key")
    adapter = {f.name for f in dataclasses.fields(AdapterSpec)}
    sections = {"adapter (both tasks)": adapter, "run (both tasks)": {f.name for f in dataclasses.fields(TrainSpec)} - adapter,
                "images": set(fields["image"]), "language models (--task lm)": set(fields["lm"])}
    done = set(POSITIONAL)
    for title, names in sections.items():
        group = p.add_argument_group(title)
        for task in classes:  # in field order
            for name in (n for n in fields[task] if n in names and n not in done):
                done.add(name)
                extra = {}
                if name == "method":  # the registries are the only lists of methods (layer, prompt-side)
                    extra = dict(choices=[*registry.METHODS, *prompt.METHODS], metavar="METHOD")
                    text = (f"adapter method (default {fields[task][name].default}): {registry.help_text()}; "
                            f"prompt-side: {prompt.help_text()}")
                else:
                    text = _help(name, docs, fields)
                add_flag(group, name, kinds[task][name], text, ALIASES.get(name, ()), **extra)
        if title == "images":
            group.add_argument("--no-cache", dest="no_cache", action="store_true", default=argparse.SUPPRESS,
                               help="do not cache latents or text-encoder outputs (--no-cache-latents --no-cache-text)")
    p.add_argument("--config", help="TOML file with any config keys (relative paths are read from the current folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (method_args.NAME=VALUE for a method option)")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR exactly")
    p.add_argument("--check", action="store_true", help="lint the data (and validate the config) and exit")


def build_config(args: argparse.Namespace):
    from studio.config import build, parse_set, read_toml

    classes = configs()
    layers = []
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise StudioError(f"cannot resume {args.resume}: it has no config.toml (is it a studio train output?)")
        layers.append((read_toml(saved), str(saved)))
        layers.append(({"out": args.resume}, "--resume"))
    if args.config:
        layers.append((read_toml(args.config), args.config))
    names = {f.name for c in classes.values() for f in dataclasses.fields(c)} - set(POSITIONAL)
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if getattr(args, "no_cache", False):
        given |= {"cache_latents": False, "cache_text": False}
    if args.data:
        given["data"] = args.data
    if args.task:
        given["task"] = args.task
    layers.append((given, "the command line"))
    layers.append((parse_set(args.set), "--set"))
    task = next((layer["task"] for layer, _ in reversed(layers) if "task" in layer), "image")
    if task not in classes:
        raise StudioError(f"task = {task!r}: studio train has the tasks {', '.join(classes)}")
    return checked(build(classes[task], *layers))


def checked(cfg):
    """What ``studio train`` refuses besides the config's own checks (the UI's Train tab builds
    its configs through here too)."""
    resolution = getattr(cfg, "resolution", None)
    if resolution is not None and resolution <= 0:  # `cfg.resolution or native` would read 0 as "the default"
        raise StudioError(f"--resolution {resolution} in the train config is not a size: give the training size in "
                          "pixels (e.g. --resolution 512), or leave it out for the base's native size")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if cfg.task == "lm":
        from trainers import language_commands

        return language_commands.run(cfg, check=args.check, resume=bool(args.resume))
    if args.check:
        from trainers.data_images import check, format_report

        from studio.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.base)
        problems = 0
        for folder in (cfg.data, cfg.reg_data):
            if folder:
                report = check(folder, min_size=32, tokenizer=tokenizer)
                print(format_report(report, folder))
                problems += report.problems
        _check_memory(cfg)
        return 0 if problems == 0 else 1
    from trainers.diffusion import train

    train(cfg, resume=bool(args.resume))
    return 0


def _check_memory(cfg) -> None:
    """The run's memory estimate (trainers/memory.py) and, with --vram-budget, what to turn on (memory_report.py)."""
    from trainers import memory, memory_report

    estimate = memory.estimate_diffusion(cfg)
    print(memory_report.report(estimate, cfg))
    if cfg.vram_budget is not None:
        print(memory_report.advise(estimate, cfg, memory.parse_size(cfg.vram_budget)))
