"""Block-wise ranks and learning rates over kohya's UNet block indices (``--block-ranks`` /
``--block-lrs``; kohya sd-scripts' ``block_dims`` and ``down/mid/up_lr_weight`` network args).

kohya numbers the UNet in blocks (networks/lora.py ``get_block_index``):

    SD1.5 (25)  0 = IN00 (conv_in: never adapted), 1-11 = IN01-IN11 (down block i, layer j ->
                1 + 3i + j; a downsampler takes j = 2), 12 = MID, 13-24 = OUT00-OUT11
                (up block i, layer j -> 13 + 3i + j; an upsampler takes j = 2)
    SDXL  (23)  0 = time / label embedding, 1-9 = input_blocks 0-8, 10-12 = middle_block 0-2
                (resnet, attention, resnet), 13-21 = output_blocks 0-8, 22 = out

(SDXL's kohya index is 1 + the SGM block number, which is what ``names.diffusers_to_sgm`` uses.)
The mini base has the SD1.5 layout with fewer blocks, so it takes the 25 SD1.5 numbers.

A rank is a block's LoRA rank (0: no adapter in that block, as in kohya); an LR is a multiplier
of --unet-lr (0: the block is not trained, and so gets no adapter, as kohya drops it). The
adapter's scale alpha / rank of --rank / --alpha holds in every block (``LowRankConfig.at``), so a
block's rank changes its capacity and not its step size; with the default alpha (= rank) the
scale is 1 everywhere, as in kohya with block_alphas = block_dims.
"""

from __future__ import annotations

import json
import re

from studio.errors import StudioError

COUNT = {"sd15": 25, "sdxl": 23}
"""kohya's number of UNet blocks per family (any other SD-layout base takes SD1.5's)."""


def count(family: str) -> int:
    return COUNT.get(family, COUNT["sd15"])


def labels(family: str) -> list[str]:
    if family == "sdxl":
        return ["EMB"] + [f"IN{i:02d}" for i in range(9)] + ["MID0", "MID1", "MID2"] + [f"OUT{i:02d}" for i in range(9)] + ["OUT"]
    return [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]


def _patterns(family: str) -> list[tuple[str, int]]:
    """(regex over diffusers UNet module paths, kohya block index)."""
    rules = []
    down = 3 if family == "sdxl" else 4
    for i in range(down):
        for j in range(3):
            rules.append((rf"up_blocks\.{i}\.(resnets|attentions)\.{j}\..*", 13 + 3 * i + j))
        rules.append((rf"up_blocks\.{i}\.upsamplers\..*", 13 + 3 * i + 2))
        for j in range(2):
            rules.append((rf"down_blocks\.{i}\.(resnets|attentions)\.{j}\..*", (2 if family == "sdxl" else 1) + 3 * i + j))
        rules.append((rf"down_blocks\.{i}\.downsamplers\..*", (4 if family == "sdxl" else 3) + 3 * i))
    if family == "sdxl":
        rules += [(r"mid_block\.resnets\.0\..*", 10), (r"mid_block\.attentions\.0\..*", 11),
                  (r"mid_block\.resnets\.1\..*", 12), (r"(time_embedding|add_embedding)\..*", 0),
                  (r"conv_in", 1), (r"(conv_out|conv_norm_out)", 22)]
    else:
        rules.append((r"mid_block\..*", 12))
    return rules


def block_index(path: str, family: str) -> int | None:
    """kohya's block index of a diffusers UNet module path (None: outside every block)."""
    return next((index for pattern, index in _patterns(family) if re.fullmatch(pattern, path)), None)


def parse(text: str | None, flag: str, family: str, kind=float) -> list | None:
    """'4,8,...' -> one number per kohya block, checked against the base's block count."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise StudioError(f"{flag} {text!r} is not a comma-separated list of {'integers' if kind is int else 'numbers'}: "
                          f"give one per UNet block, e.g. {flag} {','.join(['4'] * count(family))}") from None
    n = count(family)
    if len(values) != n:
        raise StudioError(f"{flag} has {len(values)} values but this base's UNet has {n} kohya blocks "
                          f"({labels(family)[0]}-{labels(family)[-1]}): give {n} comma-separated values")
    if any(v < 0 for v in values):
        raise StudioError(f"{flag} {text!r} has a negative value: ranks and LR multipliers are >= 0 (0 = skip the block)")
    return values


def guess_family(base: str | None) -> str | None:
    """The family of a base without loading it, where that is cheap (the mini base, a folder)."""
    from pathlib import Path

    if base is None:
        return "sd-custom"
    index = Path(base).expanduser() / "model_index.json"
    if index.is_file():
        return "sdxl" if "XL" in json.loads(index.read_text()).get("_class_name", "") else "sd15"
    return None


def check(cfg) -> None:
    """Refuse block lists that cannot fit the base before anything runs (a single-file or hub base
    is checked against both counts here, and against its own once loaded)."""
    if cfg.block_ranks is None and cfg.block_lrs is None:
        return
    family = guess_family(cfg.base)
    if family is not None:
        unet_config(cfg, family)
        return
    for text, flag in ((cfg.block_ranks, "--block-ranks"), (cfg.block_lrs, "--block-lrs")):
        if text is not None and len(str(text).split(",")) not in COUNT.values():
            parse(text, flag, "sd15")


def block_ranks(cfg, family: str) -> list[int] | None:
    """The rank of every block: --block-ranks, with 0 where --block-lrs is 0 (kohya drops those)."""
    ranks = parse(cfg.block_ranks, "--block-ranks", family, int)
    lrs = parse(cfg.block_lrs, "--block-lrs", family)
    if ranks is None and lrs is None:
        return None
    ranks = ranks or [cfg.rank] * count(family)
    return [0 if lrs is not None and lrs[i] == 0 else r for i, r in enumerate(ranks)]


def unet_config(cfg, family: str):
    """The UNet's method config: the run's, with a per-module rank rule when block ranks are given."""
    method_cfg = cfg.method_config()
    ranks = block_ranks(cfg, family)
    if ranks is None:
        return method_cfg
    if not hasattr(method_cfg, "module_ranks"):
        raise StudioError(f"--block-ranks / --block-lrs need a method with a rank; {cfg.method} has none: drop them "
                          f"or use e.g. --method lora")
    from dataclasses import replace

    rules = tuple((pattern, ranks[index]) for pattern, index in _patterns(family) if ranks[index] != cfg.rank)
    return replace(method_cfg, module_ranks=rules)


def lr_groups(unet, name: str, family: str, lr: float, multipliers: list[float] | None) -> list[tuple[list, float]]:
    """The UNet's adapter parameters as optimizer groups: one per distinct block LR."""
    from studio.adapters.targets import layers_of

    by_lr: dict[float, list] = {}
    for path, layer in layers_of(unet, name).items():
        index = block_index(path, family)
        scale = 1.0 if multipliers is None or index is None else multipliers[index]
        by_lr.setdefault(lr * scale, []).extend(layer.adapters[name].parameters())
    return [(params, value) for value, params in by_lr.items()]


def network_args(cfg, family: str) -> str | None:
    """ss_network_args as kohya writes them (a JSON object of strings), or None without block settings."""
    ranks = block_ranks(cfg, family)
    lrs = parse(cfg.block_lrs, "--block-lrs", family)
    if ranks is None:
        return None
    args = {"block_dims": ",".join(map(str, ranks))}
    if cfg.alpha is not None:
        args["block_alphas"] = ",".join(f"{cfg.alpha * r / cfg.rank:g}" for r in ranks)
    if lrs is not None:
        n = 12 if family != "sdxl" else 9
        inner = lrs if family != "sdxl" else lrs[1:-1]  # kohya's SDXL lists leave out EMB and OUT
        mid = 1 if family != "sdxl" else 3
        args["down_lr_weight"] = ",".join(f"{v:g}" for v in inner[:n])
        args["mid_lr_weight"] = ",".join(f"{v:g}" for v in inner[n:n + mid])
        args["up_lr_weight"] = ",".join(f"{v:g}" for v in inner[n + mid:])
    return json.dumps(args)
