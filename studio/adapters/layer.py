"""AdaptedLinear: a frozen base Linear (GPT-2 Conv1D, or 1x1 Conv2d) plus any number of named adapters.

    y = base(x) + sum_i w_i * delta_i(x)        delta_i(x) = x @ dW_i.T, dW_i against pristine W0

A 1x1 convolution (stride 1, no padding or dilation, one group; SD1.5's ``proj_in`` / ``proj_out``)
is a Linear over the channel dimension: W0 is ``weight.view(out, in)``, its delta runs over dim 1
of an (N, C, H, W) input, and merging writes ``W.view(out, in, 1, 1)``. Every method works on it
unchanged because every method only ever sees the (out, in) matrix.

One source of truth for merging: ``merged`` lists the adapters folded into the live weight.
While it is non-empty the pristine W0 is kept as a backup; the live weight is always
*recomputed* as cast(W0 + sum w_i dW_i) in fp32 from that backup, and unmerge copies the
backup back, so W0 returns bit-exactly whatever the dtype.

Several unmerged adapters run as one concatenated (down, up) matmul pair whose columns are
scaled by the user weights; the stacked factors are cached while parameters and weights do
not change, so moving a weight slider costs one small re-stack and no re-merge.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from studio.errors import StudioError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.Conv1D: a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_conv1x1(module: nn.Module) -> bool:
    """A Conv2d that is a Linear over channels: 1x1 kernel, stride 1, no padding / dilation, one group."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and module.padding in ((0, 0), "valid", "same") and tuple(module.dilation) == (1, 1)
            and module.groups == 1)


class Adapter(nn.Module):
    """One named adapter on one layer: its method, frozen config and state tensors."""

    def __init__(self, method_name: str, method: ModuleType, cfg, state: dict):
        super().__init__()
        self.method_name, self.method, self.cfg = method_name, method, cfg
        self.weight = 1.0
        self.enabled = True
        for key, value in state.items():
            if key in method.TRAINABLE:
                self.register_parameter(key, nn.Parameter(value))
            else:  # SVF's U, S, Vh are shared with the SVD cache and never saved
                self.register_buffer(key, value, persistent=key in method.SAVED)

    def state(self) -> dict:
        return {**self._parameters, **self._buffers}  # no __getattr__ per tensor: this runs every forward

    def saved_tensors(self) -> dict:
        return {k: getattr(self, k).detach() for k in self.method.SAVED}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.factors(self.cfg, self.state())

    def delta_weight(self) -> torch.Tensor:
        down, up = self.factors()
        return up @ down  # (out, in), fp32

    def forward(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        return self.method.forward_delta(self.cfg, self.state(), x, self.training, weight)

    def extra_repr(self) -> str:
        return f"{self.method_name}, {self.cfg}, weight={self.weight}, enabled={self.enabled}"


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._w0: torch.Tensor | None = None
        self._stack_key = None
        self._stack = None
        self.transposed = is_conv1d(base)   # weight stored (in, out)
        self.conv = is_conv1x1(base)        # weight stored (out, in, 1, 1), channels on dim 1
        if not (self.transposed or self.conv or isinstance(base, nn.Linear)):
            raise StudioError(
                f"module '{path}' is a {type(base).__name__}{_conv_shape(base)}: only Linear layers and 1x1 "
                f"convolutions (stride 1, no padding) can be adapted; 3x3 / strided convolutions (LoCon) are "
                f"not supported")

    # -- the base weight, always as (out, in) ---------------------------------------------
    @property
    def pristine_weight(self) -> torch.Tensor:
        W = self._w0 if self._w0 is not None else self.base.weight.detach()
        if self.conv:
            return W.view(W.shape[0], W.shape[1])
        return W.T if self.transposed else W

    @property
    def out_features(self) -> int:
        return self.pristine_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.pristine_weight.shape[1]

    # -- forward ----------------------------------------------------------------------------
    def live_adapters(self) -> list[Adapter]:
        return [a for n, a in self.adapters.items() if a.enabled and a.weight != 0 and n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        live = self.live_adapters()
        if not live:
            return y
        if self.conv:
            return self._conv_forward(x, y, live)
        if len(live) == 1:  # the training path: no stacking, no extra pass over the output
            delta = live[0].forward(x if x.dtype == torch.float32 else x.float(), live[0].weight)
            return y.add_(delta) if delta.dtype == y.dtype else y + delta.to(y.dtype)
        down, up = self._stacked(live)
        hidden = F.linear(x.to(down.dtype), down)  # (..., R)
        if not torch.is_grad_enabled() and y.dtype == up.dtype and y.is_contiguous():
            # inference: accumulate into y in place, saving one pass over the activations
            y.view(-1, y.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.T)
            return y
        return y + F.linear(hidden, up).to(y.dtype)

    def _conv_forward(self, x: torch.Tensor, y: torch.Tensor, live: list[Adapter]) -> torch.Tensor:
        """The delta of a 1x1 conv as two 1x1 convolutions with the (stacked) factors as kernels.

        Why not move the channels last and reuse the Linear path: on an (N, C, H, W) input that
        permute makes F.linear copy the activations, and the result is strided; two 1x1 convs run
        on NCHW as they are. Measured on one shared core, SD1.5 proj_in at 512 px (C 320, 64x64,
        r 8): forward 1.7-3x faster, forward + backward ~2x faster than the channels-last path
        (benchmarks/adapter_overhead.py: BENCH conv1x1_forward_vs_channels_last 0.57).
        The factors (down, up) carry every scale, so one path serves every method.
        """
        down, up = self._stacked(live)
        if len(live) == 1 and live[0].training and getattr(live[0].cfg, "dropout", 0.0) > 0:
            x = F.dropout(x, live[0].cfg.dropout, training=True)  # elementwise: the layout does not matter
        hidden = F.conv2d(x.to(down.dtype), down[:, :, None, None])       # (N, R, H, W)
        delta = F.conv2d(hidden, up[:, :, None, None])                     # (N, out, H, W)
        return y.add_(delta) if delta.dtype == y.dtype else y + delta.to(y.dtype)

    def _stacked(self, live: list[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate the factors of all live adapters; cache while nothing changed."""
        tensors = [t for a in live for t in a.state().values()]
        cacheable = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        key = tuple((id(a), a.weight, tuple(t._version for t in a.state().values())) for a in live)
        if cacheable and key == self._stack_key:
            return self._stack
        pairs = [a.factors() for a in live]
        down = torch.cat([d for d, _ in pairs], dim=0)                              # (R, in)
        up = torch.cat([u * a.weight for (_, u), a in zip(pairs, live)], dim=1)     # (out, R)
        if cacheable:
            self._stack_key, self._stack = key, (down, up)
        return down, up

    # -- merge / unmerge --------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        new = [n for n in names if n in self.adapters and n not in self.merged]
        if new:
            self._write(self.merged + new)

    def refresh(self) -> None:
        """Re-merge after a weight or enable change of a merged adapter."""
        if self.merged:
            self._write(self.merged)

    def unmerge(self) -> None:
        if self._w0 is not None:
            with torch.no_grad():
                self.base.weight.copy_(self._w0)
        self._w0 = None
        self.merged = []

    def _write(self, names: list[str]) -> None:
        W0 = self.pristine_weight
        W = W0.float().clone()
        for name in names:
            adapter = self.adapters[name]
            if not adapter.enabled or adapter.weight == 0:
                continue
            dW = adapter.delta_weight().detach().to(W.device)
            if not torch.isfinite(dW).all():
                raise StudioError(
                    f"cannot merge adapter '{name}' into module '{self.path}': its delta has NaN or "
                    f"infinite values (a diverged or damaged adapter): retrain it with a lower "
                    f"learning rate, or leave it out of the mix")
            W += adapter.weight * dW
        out = W.to(W0.dtype)
        if not torch.isfinite(out).all():
            raise StudioError(
                f"merging {names} into module '{self.path}' overflows {W0.dtype}: lower the adapter "
                f"weights or merge in float32")
        if self._w0 is None:
            self._w0 = self.base.weight.detach().clone()
        with torch.no_grad():
            self.base.weight.copy_(out.view_as(self.base.weight) if self.conv else out.T if self.transposed else out)
        self.merged = list(names)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, merged={self.merged}"


def _conv_shape(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (f" (kernel {tuple(module.kernel_size)}, stride {tuple(module.stride)}, padding {module.padding}, "
                f"groups {module.groups})")
    return ""
