"""Methods' training hooks (studio/adapters/training.py) reach the trainers' loss and step.

A throwaway method module (a LoRA with an aux_loss and an after_step) is attached to a real
tiny model; the hooks must see every adapter of the run in module order, the aux term must be
added to the loss the backward sees, and after_step must run with the gradients still present.
"""

from __future__ import annotations

import types

import torch

import studio.adapters as A
from studio.adapters import lora, training
from trainers import loop


def hooked_lora(calls: list) -> types.ModuleType:
    m = types.ModuleType("hooked_lora")
    for key in dir(lora):
        if not key.startswith("__"):
            setattr(m, key, getattr(lora, key))

    def aux_loss(adapters):
        calls.append(("aux", len(adapters)))
        return sum((a.B.float() ** 2).sum() for a in adapters)

    def after_step(adapters, step, total):
        calls.append(("after", step, total, all(a.A.grad is not None for a in adapters)))

    m.aux_loss, m.after_step = aux_loss, after_step
    return m


def test_hooks_see_all_adapters_and_shape_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    A.attach(model, "a", "lora", A.lora.Config(rank=2), ["0", "1"])
    layers = [m for m in model.modules() if isinstance(m, A.AdaptedLayer)]
    calls: list = []
    method = hooked_lora(calls)
    for layer in layers:
        layer.adapters["a"].method = method
        with torch.no_grad():
            layer.adapters["a"].B.fill_(0.5)
    assert training.has_hooks([model], "a")
    term = training.aux_loss([model], "a")
    assert torch.allclose(term, torch.tensor(0.25 * (5 * 2 + 4 * 2)))
    params = A.trainable_parameters(model, "a")
    opt = loop.make_optimizer([(params, 1e-3)])
    sched = loop.make_schedule(opt, "constant", 0, 3)
    (model(torch.randn(3, 6)).sum() + term).backward()

    class NoAccel:
        def clip_grad_norm_(self, params, norm):
            torch.nn.utils.clip_grad_norm_(params, norm)

    loop.apply_step(NoAccel(), params, opt, sched, 1.0, 1, after=lambda: training.after_step([model], "a", 0, 3))
    assert calls == [("aux", 2), ("after", 0, 3, True)]
    assert all(p.grad is None for p in params)  # cleared after the hook, as every step


def test_plain_methods_have_no_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    A.attach(model, "a", "lora", A.lora.Config(rank=2), ["0"])
    assert not training.has_hooks([model], "a")
    assert training.aux_loss([model], "a") is None
