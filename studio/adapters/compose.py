"""Trained LoRA files as the frozen experts of a MoLoRA router (``studio train DATA --mixture-of A B ...``).

    y = W0 x + b + w * sum_i g_i(x) s_i B_i A_i x        g(x) = softmax(R x + c) per token

Each expert i is a trained LoRA exactly as its file holds it: A_i (r_i, in) and B_i (out, r_i) are
copied into MoLoRA's stacked A (E, r, in) / B (E, out, r), zero-padded to the largest rank r (zero rows
of A and columns of B add nothing), and its own scale s_i = alpha_i / r_i travels in the config's
``sources`` (``mixture.MixtureConfig``). Only R and c train. R = 0, c = 0 at the start: every gate is
1 / E, the experts' equal-weight average, and the router learns from there which expert each token wants.

The result is an ordinary ``molora`` part: it loads, mixes, inspects and bakes (``--freeze-gates``) as
any MoLoRA file does. Experts are LoRA (LoCon on k x k convolutions, rsLoRA, block ranks); any other
method is refused by name (a plain-LoRA export of it, ``studio export --format kohya``, can be an expert).
This module reads no files: the trainer gives each expert as (name, method, config, modules).
"""

from __future__ import annotations

import dataclasses

import torch

from studio.adapters.registry import get, make_config
from studio.errors import StudioError

ROUTED = "molora"
"""The method a composed mixture is: soft per-token routing over LoRA experts."""


def lora_experts(experts: list[tuple[str, str, dict, dict[str, dict[str, torch.Tensor]]]],
                 options: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, canonical tensors ``<path>.A|B|R|c``) of the MoLoRA part over these experts.

    ``experts``: (name, method, config fields, {module path: {tensor: T}}) per file, in order; ``options``:
    router options of ``mixture.MixtureConfig`` (``top_k``)."""
    if len(experts) < 2:
        raise StudioError(f"--mixture-of needs two or more trained adapter files to route between, got "
                          f"{len(experts)}: add the other expert files")
    configs = [_expert_config(name, method, config) for name, method, config, _ in experts]
    paths = list(experts[0][3])
    for name, _, _, modules in experts[1:]:
        if set(modules) != set(paths):
            odd = sorted(set(modules) ^ set(paths))[0]
            raise StudioError(f"{name} and {experts[0][0]} adapt different layers ('{odd}' is in one only): "
                              f"--mixture-of needs experts trained on the same targets (--targets)")
    modules = [m for *_, m in experts]
    conv = {p: modules[0][p]["A"].dim() == 4 for p in paths}
    rank = _largest_rank(modules, [p for p in paths if not conv[p]])
    conv_rank = _largest_rank(modules, [p for p in paths if conv[p]])
    tensors = {}
    for path in paths:
        A, B = _stack([m[path] for m in modules], rank if not conv[path] else conv_rank, path, experts)
        tensors |= {f"{path}.A": A, f"{path}.B": B,
                    f"{path}.R": torch.zeros(len(experts), A.shape[2]), f"{path}.c": torch.zeros(len(experts))}
    sources = [(name, _rank_of(m, conv, False), cfg.scale_at(False), _rank_of(m, conv, True), cfg.scale_at(True))
               for (name, *_ , m), cfg in zip(experts, configs)]
    config = {**(options or {}), "experts": len(experts), "rank": rank or conv_rank, "alpha": None,
              "conv_rank": conv_rank or None, "sources": sources}
    return dataclasses.asdict(make_config(ROUTED, config)), tensors  # the MoLoRA config's own checks (top_k)


def _plain_lora(method) -> bool:
    """A method whose saved A, B are its whole delta (LoRA; not PiSSA / MiLoRA, whose delta also subtracts
    their initial factors): what a MoLoRA expert holds."""
    return method.TRAITS.kind == "low-rank" and not method.TRAITS.needs_base and tuple(method.SAVED) == ("A", "B")


def _expert_config(name: str, method: str, config: dict):
    if get(method).TRAITS.kind == "functional":
        raise StudioError(f"{name} is itself a routed mixture ({method}): nesting mixtures is not supported: give "
                          f"--mixture-of the LoRA files it was made from")
    if not _plain_lora(get(method)):
        raise StudioError(f"{name} is a {method} adapter, which cannot be an expert of --mixture-of (LoRA / LoCon "
                          f"files only): export it as a plain LoRA first (studio export {name} --format kohya)")
    return make_config(method, config)


def _largest_rank(modules: list[dict], paths: list[str]) -> int:
    return max((int(m[p]["A"].shape[0]) for m in modules for p in paths), default=0)


def _rank_of(modules: dict, conv: dict[str, bool], on_conv: bool) -> int:
    """An expert's largest rank on its linear (or k x k convolution) layers; 0 when it has none."""
    return _largest_rank([modules], [p for p in modules if conv[p] == on_conv])


def _stack(layers: list[dict], rank: int, path: str, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, rank, in), B (E, out, rank): expert i's exact A_i, B_i in the first r_i rows / columns."""
    downs = [t["A"].float().flatten(1) for t in layers]                       # (r_i, in)
    ups = [t["B"].float() for t in layers]                                    # (out, r_i)
    shapes = {(u.shape[0], d.shape[1]) for d, u in zip(downs, ups)}
    if len(shapes) > 1:
        raise StudioError(f"{experts[0][0]} and {experts[1][0]} give module '{path}' different shapes "
                          f"{sorted(shapes)}: --mixture-of needs experts trained on the same base")
    (out, width), E = shapes.pop(), len(layers)
    A, B = torch.zeros(E, rank, width), torch.zeros(E, out, rank)
    for i, (down, up) in enumerate(zip(downs, ups)):
        A[i, :down.shape[0]] = down
        B[i, :, :up.shape[1]] = up
    return A, B
