"""``studio train`` arguments: flags, --config TOML and --set fill one DiffusionTrainConfig.

Precedence (later wins): the saved config.toml of a run being resumed, --config, flags, --set.
Flags default to "not given", so only what the user typed overrides the layers below it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.errors import StudioError

FLAGS = [  # (flag, config field, type, help)
    ("--base", "base", str, "diffusers folder, hub id or .safetensors checkpoint (default: the mini base)"),
    ("--out", "out", str, "output folder (default outputs/<dataset>-<method>)"),
    ("--name", "name", str, "adapter name (default: the dataset folder's name)"),
    ("--method", "method", str, "lora | pissa | milora | svf"),
    ("--rank", "rank", int, "rank of lora / pissa / milora"),
    ("--alpha", "alpha", float, "LoRA alpha (default = rank)"),
    ("--targets", "targets", str, "unet-transformer (default, kohya's set) or unet-attn; te-attn; comma-joined"),
    ("--unet-lr", "unet_lr", float, "UNet learning rate (default per method)"),
    ("--te-lr", "te_lr", float, "text-encoder learning rate"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--epochs", "epochs", int, "epochs when --steps is not given"),
    ("--batch-size", "batch_size", int, "images per step per process"),
    ("--resolution", "resolution", int, "training resolution in pixels"),
    ("--seed", "seed", int, "seed of everything random"),
    ("--trigger", "trigger", str, "trigger word prepended to captions that lack it"),
    ("--reg-data", "reg_data", str, "class images for prior preservation"),
    ("--prior-loss-weight", "prior_loss_weight", float, "weight of the class images' loss"),
    ("--caption-dropout", "caption_dropout", float, "probability of an empty caption"),
    ("--noise-offset", "noise_offset", float, "offset noise strength"),
    ("--min-snr-gamma", "min_snr_gamma", float, "min-SNR gamma"),
    ("--lr-schedule", "lr_schedule", str, "constant | cosine | linear"),
    ("--warmup-steps", "warmup_steps", int, "LR warmup steps"),
    ("--save-every", "save_every", int, "checkpoint every N steps"),
    ("--save-adapter-every", "save_adapter_every", int, "also write <name>-step<N>.safetensors every N steps"),
    ("--sample-every", "sample_every", int, "sample grid every N steps (0: end only)"),
    ("--mixed-precision", "mixed_precision", str, "no | fp16 | bf16"),
    ("--lr", "lr", float, "(--task lm) adapter learning rate (default per method)"),
    ("--block-size", "block_size", int, "(--task lm) tokens per packed block of plain text (default: the context)"),
]
SWITCHES = [("--flip", "flip", "random horizontal flips"), ("--shuffle-captions", "shuffle_captions", "shuffle tags"),
            ("--no-cache", None, "do not cache latents or text-encoder outputs")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="folder of images with same-name .txt captions (--task lm: a .txt or "
                                           ".jsonl file, default the sample task)")
    for flag, field, kind, help_text in FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)
    for flag, field, help_text in SWITCHES:
        p.add_argument(flag, dest=field or "no_cache", action="store_true", default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--config", help="TOML file with any config keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--resume", metavar="OUTPUT_DIR", help="continue the run in OUTPUT_DIR exactly")
    p.add_argument("--check", action="store_true", help="lint the dataset and exit")
    p.add_argument("--task", default="image", choices=["image", "lm"], help="image (default) or lm (causal language model)")


def build_config(args: argparse.Namespace):
    from studio.config import build, parse_set, read_toml
    from trainers.diffusion_config import DiffusionTrainConfig

    layers = []
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise StudioError(f"cannot resume {args.resume}: it has no config.toml (is it a studio train output?)")
        layers.append((read_toml(saved), str(saved)))
        layers.append(({"out": args.resume}, "--resume"))
    if args.config:
        layers.append((read_toml(args.config), args.config))
    given = {f: getattr(args, f) for _, f, _, _ in FLAGS if hasattr(args, f)}
    given |= {f: True for _, f, _ in SWITCHES if f and hasattr(args, f)}
    if getattr(args, "no_cache", False):
        given |= {"cache_latents": False, "cache_text": False}
    if args.data:
        given["data"] = args.data
    layers.append((given, "the command line"))
    layers.append((parse_set(args.set), "--set"))
    return build(DiffusionTrainConfig, *layers)


def run(args: argparse.Namespace) -> int:
    if args.task == "lm":
        from trainers import language_commands

        return language_commands.run(args, FLAGS, SWITCHES)
    cfg = build_config(args)
    if args.check:
        from trainers.data_images import check, format_report

        from studio.models import load_tokenizer

        report = check(cfg.data, min_size=32, tokenizer=load_tokenizer(cfg.base))
        print(format_report(report, cfg.data))
        return 0 if report.problems == 0 else 1
    from trainers.diffusion import train

    train(cfg, resume=bool(args.resume))
    return 0
