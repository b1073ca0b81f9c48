"""`studio demo`: every adapter method, trained, mixed, merged and compressed on a tiny UNet.

A runnable tour of the adapter core that needs no data and no download: a tiny diffusers-shaped
UNet (random weights) must learn to imitate a "teacher" (the same UNet with a fixed hidden
low-rank change of its attention). Each method fits the teacher from the same start; then two
of them are mixed with weights, merged and unmerged, and the mix is compressed to one LoRA.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import studio.adapters as A
from studio.adapters import mix, registry
from studio.errors import StudioError

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
RANK = 8
"""Rank of every method that has one (the others drop it: registry.config_from_options)."""
LR_FACTOR = 3.0
"""The demo's learning rate is this multiple of each method's image default: a few dozen steps on
a random tiny UNet, where larger steps than a real training run's are safe."""


def _unet(seed: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def _batch(g: torch.Generator) -> tuple:
    return (torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
            torch.randn(8, 6, 32, generator=g))


def _teacher(seed: int) -> nn.Module:
    """The base UNet plus a fixed random rank-4 change: what the adapters must discover."""
    teacher = _unet(seed)
    A.attach(teacher, "hidden", "lora", A.lora.Config(rank=4), "unet-attn")
    with torch.no_grad():
        for p in A.trainable_parameters(teacher, "hidden"):
            p.copy_(0.3 * torch.randn_like(p))
    A.merge(teacher)
    return teacher


def _fit(unet, teacher, method: str, steps: int, seed: int) -> tuple[float, float]:
    A.attach(unet, method, method, registry.config_from_options(method, {"rank": RANK}), "unet-attn")
    lr = LR_FACTOR * registry.default_lr(method, "image")
    opt = torch.optim.AdamW(A.trainable_parameters(unet, method), lr=lr)
    g = torch.Generator().manual_seed(seed)
    first = last = 0.0
    for step in range(steps):
        x, t, context = _batch(g)
        with torch.no_grad():
            target = teacher(x, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=context).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    A.set_enabled(unet, method, False)
    return first, last


def run_demo(method: str = "all", steps: int = 60, seed: int = 0) -> int:
    methods = registry.select(method)
    if steps <= 0:
        raise StudioError(f"--steps must be positive, got {steps}")
    teacher, unet = _teacher(seed), _unet(seed)
    print(f"tiny UNet: {sum(p.numel() for p in unet.parameters()):,} parameters, "
          f"{len(A.find_targets(unet, 'unet-attn'))} attention Linear layers adapted")
    for m in methods:
        start = time.perf_counter()
        first, last = _fit(unet, teacher, m, steps, seed)
        trained = sum(p.numel() for p in A.trainable_parameters(unet, m))
        print(f"{m:7s} {trained:7,d} trained values  imitation loss {first:.4f} -> {last:.4f}  "
              f"({time.perf_counter() - start:.1f} s)")
    if len(methods) >= 2:
        _mix_tour(unet, methods[:2], seed)
    return 0


def _mix_tour(unet, pair: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    x, t, context = _batch(g)
    weights = [0.7, -0.3]
    for name, w in zip(pair, weights):
        A.set_enabled(unet, name, True)
        A.set_weight(unet, name, w)
    for name in set(A.adapter_names(unet)) - set(pair):
        A.set_enabled(unet, name, False)
    with torch.no_grad():
        live = unet(x, t, encoder_hidden_states=context).sample
        A.merge(unet)
        merged = unet(x, t, encoder_hidden_states=context).sample
        A.unmerge(unet)
    print(f"mix {pair[0]}:{weights[0]} + {pair[1]}:{weights[1]}: unmerged vs merged output max diff "
          f"{(live - merged).abs().max().item():.2e}")
    energies = []
    for layer in A.targets.adapted_layers(unet).values():
        down, up = mix.concat([layer.adapters[n].factors() for n in pair], weights)
        energies.append(mix.compress(down, up, rank=8).energy)
    print(f"mix compressed to one rank-8 LoRA: retained energy {min(energies):.4f} (worst layer) "
          f"{sum(energies) / len(energies):.4f} (mean)")
