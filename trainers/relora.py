"""ReLoRA (Lialin et al. 2023, arXiv 2307.05695): a high-rank update from a series of low-rank ones.

Every ``every`` steps, on every adapted layer:

    acc_down = [acc_down; down]   (K + k, in)     acc_up = [acc_up, up]   (out, K + k)
    the adapter re-initialised by its method's init  (LoRA: A random as at init, B = 0: a no-op again)
    its optimizer moments pruned (the paper zeroes the 99 % smallest), the LR re-warmed linearly

with ``(down, up) = method.factors(...)`` (every scale folded in), so the layer computes
W0 + acc_up @ acc_down + dW_current and after k restarts the accumulated delta has rank <= k r.

Where the accumulated delta lives: a second, frozen adapter ``<name>_relora`` of the plain LoRA
method on each layer, whose A and B are the stacked factors (alpha = rank: scale 1). It runs in the
layer's one stacked low-rank matmul beside the trained adapter, so layer.py needs no special case
and any low-rank method restarts the same way. Files written by the run (final, intermediate, EMA)
fold both into one plain LoRA of rank K + r per layer (``folded``): exactly the trained function,
exported to kohya exactly. Checkpoints keep the stacked factors beside the optimizer state.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from studio.adapters import registry
from studio.adapters.common import conv_down
from studio.adapters.layer import Adapter
from studio.adapters.targets import adapted_layers
from studio.errors import StudioError
from trainers import loop, optimizers

PLAIN = "lora"
"""The method that holds the accumulated delta and the folded files: a plain low-rank pair."""


def accumulated_name(name: str) -> str:
    return f"{name}_relora"


def check_method(method: str, dropout: float) -> None:
    """Only methods with factors and a rank restart (dense ones have no factors to re-initialise)."""
    traits = registry.get(method).TRAITS
    if traits.kind != "low-rank" or not traits.has_rank:
        raise StudioError(f"--relora-every restarts low-rank factors, and --method {method} has none ({traits.kind}"
                          f"{'' if traits.has_rank else ', no rank'}): use a low-rank method such as lora")
    if dropout:
        raise StudioError("--relora-every runs the accumulated delta beside the adapter, where adapter dropout does "
                          "not apply: use --dropout 0 with ReLoRA")


def check_steps(every: int, total: int) -> None:
    if every >= total:
        raise StudioError(f"--relora-every {every} is not smaller than the run's {total} steps, so it would never "
                          f"restart: use --relora-every {max(1, total // 4)} or more --steps")


def rewarm_factor(t: int, every: int, warmup: int) -> float:
    """The jagged schedule's factor at step t: a linear ramp over ``warmup`` steps after each restart."""
    if t < every:
        return 1.0
    return min(1.0, ((t % every) + 1) / max(1, warmup))


def _plain_config(rank: int, conv_rank: int | None = None):
    conv = {} if conv_rank is None else {"conv_rank": conv_rank, "conv_alpha": float(conv_rank)}
    return registry.make_config(PLAIN, {"rank": rank, "alpha": float(rank), **conv})


class ReLoRA:
    """The restarts of adapter ``name`` on ``models`` ({component: model}) and their accumulated delta."""

    def __init__(self, models: dict[str, nn.Module], name: str, every: int, warmup: int | None, prune: float,
                 optimizer_name: str, optimizer, seed: int):
        self.models, self.name, self.every, self.prune = models, name, every, prune
        self.warmup = rewarm_steps(every, warmup)
        self.optimizer_name, self.optimizer, self.seed = optimizer_name, optimizer, seed
        self.restarts = 0

    def layers(self):
        """(component, path, layer) of every layer with the adapter, in model order."""
        for component, model in self.models.items():
            for path, layer in adapted_layers(model).items():
                if self.name in layer.adapters:
                    yield component, path, layer

    def after_step(self, step: int, total: int) -> None:
        """Restart after step ``step`` (0-based) when a cycle ends; never after the last step."""
        if (step + 1) % self.every == 0 and step + 1 < total:
            self.restart(step)

    @torch.no_grad()
    def restart(self, step: int) -> None:
        trained = []
        for component, path, layer in self.layers():
            adapter = layer.adapters[self.name]
            down, up = adapter.factors()                                    # (k, in), (out, k)
            acc = layer.adapters[accumulated_name(self.name)] if accumulated_name(self.name) in layer.adapters else None
            if acc is not None:
                old_down, old_up = acc.factors()
                down, up = torch.cat([old_down, down]), torch.cat([old_up, up], dim=1)
            self._set_accumulated(layer, down.detach().clone(), up.detach().clone())
            g = loop.step_generator(self.seed, step, f"relora/{component}.{path}")
            fresh = adapter.method.init(adapter.cfg, layer.pristine_weight.float(), layer.site, g)
            for key, value in fresh.items():
                getattr(adapter, key).copy_(value)
            trained += list(adapter.parameters())
        optimizers.prune_state(self.optimizer_name, self.optimizer, trained, self.prune)
        self.restarts += 1

    def _set_accumulated(self, layer, down: torch.Tensor, up: torch.Tensor) -> None:
        """The frozen accumulated adapter of ``layer`` holding ``up @ down`` (it is never trained)."""
        rank = down.shape[0]
        site = layer.site
        state = {"A": conv_down(down, site), "B": up}
        acc = Adapter(registry.get(PLAIN), _plain_config(rank), state).train(False)
        acc.requires_grad_(False)
        layer.adapters[accumulated_name(self.name)] = acc

    def state_dict(self) -> dict:
        tensors = {}
        for component, path, layer in self.layers():
            acc = layer.adapters[accumulated_name(self.name)] if accumulated_name(self.name) in layer.adapters else None
            if acc is not None:
                down, up = acc.factors()
                tensors[f"{component}.{path}.down"], tensors[f"{component}.{path}.up"] = down.cpu(), up.cpu()
        return {"restarts": self.restarts, "tensors": tensors}

    def load_state_dict(self, saved: dict) -> None:
        self.restarts = int(saved["restarts"])
        tensors = saved["tensors"]
        for component, path, layer in self.layers():
            key = f"{component}.{path}"
            if f"{key}.down" in tensors:
                device = layer.pristine_weight.device
                self._set_accumulated(layer, tensors[f"{key}.down"].to(device), tensors[f"{key}.up"].to(device))

    @contextmanager
    def folded(self):
        """Adapter ``name`` as one plain LoRA of the accumulated and the current factors while inside
        (what the run's files hold), the trained adapter and the accumulated one put back after."""
        if not self.restarts:
            yield
            return
        kept = []
        ranks = {}
        for _, _, layer in self.layers():
            adapter, acc = layer.adapters[self.name], layer.adapters.pop(accumulated_name(self.name))
            acc_down, acc_up = acc.factors()
            down, up = adapter.factors()
            down, up = torch.cat([acc_down, down]).detach(), torch.cat([acc_up, up], dim=1).detach()
            ranks.setdefault(layer.site.is_conv, down.shape[0])
            kept.append((layer, adapter, acc, down, up))
        linear_rank = ranks.get(False, ranks.get(True))
        conv_rank = ranks.get(True) if True in ranks and ranks.get(True) != linear_rank else None
        cfg = _plain_config(linear_rank, conv_rank)
        for layer, _, _, down, up in kept:
            state = {"A": conv_down(down, layer.site), "B": up}
            layer.adapters[self.name] = Adapter(registry.get(PLAIN), cfg, state).train(False)
        try:
            yield
        finally:
            for layer, adapter, acc, _, _ in kept:
                layer.adapters[self.name] = adapter
                layer.adapters[accumulated_name(self.name)] = acc


def rewarm_steps(every: int, warmup: int | None) -> int:
    """--relora-warmup, by default a tenth of the cycle (the paper re-warms 50-100 of 5000 steps)."""
    return warmup if warmup is not None else max(1, every // 10)
