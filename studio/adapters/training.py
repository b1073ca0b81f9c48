"""Model-level training hooks a method may provide; the trainers call the two functions below.

Most methods are trained by the loss alone. A few need more, and always across all their layers
at once, so these hooks see every adapter of the run:

    aux_loss(adapters: list[Adapter]) -> Tensor | None
        a term added to the training loss, e.g. AdaLoRA's orthogonality regulariser on P and Q,
        or a routed mixture's load-balancing loss. Called inside autocast, once per micro-batch,
        after the forward that it regularises.
    after_step(adapters: list[Adapter], step: int, total: int) -> None
        called under no_grad after the optimizer step and before the gradients are cleared
        (PEFT's ``update_and_allocate`` point): AdaLoRA's importance scores and rank budget.
        ``step`` is the 0-based step just taken, ``total`` the run's number of steps.
    check_steps(adapters: list[Adapter], total: int) -> None
        raises a StudioError when the run's length does not fit the method's schedule (AdaLoRA's
        tinit / tfinal), for a trainer to call once it knows the number of steps, before writing
        anything (AdaLoRA's after_step raises the same error at the first step otherwise).

``adapters`` are the run's ``Adapter`` modules of that method in module order (UNet first, then
the text encoders, as the trainers pass ``models``), so a hook may rank them globally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from studio.adapters.layer import AdaptedLayer


def _by_method(models: Iterable[nn.Module], name: str) -> dict:
    """{method module: [Adapter, ...]} of the adapters named ``name``, in module order."""
    grouped: dict = {}
    for model in models:
        for module in model.modules():
            if isinstance(module, AdaptedLayer) and name in module.adapters:
                adapter = module.adapters[name]
                grouped.setdefault(adapter.method, []).append(adapter)
    return grouped


def has_hooks(models: Iterable[nn.Module], name: str) -> bool:
    """Whether any method of the run has a training hook (the loops skip the walk otherwise)."""
    return any(hasattr(m, "aux_loss") or hasattr(m, "after_step") for m in _by_method(models, name))


def aux_loss(models: Iterable[nn.Module], name: str) -> torch.Tensor | None:
    """The sum of the methods' auxiliary loss terms, or None when no method has one."""
    total = None
    for method, adapters in _by_method(models, name).items():
        hook = getattr(method, "aux_loss", None)
        term = hook(adapters) if hook else None
        if term is not None:
            total = term if total is None else total + term
    return total


@torch.no_grad()
def after_step(models: Iterable[nn.Module], name: str, step: int, total: int) -> None:
    for method, adapters in _by_method(models, name).items():
        hook = getattr(method, "after_step", None)
        if hook:
            hook(adapters, step, total)


def check_steps(models: Iterable[nn.Module], name: str, total: int) -> None:
    for method, adapters in _by_method(models, name).items():
        hook = getattr(method, "check_steps", None)
        if hook:
            hook(adapters, total)
