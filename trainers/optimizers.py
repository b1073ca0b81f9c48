"""The one list of optimizers ``studio train --optimizer NAME`` offers, and what a loop needs of them.

    adamw         torch AdamW, fused (one kernel over every adapter tensor)
    adamw8bit     bitsandbytes AdamW8bit: moments quantised to 8 bits (bitsandbytes >= 0.45 also on CPU)
    adafactor     transformers Adafactor with a fixed LR (relative_step=False), factored second moments
    prodigy       prodigyopt Prodigy: estimates the step size d itself; the LR is a multiplier of d
    schedulefree  schedulefree AdamWScheduleFree: no LR schedule; weights averaged for evaluation

``--optimizer-args key=value`` passes keyword arguments to the optimizer's class (unknown keys are
refused with the accepted ones named). The packages are imported only when chosen; a missing one
is a one-line error with its pip command (all of them: ``pip install -e ".[gpu]"``).

Two optimizers change what the loop does around them:
- Prodigy estimates one step size d for all parameters and its ``lr`` (``--optimizer-args lr=``,
  default 1.0, the authors' setting) multiplies it; it refuses different LRs per group, so
  ``--unet-lr`` / ``--te-lr`` / ``--block-lrs`` do not apply (every group gets ``lr``) and LoRA+ is
  refused with it.
- schedule-free AdamW holds two sequences: the parameters are the gradient point y while training
  and must be the average x for sampling, validation and saving. ``evaluation()`` switches them and
  then restores the training values *bit for bit* (the package's own eval() / train() pair rounds,
  which would make a resumed run drift from a straight one). It replaces the LR schedule (constant
  only; ``--warmup-steps`` becomes its own warmup).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from studio.errors import StudioError


@dataclass(frozen=True)
class Optimizer:
    label: str
    """The name in ``ss_optimizer`` and the README (kohya's spelling where it has one)."""
    summary: str
    """One line for --help."""
    load: Callable[[], type]
    """The optimizer class, imported on use."""
    package: str | None = None
    """The pip package it needs (None: torch or transformers, always installed)."""
    defaults: dict = field(default_factory=dict)
    """Our keyword arguments for adapter training; --optimizer-args overrides them key by key."""
    lr_multiplier: float | None = None
    """Set for optimizers that estimate the step size (Prodigy): the default ``lr`` of the largest group."""
    schedule_free: bool = False
    """No LR schedule; evaluation needs the averaged weights (see ``evaluation``)."""
    moments: tuple[str, ...] | None = ("exp_avg", "exp_avg_sq")
    """State tensors a ReLoRA restart prunes by magnitude; None = the state is reset instead."""
    warmup_arg: str | None = None
    """The keyword that takes --warmup-steps when the optimizer warms up itself."""


def _adamw():
    return torch.optim.AdamW


def _adamw8bit():
    # bitsandbytes' CPU backend logs a failed hub lookup for a 4-bit kernel we never use on import
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
    return bitsandbytes.optim.AdamW8bit


def _adafactor():
    from transformers.optimization import Adafactor

    return Adafactor


def _prodigy():
    from prodigyopt import Prodigy

    return Prodigy


def _schedulefree():
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("AdamW", "torch AdamW (fused)", _adamw, defaults={"weight_decay": 1e-2}),
    "adamw8bit": Optimizer("AdamW8bit", "bitsandbytes 8-bit AdamW (moments of tensors >= 4096 values in 8 bits)",
                           _adamw8bit, package="bitsandbytes", defaults={"weight_decay": 1e-2}, moments=None),
    # kohya's recommended LoRA settings: a fixed LR, no parameter-scale or relative step
    "adafactor": Optimizer("Adafactor", "transformers Adafactor, fixed LR (relative_step=False)", _adafactor,
                           defaults={"relative_step": False, "scale_parameter": False, "warmup_init": False},
                           moments=("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")),
    # the Prodigy README's settings for diffusion LoRA
    "prodigy": Optimizer("Prodigy", "prodigyopt Prodigy, step size estimated (lr = multiplier, default 1.0)",
                         _prodigy, package="prodigyopt", lr_multiplier=1.0,
                         defaults={"d_coef": 1.0, "betas": (0.9, 0.99), "weight_decay": 1e-2,
                                   "safeguard_warmup": True, "use_bias_correction": True}),
    "schedulefree": Optimizer("AdamWScheduleFree", "schedulefree AdamW, no LR schedule (constant; own warmup)",
                              _schedulefree, package="schedulefree", schedule_free=True, moments=("exp_avg_sq",),
                              warmup_arg="warmup_steps"),
}


def get(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise StudioError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def help_text() -> str:
    return "; ".join(f"{name}: {o.summary}" for name, o in OPTIMIZERS.items())


def optimizer_class(name: str) -> type:
    spec = get(name)
    try:
        return spec.load()
    except ImportError:
        raise StudioError(f"--optimizer {name} needs the {spec.package} package: pip install {spec.package} "
                          f"(or pip install -e \".[gpu]\" for every optional optimizer)") from None


def accepted(name: str) -> list[str]:
    """The keyword arguments --optimizer-args may set: the class's own, less ``params`` and, where the
    run's --unet-lr / --te-lr / --lr set it, ``lr``."""
    parameters = inspect.signature(optimizer_class(name).__init__).parameters
    ours = {"self", "params", "args"} | ({"lr"} if get(name).lr_multiplier is None else set())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(k for k, p in parameters.items() if k not in ours and p.kind in kinds)


def _coerce(value, default):
    """A command-line string to the type of the argument's default ('0.9,0.99' -> a betas tuple)."""
    if isinstance(default, tuple) and isinstance(value, str):
        return tuple(float(v) for v in value.split(","))
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def check(name: str, args: dict, lr_schedule: str) -> None:
    """Everything about --optimizer / --optimizer-args a user can get wrong, before anything runs."""
    spec = get(name)
    known = accepted(name)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise StudioError(f"unknown --optimizer-args {unknown} for --optimizer {name}: it accepts {', '.join(known)}")
    if spec.schedule_free and lr_schedule not in ("constant", "constant_with_warmup"):
        raise StudioError(f"--optimizer {name} replaces the LR schedule: use --lr-schedule constant (--warmup-steps "
                          f"becomes its own warmup), not {lr_schedule}")


def build(groups: list[tuple[list[torch.nn.Parameter], float]], name: str = "adamw", args: dict | None = None,
          warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer over parameter groups ``(params, lr)`` (UNet, text encoder, LoRA+'s up factors)."""
    spec = get(name)
    cls = optimizer_class(name)
    check(name, args or {}, "constant")
    groups = [(params, lr) for params, lr in groups if params]
    if not groups:
        raise StudioError("nothing to train: the targets matched no layer with trainable adapter parameters")
    signature = inspect.signature(cls.__init__).parameters
    kwargs = {**spec.defaults, **{k: _coerce(v, signature[k].default) for k, v in (args or {}).items()}}
    if spec.lr_multiplier is not None:  # Prodigy: one multiplier of its estimated step size for every group
        multiplier = float(kwargs.pop("lr", spec.lr_multiplier))
        groups = [(params, multiplier) for params, _ in groups]
    if spec.warmup_arg and warmup_steps:
        kwargs.setdefault(spec.warmup_arg, warmup_steps)
    if name == "adamw":
        devices = {p.device.type for params, _ in groups for p in params}
        kwargs.setdefault("fused", True if devices <= {"cpu", "cuda"} else None)
    if spec.package == "bitsandbytes":
        devices = {p.device.type for params, _ in groups for p in params} - {"cpu", "cuda", "xpu"}
        if devices:
            raise StudioError(f"--optimizer {name}: bitsandbytes does not run on {', '.join(sorted(devices))}: use "
                              f"--optimizer adamw or adafactor there")
    optimizer = cls([{"params": params, "lr": lr} for params, lr in groups], **kwargs)
    if spec.schedule_free:
        optimizer.train()  # its steps are refused in eval mode; a resumed state restores the flag as saved
    return optimizer


def _inner(optimizer):
    """The optimizer itself under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


@contextmanager
def evaluation(name: str, optimizer):
    """The parameters as they should be sampled, validated and saved, then restored exactly.

    A no-op for every optimizer but schedule-free, whose evaluation weights are its average x."""
    if not get(name).schedule_free:
        yield
        return
    inner = _inner(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    kept = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)


@torch.no_grad()
def prune_state(name: str, optimizer, params: list[torch.nn.Parameter], fraction: float) -> None:
    """ReLoRA's optimizer reset for ``params``: zero the ``fraction`` smallest-magnitude values of each
    moment (the paper prunes 99 %), or drop the whole state where the moments are not plain tensors
    (8-bit) or ``fraction`` is 1 (a reset; the optimizer re-initialises it on its next step)."""
    moments = get(name).moments
    state = _inner(optimizer).state
    for p in params:
        if p not in state:
            continue
        if moments is None or fraction >= 1.0:
            del state[p]
            continue
        for key in moments:
            value = state[p].get(key)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
                continue
            keep = value.numel() - int(fraction * value.numel())
            if keep <= 0:
                value.zero_()
                continue
            threshold = value.abs().flatten().kthvalue(value.numel() - keep + 1).values if keep < value.numel() else None
            if threshold is not None:
                value.masked_fill_(value.abs() < threshold, 0.0)


# -- LoRA+ (Hayou, Ghosh, Yu 2024, arXiv 2402.12354): B's learning rate = ratio x A's ----------------
def up_factors(method, cfg, state: dict) -> set[str]:
    """The trained tensors of a low-rank adapter that are *up* factors: matrices that only the up
    side of ``factors()`` depends on (LoRA's and PiSSA's B; never SVF's gains, which are vectors).
    Found from the autograd graph of the method's own factors, so no method is named here."""
    if method.TRAITS.kind != "low-rank":
        return set()
    probe = {k: v.detach().clone().requires_grad_(k in method.TRAINABLE) for k, v in state.items()}
    with torch.enable_grad():
        down, up = method.factors(cfg, probe)
        trained = [k for k in method.TRAINABLE if probe[k].dim() >= 2]

        def feeds(output: torch.Tensor) -> set[str]:
            if not output.requires_grad:
                return set()
            grads = torch.autograd.grad(output.sum(), [probe[k] for k in trained], allow_unused=True, retain_graph=True)
            return {k for k, g in zip(trained, grads) if g is not None}

        return feeds(up) - feeds(down)


def check_loraplus(method_name: str, cfg) -> None:
    """A method without up factors cannot take --loraplus-ratio (probed on a small square layer)."""
    from studio.adapters import registry
    from studio.adapters.contract import Site

    method = registry.get(method_name)
    found = set()
    if method.TRAITS.kind == "low-rank" and method.TRAITS.has_rank:
        size = 4 * getattr(cfg, "rank", 4) + 8
        state = method.init(cfg, torch.randn(size, size, generator=torch.Generator().manual_seed(0)),
                            Site("probe", size, size))
        found = up_factors(method, cfg, state)
    if not found:
        raise StudioError(f"--loraplus-ratio scales the learning rate of up factors (LoRA's B), and --method "
                          f"{method_name} has none: use a low-rank method such as lora, or leave --loraplus-ratio out")


def loraplus_groups(groups: list[tuple[list, float]], models, name: str, ratio: float | None) -> list[tuple[list, float]]:
    """Each parameter group (UNet, a text encoder, a UNet block) split into [(down factors and the
    other tensors, lr), (up factors, ratio x lr)], as PEFT's ``create_loraplus_optimizer`` forms them;
    the groups unchanged without a ratio."""
    from studio.adapters.targets import adapted_layers

    if ratio is None:
        return groups
    ups = set()
    for model in models:
        for layer in adapted_layers(model).values():
            if name in layer.adapters:
                a = layer.adapters[name]
                keys = up_factors(a.method, a.cfg, a.state())
                ups.update(id(p) for key, p in a.named_parameters() if key in keys)
    split = []
    for params, lr in groups:
        split += [([p for p in params if id(p) not in ups], lr), ([p for p in params if id(p) in ups], lr * ratio)]
    return split
