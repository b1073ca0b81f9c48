"""What a training loop does around its optimizer beyond the step itself, for both trainers alike.

    after each step    the parameters' version counters bumped (the fused optimizers write behind
                       autograd's back), ReLoRA's restarts (trainers/relora.py), the EMA update (trainers/ema.py)
    checkpoints        their state beside the optimizer's (``state_dict`` / ``load_state_dict``), and the
                       methods' own training state (a method's ``CHECKPOINTED`` tensors, studio/adapters/contract.py)
    samples            schedule-free's averaged weights, or the EMA when on
    adapter files      schedule-free's averaged weights, ReLoRA's accumulated + current factors folded
                       into one plain LoRA; ``<name>-ema.safetensors`` from the EMA
    file metadata      the optimizer's name, kohya's ``loraplus_lr_ratio`` network argument, ReLoRA

Every swap is undone exactly on the way out, so sampling or saving mid-run never changes the
numbers the run goes on training with (a resumed run matches a straight one bit for bit).
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager

import torch

from studio.adapters.targets import adapted_layers
from trainers import optimizers
from trainers.ema import EMA
from trainers.relora import ReLoRA, rewarm_steps


class Extras:
    def __init__(self, cfg, models: dict[str, torch.nn.Module], name: str, optimizer, params: list):
        self.cfg, self.optimizer, self.params = cfg, optimizer, list(params)
        self.models, self.name = models, name
        self.relora = (ReLoRA(models, name, cfg.relora_every, cfg.relora_warmup, cfg.relora_prune, cfg.optimizer,
                              optimizer, cfg.seed) if cfg.relora_every else None)
        self.ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None

    def hooks(self, step: int, total: int) -> list:
        """The callables ``loop.apply_step`` runs after the optimizer step, in order."""
        hooks = [self.stepped]
        if self.relora is not None:
            hooks.append(lambda: self.relora.after_step(step, total))
        if self.ema is not None:
            hooks.append(self.ema.update)
        return hooks

    def stepped(self) -> None:
        """Tell autograd the optimizer changed every parameter in place. Fused AdamW (and the 8-bit
        kernels) write without bumping ``_version``, and an adapter layer keys its cached stacked
        factors (studio/adapters/layer.py ``_stacked``, used without gradients: validation, samples)
        on those counters, so it would go on using the factors of an earlier step."""
        for p in self.params:
            torch.autograd.graph.increment_version(p)

    def state_dict(self) -> dict:
        state = {}
        if self.relora is not None:
            state["relora"] = self.relora.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        methods = {key: tensor.detach().clone() for key, tensor in self._checkpointed().items()}
        if methods:
            state["methods"] = methods
        return state

    def load_state_dict(self, states: dict) -> None:
        if self.relora is not None:
            self.relora.load_state_dict(states["relora"])
        if self.ema is not None:
            self.ema.load_state_dict(states["ema"])
        # a checkpoint written before methods kept their state has none: the run goes on from a fresh one
        saved = states.get("methods", {})
        with torch.no_grad():
            for key, tensor in self._checkpointed().items():
                if key in saved:
                    tensor.copy_(saved[key])

    def _checkpointed(self) -> dict[str, torch.Tensor]:
        """``component.path.tensor`` -> the live tensor, for each adapter's ``method.CHECKPOINTED`` tensors."""
        return {f"{component}.{path}.{key}": getattr(layer.adapters[self.name], key)
                for component, model in self.models.items() for path, layer in adapted_layers(model).items()
                if self.name in layer.adapters
                for key in getattr(layer.adapters[self.name].method, "CHECKPOINTED", ())}

    @contextmanager
    def evaluation(self):
        """The weights to evaluate (validation): schedule-free's average, else the trained ones."""
        with optimizers.evaluation(self.cfg.optimizer, self.optimizer):
            yield

    @contextmanager
    def for_samples(self):
        with ExitStack() as stack:
            stack.enter_context(self.evaluation())
            if self.ema is not None:
                stack.enter_context(self.ema.applied())
            yield

    @contextmanager
    def for_file(self, ema: bool = False):
        """The weights an adapter file holds (``ema``: the averaged ones), in the layout it holds them."""
        with ExitStack() as stack:
            stack.enter_context(self.evaluation())
            if ema:
                stack.enter_context(self.ema.applied())
            if self.relora is not None:
                stack.enter_context(self.relora.folded())
            yield


def metadata(cfg) -> dict:
    """Header fields of the run's adapter files for these options (trainers pass them on)."""
    fields = {"optimizer": optimizers.get(cfg.optimizer).label}
    if cfg.optimizer_args:
        fields["studio.optimizer_args"] = {k: v if isinstance(v, (int, float, bool, str)) else str(v)
                                           for k, v in cfg.optimizer_args.items()}
    if cfg.relora_every:
        fields["studio.relora"] = {"every": cfg.relora_every, "prune": cfg.relora_prune,
                                   "rewarm_steps": rewarm_steps(cfg.relora_every, cfg.relora_warmup)}
    if cfg.ema_decay:
        fields["studio.ema_decay"] = cfg.ema_decay
    return fields


def network_args(cfg, others: str | None) -> str | None:
    """kohya's ss_network_args (a JSON object of strings): ``others`` (block dims ...) plus LoRA+'s
    ``loraplus_lr_ratio``, kohya's network argument for the same knob."""
    args = json.loads(others) if others else {}
    if cfg.loraplus_ratio is not None:
        args["loraplus_lr_ratio"] = f"{cfg.loraplus_ratio:g}"
    return json.dumps(args) if args else None
