"""``studio train --task lm``: the same flags, --config TOML and --set layers, filling an LMTrainConfig.

trainers/commands.py owns the parser (one ``studio train`` for both tasks) and hands over here when
``--task lm``. Flags that only mean something for images (``--unet-lr``, ``--resolution``, ...) are
unknown keys of LMTrainConfig and are refused by name, with the nearest LM key suggested.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.errors import StudioError


def build_config(args: argparse.Namespace, flags: list, switches: list):
    from studio.config import build, parse_set, read_toml
    from trainers.language_config import LMTrainConfig

    layers = []
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise StudioError(f"cannot resume {args.resume}: it has no config.toml (is it a studio train output?)")
        layers.append((read_toml(saved), str(saved)))
        layers.append(({"out": args.resume}, "--resume"))
    if args.config:
        layers.append((read_toml(args.config), args.config))
    given = {f: getattr(args, f) for _, f, _, _ in flags if hasattr(args, f)}
    given |= {f: True for _, f, _ in switches if f and hasattr(args, f)}
    if args.data:
        given["data"] = args.data
    layers.append((given, "the command line"))
    layers.append((parse_set(args.set), "--set"))
    return build(LMTrainConfig, *layers)


def run(args: argparse.Namespace, flags: list, switches: list) -> int:
    cfg = build_config(args, flags, switches)
    if args.check:
        from studio.models import load_causal_lm
        from trainers import data_text
        from trainers.language import context_length

        model, tokenizer = load_causal_lm(cfg.base)
        context = context_length(model)
        examples = data_text.load_examples(cfg.data, tokenizer, cfg.block_size or context, context)
        tokens = sum(len(e.input_ids) for e in examples)
        targets = sum(sum(1 for t in e.labels if t != data_text.IGNORE) for e in examples)
        kind = "instruction records" if data_text.is_instruction_file(cfg.data) else "packed blocks"
        print(f"{cfg.data}: {len(examples)} {kind}, {tokens} tokens ({targets} with loss), longest "
              f"{max(len(e.input_ids) for e in examples)} of the model's {context}")
        return 0
    from trainers.language import train

    train(cfg, resume=bool(args.resume))
    return 0
