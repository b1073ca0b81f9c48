"""Routed mixtures of adapter experts: the math MoLoRA, MoV, MoLA and LoRAMoE share.

A router per adapted layer reads the layer input token by token (a convolution: the receptive
field of each output position, with the base's geometry) and weighs E experts:

    p(x) = softmax(R x + c)            R: (E, in), c: (E,)        per token
    g(x) = p(x)                        soft merging (MoLoRA, MoV, LoRAMoE; arXiv 2309.05444, 2312.09979)
    g(x) = topk_k(p) / sum topk_k(p)   top-k, renormalised over the k kept (MoLA, arXiv 2402.08562);
                                       top-1 keeps p_i itself (Switch Transformer: the router still learns)

    LoRA experts:   y = W0 x + b + w * sum_i g_i(x) s B_i A_i x
                    run as one stacked pair: hidden = A_cat x (E r rows), each expert's r rows
                    scaled by its gate, then B_cat: the cost of one rank-E r LoRA plus the router.

The gates depend on the input, so there is no fixed weight delta: these adapters are the
"functional" kind (never merged, no plain-LoRA export; ``studio bake --freeze-gates`` writes the
static mix at the average gates instead). The router's bias c is ours: with R = 0 it makes the gates a
constant (a static weighted mix) and lets a test force one expert exactly.

Routing statistics for the balance losses go to the adapter's ``scratch`` dict, which the layer
passes to a functional forward (``layer.Adapter.scratch``, never saved): ``probs`` (tokens, E)
with its graph while training, ``mask`` (tokens, E) of the kept experts, and ``mean_gate`` (E,),
detached, for the UI's heat map.

Per-layer expert counts (MoLA's "higher layers need more experts"): ``--experts 8``, a profile over
quarters of the depth, or an explicit list, one count per block. A block is a module path up to its
last numbered component followed by two or more names (``model.layers.3``, ``h.3``,
``...transformer_blocks.0``), in depth order (``depth_key``); ``prepare`` (called by ``targets.attach`` before the
layers are built) resolves them once to ``layout``, (block, experts) pairs a file stores.

``describe`` (each method's optional hook, read by ``studio inspect``) says what a saved mixture
holds, from its config and its tensors: the experts, the routing, the balance loss, experts per block.
``freeze`` (the hook ``studio bake --freeze-gates`` calls) turns a mixture into the static method its
experts are at fixed gates: LoRA experts at gates g are one LoRA of rank E r, dW = sum_i g_i s B_i A_i.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from studio.adapters.common import LowRankConfig, check_rank
from studio.adapters.contract import Base, Site
from studio.errors import StudioError

PROFILES = {"triangle": (8, 6, 4, 2), "inverted": (2, 4, 6, 8), "hourglass": (8, 2, 2, 8), "square": (5, 5, 5, 5)}
"""MoLA's layer profiles (paper 4.1): experts per quarter of the depth, lowest quarter first."""


@dataclass(frozen=True)
class MixtureConfig(LowRankConfig):
    """rank, alpha, ... of each LoRA expert (``common.LowRankConfig``) and the router."""

    experts: int = 4
    """E: experts per layer (when neither ``profile`` nor ``counts`` is given)."""
    top_k: int = 0
    """Experts kept per token; 0 = all (soft merging)."""
    balance: float = 0.0
    """Weight of the load-balancing loss (0: none)."""
    profile: str = ""
    """MoLA layer profile: triangle | inverted | hourglass | square (experts per quarter of depth)."""
    counts: tuple = ()
    """Explicit experts per block, lowest block first (or from ``profile``)."""
    layout: tuple = ()
    """(block, experts) pairs, resolved from ``counts`` / ``profile`` when the adapter is made (stored in files)."""
    sources: tuple = ()
    """Frozen experts composed from trained LoRA files (``studio train --mixture-of``, ``compose.py``): one
    (name, rank, scale, conv rank, conv scale) per expert, each expert's own scale s_i replacing ``alpha / rank``
    (its A, B are the file's, zero-padded to the largest rank). Empty: experts trained with the router."""

    label = "mixture"

    def __post_init__(self) -> None:
        super().__post_init__()
        experts = whole(self.experts, "experts", "experts=4")
        top_k = whole(self.top_k, "top_k", "top_k=2 (0: soft merging over every expert)")
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "balance", number(self.balance, "balance", "balance=0.01 (0: no balance loss)"))
        object.__setattr__(self, "counts", parse_counts(self.counts))
        object.__setattr__(self, "layout", tuple((str(b), int(n)) for b, n in self.layout))  # JSON gives lists
        object.__setattr__(self, "sources", tuple((str(n), int(r), float(s), int(cr), float(cs))
                                                  for n, r, s, cr, cs in self.sources))
        if self.sources and len(self.sources) != experts:
            raise StudioError(f"{len(self.sources)} expert sources for {experts} experts: the file is damaged")
        if self.profile and self.profile not in PROFILES:
            raise StudioError(f"unknown expert profile {self.profile!r}: use --method-args profile= one of "
                              f"{', '.join(PROFILES)}, or counts=8,6,4,2 (one per block)")
        if self.profile and self.counts:
            raise StudioError(f"expert profile {self.profile!r} and counts {list(self.counts)} both set the experts "
                              f"per block: give --method-args profile=... or counts=..., not both")
        every = self.counts or PROFILES.get(self.profile, ()) or (experts,)
        if any(c <= 0 for c in every):
            raise StudioError(f"expert counts must be positive, got {list(every)}: use e.g. --method-args experts=4")
        if top_k < 0:
            raise StudioError(f"top-k {top_k} is negative: use --method-args top_k=0 (soft) or 1..{min(every)}")
        if top_k > min(every):
            raise StudioError(f"top-k {top_k} is larger than the {min(every)} experts of a layer: use "
                              f"--method-args top_k={min(every)} or fewer, or more experts")
        if self.balance < 0:
            raise StudioError(f"balance {self.balance:g} is negative, which would reward imbalance: use "
                              f"--method-args balance=0.01 (0: no balance loss)")


def whole(value, name: str, example: str) -> int:
    """A config integer, also from text (--method-args gives '4'), or the one-line reason it is not."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise StudioError(f"{name} must be a whole number, got {value!r}: use e.g. --method-args {example}")
    return int(value)


def number(value, name: str, example: str) -> float:
    """A finite config number (a balance of inf would end the run in the NaN guard, not here)."""
    try:
        if isinstance(value, bool) or not math.isfinite(float(value)):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a finite number, got {value!r}: use e.g. --method-args {example}") from None


def parse_counts(counts) -> tuple[int, ...]:
    """Experts per block from a TOML list, a JSON list or the command line's '8,6,4,2' (a lone '8' is an int)."""
    items = counts.split(",") if isinstance(counts, str) else [counts] if isinstance(counts, int) else counts
    return tuple(whole(c, "counts", "counts=8,6,4,2 (one per block, lowest first)") for c in items if c != "")


def block_of(path: str) -> str:
    """The block a module belongs to: its path up to the last number followed by two or more names
    (``model.layers.3.self_attn.q_proj``), else by one (a UNet mid-block's ``attentions.0.proj_in``)."""
    parts = path.split(".")
    for after in (2, 1):
        for i in range(len(parts) - 1 - after, -1, -1):
            if parts[i].isdigit():
                return ".".join(parts[:i + 1])
    return ""


def depth_key(block: str) -> list[tuple]:
    """Blocks in depth order: numbers compared as numbers (layers.2 before layers.10), names by name,
    which puts a UNet's down, mid and up blocks in the order the data flows (module order does not:
    diffusers registers up_blocks before mid_block)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in block.split(".")]


def prepare(cfg: MixtureConfig, paths: list[str]) -> MixtureConfig:
    """Resolve the experts of each block of these target paths (a profile: per quarter of the depth)."""
    if cfg.layout or not (cfg.counts or cfg.profile):
        return cfg
    blocks = sorted({block_of(p) for p in paths}, key=depth_key)
    if cfg.counts and len(cfg.counts) != len(blocks):
        raise StudioError(f"expert counts {list(cfg.counts)} give {len(cfg.counts)} blocks but the targets have "
                          f"{len(blocks)}: give one count per block, or use --method-args "
                          f"profile={'|'.join(PROFILES)}")
    quarters = PROFILES.get(cfg.profile)
    counts = cfg.counts or tuple(quarters[min(3, 4 * b // len(blocks))] for b in range(len(blocks)))
    return replace(cfg, layout=tuple(zip(blocks, counts)))


def experts_at(cfg: MixtureConfig, site: Site) -> int:
    if not cfg.layout:
        return cfg.experts
    counts = dict(cfg.layout)
    block = block_of(site.path)
    if block not in counts:
        raise StudioError(f"module '{site.path}' is in none of the blocks of this adapter's expert counts: the "
                          f"adapter was made for another base")
    return counts[block]


# -- the router ---------------------------------------------------------------------------------
def channel_dim(base: Base) -> int:
    """Where a layer keeps its channels: 1 for a convolution's NCHW, -1 otherwise."""
    return 1 if base.channels(torch.zeros(1)).dim() == 4 else -1


def router_init(E: int, width: int, generator: torch.Generator | None) -> dict:
    """R as nn.Linear initialises (uniform +-1/sqrt(in)): distinct experts from the first step; c = 0."""
    bound = 1.0 / math.sqrt(width)
    return {"R": torch.empty(E, width).uniform_(-bound, bound, generator=generator), "c": torch.zeros(E)}


def route(logits: torch.Tensor, top_k: int, dim: int, scratch: dict | None, training: bool) -> torch.Tensor:
    """Gates (same shape as logits) from router logits, recording the statistics in ``scratch``."""
    probs = logits.softmax(dim)
    if top_k and top_k < logits.shape[dim]:
        kept, index = probs.topk(top_k, dim)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(dim, index, True)
        # top-1 keeps the raw probability (Switch Transformer): renormalised, its one gate would be exactly 1
        # and no gradient would ever reach the router
        kept = kept / kept.sum(dim, keepdim=True) if top_k > 1 else kept
        gates = torch.zeros_like(probs).scatter(dim, index, kept)
    else:
        mask, gates = None, probs
    if scratch is not None:
        flat = probs.movedim(dim, -1).reshape(-1, probs.shape[dim])        # (tokens, E)
        scratch["mean_gate"] = gates.detach().movedim(dim, -1).reshape(flat.shape).mean(0)
        if training:
            scratch["probs"] = flat
            scratch["mask"] = None if mask is None else mask.movedim(dim, -1).reshape(flat.shape)
    return gates


def gates_of(cfg: MixtureConfig, state: dict, x: torch.Tensor, base: Base, scratch, training) -> torch.Tensor:
    """Per-position gates over the experts, at the layer's output positions: (..., E) or (N, E, H, W)."""
    logits = base.apply(x, state["R"]) + base.channels(state["c"])
    return route(logits, cfg.top_k, channel_dim(base), scratch, training)


# -- LoRA experts -------------------------------------------------------------------------------
def lora_experts_init(cfg: MixtureConfig, W0: torch.Tensor, site: Site, generator=None) -> dict:
    """E LoRA experts (A random as LoRA's, B = 0: a no-op) and the router."""
    E, rank = experts_at(cfg, site), cfg.rank_at(site.is_conv)
    check_rank(rank, W0.shape, site.path)
    bound = 1.0 / math.sqrt(site.in_features)
    A = torch.empty(E, rank, site.in_features).uniform_(-bound, bound, generator=generator)  # (E, r, in)
    return {"A": A, "B": torch.zeros(E, site.out_features, rank), **router_init(E, site.in_features, generator),
            "s": expert_scales(cfg, site.is_conv, E)}


def expert_scales(cfg: MixtureConfig, conv: bool, E: int) -> torch.Tensor:
    """s_i (E,): each composed expert's own scale (``sources``), else the config's alpha / rank for all."""
    if cfg.sources:
        return torch.tensor([cs if conv else s for _, _, s, _, cs in cfg.sources])
    return torch.full((E,), cfg.scale_at(conv))


def lora_experts_from_saved(cfg: MixtureConfig, tensors: dict, site: Site) -> dict:
    return {**{k: tensors[k].float() for k in ("A", "B", "R", "c")},
            "s": expert_scales(cfg, site.is_conv, tensors["A"].shape[0])}


def lora_experts_shapes(cfg: MixtureConfig, site: Site) -> dict:
    E, rank = experts_at(cfg, site), cfg.rank_at(site.is_conv)
    return {"A": (E, rank, site.in_features), "B": (E, site.out_features, rank), "R": (E, site.in_features),
            "c": (E,)}


def lora_experts_forward(cfg: MixtureConfig, state: dict, x: torch.Tensor, base: Base, weight: float,
                         training: bool, scratch: dict | None = None) -> torch.Tensor:
    A, B = state["A"], state["B"]                                          # (E, r, in), (E, out, r)
    E, r = A.shape[0], A.shape[1]
    if training and cfg.dropout > 0:
        x = F.dropout(x, cfg.dropout, training=True)
    gates = gates_of(cfg, state, x, base, scratch, training)
    hidden = base.apply(x, A.reshape(E * r, -1))                           # (..., E r) / (N, E r, H, W)
    hidden = hidden * gates.repeat_interleave(r, dim=channel_dim(base))
    up = (B * (state["s"] * weight)[:, None, None]).permute(1, 0, 2).reshape(B.shape[1], E * r)   # (out, E r)
    return base.project(hidden, up)


def lora_expert_factors(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert as a plain LoRA (down (r, in), up (out, r)) with the scale s folded in."""
    return [(state["A"][i], state["B"][i] * state["s"][i]) for i in range(state["A"].shape[0])]


# -- balance losses -----------------------------------------------------------------------------
def switch_balance(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """E * sum_i f_i P_i (Switch Transformer, as MoLA uses it): f_i the share of the token-to-expert
    assignments expert i gets, P_i its mean router probability; 1 when perfectly balanced."""
    E = probs.shape[-1]
    chosen = torch.ones_like(probs) if mask is None else mask.float()
    f = chosen.sum(0) / chosen.sum()                                       # (E,)
    return E * (f * probs.mean(0)).sum()


def mean_over_layers(adapters, term) -> torch.Tensor | None:
    """cfg.balance * the mean of ``term(adapter)`` over the layers that routed in the last forward."""
    terms = [term(a) for a in adapters if "probs" in a.scratch]
    if not terms or adapters[0].cfg.balance == 0:
        return None
    return adapters[0].cfg.balance * torch.stack(terms).mean()


# -- what a file holds (studio inspect) ---------------------------------------------------------
def describe(config: dict, modules: dict[str, dict], experts: str, balance: str | None) -> dict:
    """The routing of a saved mixture: ``modules`` {path: {tensor: T}}; counts come from the routers' shapes
    (R: (E, width)), so they are what the file holds whatever the config says."""
    counts = {path: int(t["R"].shape[0]) for path, t in modules.items()}
    top_k = int(config.get("top_k") or 0)
    if top_k and top_k < max(counts.values()):
        routing = f"top-{top_k} per token (the {top_k} most probable experts, gates renormalised over them)"
        if top_k >= min(counts.values()):
            routing += f"; layers of {top_k} or fewer experts use them all"
    else:
        routing = "soft per token (softmax over every expert of the layer)"
    blocks: dict[str, list[int]] = {}
    for path in sorted(counts, key=lambda p: depth_key(block_of(p))):
        blocks.setdefault(block_of(path), []).append(counts[path])
    profile = config.get("profile")
    profile = (f"{profile} profile, {'-'.join(map(str, PROFILES[profile]))} over quarters of the depth" if profile
               else "explicit counts per block" if config.get("counts") else "")
    return {"experts": experts, "routing": routing, "balance": balance,
            "profile": profile or f"{config.get('experts')} everywhere",
            "experts_total": sum(counts.values()),
            "per_block": [{"block": b or "(unnumbered modules)", "experts": sorted(set(ns)), "modules": len(ns)}
                          for b, ns in blocks.items()]}


def describe_lora_experts(config: dict, modules: dict[str, dict], balance: str | None) -> dict:
    sources = config.get("sources")
    if sources:  # composed from trained files (--mixture-of): name them, with each file's rank and scale
        experts = ("frozen LoRA experts from " + ", ".join(f"{n} (rank {r}, scale {s:g})" for n, r, s, *_ in sources)
                   + "; only the router trained")
        return describe(config, modules, experts, balance)
    ranks = sorted({int(t["A"].shape[1]) for t in modules.values()})
    return describe(config, modules, f"LoRA experts of rank {'/'.join(map(str, ranks))}", balance)


# -- frozen gates (studio bake --freeze-gates) ---------------------------------------------------
def freeze_lora_experts(method: str, config: dict, modules: dict[str, dict], gates: dict[str, torch.Tensor],
                        kernels: dict[str, tuple | None]) -> tuple[str, dict]:
    """LoRA experts at fixed gates g (E,) per module as one LoRA: A_cat (E r, in), B_cat scaled by g_i s,
    alpha = rank (scale 1); a k x k convolution's A as LoCon's (E r, in, kh, kw)."""
    from studio.adapters.registry import make_config

    cfg = make_config(method, config)
    entries = {}
    for path, t in modules.items():
        A, B = t["A"].float(), t["B"].float()                              # (E, r, in), (E, out, r)
        E, r = A.shape[0], A.shape[1]
        kernel = kernels.get(path)
        conv = kernel is not None and tuple(kernel) != (1, 1)
        scaled = B * (gates[path].float() * expert_scales(cfg, conv, E))[:, None, None]
        down = A.reshape(E * r, -1)
        up = scaled.permute(1, 0, 2).reshape(B.shape[1], E * r)
        if conv:
            down = down.reshape(E * r, -1, *kernel)
        entries[path] = ({"rank": E * r, "alpha": float(E * r)}, {"A": down, "B": up})
    return "lora", entries
