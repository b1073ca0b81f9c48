"""An exponential moving average of the adapter weights (``--ema-decay 0.999``).

After the optimizer's t-th step (t = 1, 2, ...), for every trained tensor p:

    d_t   = min(decay, (1 + (t - 1)) / (10 + (t - 1)))     (d_1 = 0: the average starts at p_1)
    ema_t = d_t ema_{t-1} + (1 - d_t) p_t

the warm-up of diffusers' ``EMAModel`` (its default, use_ema_warmup=False), so a short LoRA run is
not dominated by the zero-initialised B of step 0, and the same numbers as that class (tested).
The shadow copies are fp32 on the parameters' device; they are checkpointed with the optimizer so
a resumed run continues bit-identically, swapped in (``applied``) to render samples and to write
``<name>-ema.safetensors``, and swapped back out exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), float(decay)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        step = self.updates - 1  # diffusers' optimization_step - 1, taken after the increment
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - d)  # s = d s + (1 - d) p

    @contextmanager
    def applied(self):
        """The averaged weights in the parameters while inside; the trained ones restored exactly after."""
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, kept):
                    p.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.shadow = [s.to(p.device, torch.float32).clone() for s, p in zip(state["shadow"], self.params)]
