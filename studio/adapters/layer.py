"""AdaptedLayer: a frozen base layer (Linear, GPT-2 Conv1D or any Conv2d) plus named adapters.

    y = base(x) + sum_i w_i * delta_i(x)        every delta against the pristine W0

Every method sees the base weight as a matrix W0 (out, in): a Linear's weight, Conv1D's
transpose, a Conv2d's kernel flattened to (out, in_channels * kh * kw). A k x k convolution's
low-rank delta is then the kohya / LyCORIS LoCon layout: a k x k down-convolution to r channels
(the base's stride, padding and dilation) followed by a 1x1 up-convolution; a 1x1 conv (SD1.5's
``proj_in`` / ``proj_out``) is the k = 1 case and runs on NCHW as two 1x1 convolutions (faster
here than moving channels last: BENCH conv1x1_forward_vs_channels_last 0.57).

Kinds (``contract.py``): low-rank adapters run as one concatenated (down, up) matmul pair whose
columns carry the user weights, cached while nothing changes, so a slider move costs one small
re-stack. Dense and functional adapters run their own forward over the input and the pristine
base output (DoRA, (IA)^3), or x @ dW.T when they define none.

One source of truth for merging: ``merged`` lists the adapters folded into the live weight.
While it is non-empty the pristine W0 (and bias, when a method changes it) is kept as a backup;
the live weight is always *recomputed* as cast(W0 + sum w_i dW_i) in fp32, and unmerge copies
the backup back, so W0 returns bit-exactly whatever the dtype. Functional adapters never merge.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from studio.adapters.contract import Base, Site
from studio.errors import StudioError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.Conv1D: a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_conv2d(module: nn.Module) -> bool:
    """A Conv2d the core can adapt: one group, zero padding (every UNet conv)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def is_conv1x1(module: nn.Module) -> bool:
    """A Conv2d that is a Linear over channels: 1x1 kernel, stride 1, no padding / dilation, one group."""
    return (is_conv2d(module) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and module.padding in ((0, 0), "valid", "same") and tuple(module.dilation) == (1, 1))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, AdaptedLayer)) or is_conv1d(module) or is_conv2d(module)


def site_of(module: nn.Module, path: str) -> Site | None:
    """The Site of an adaptable module (wrapped or not), or None when it cannot be adapted."""
    if isinstance(module, AdaptedLayer):
        return module.site
    if isinstance(module, nn.Linear):
        return Site(path, module.out_features, module.in_features)
    if is_conv1d(module):
        return Site(path, module.weight.shape[1], module.weight.shape[0])
    if is_conv2d(module):
        kh, kw = module.kernel_size
        return Site(path, module.out_channels, module.in_channels * kh * kw, (kh, kw))
    return None


def base_matrix(module: nn.Module) -> torch.Tensor | None:
    """A module's pristine weight as the (out, in) matrix the methods see."""
    if isinstance(module, AdaptedLayer):
        return module.pristine_weight
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if is_conv1d(module):
        return module.weight.detach().T
    if is_conv2d(module):
        return module.weight.detach().flatten(1)
    return None


class Adapter(nn.Module):
    """One named adapter on one layer: its method, frozen config and state tensors."""

    def __init__(self, method: ModuleType, cfg, state: dict):
        super().__init__()
        self.method_name, self.method, self.cfg = method.NAME, method, cfg
        self.kind = method.TRAITS.kind
        self.weight = 1.0
        self.enabled = True
        self.scratch: dict = {}  # a functional method's per-forward notes (routing stats), never saved
        for key, value in state.items():
            if key in method.TRAINABLE:
                self.register_parameter(key, nn.Parameter(value))
            else:  # e.g. SVF's U, S, Vh: shared with the SVD cache and never saved
                self.register_buffer(key, value, persistent=key in method.SAVED)

    @property
    def mergeable(self) -> bool:
        return self.method.TRAITS.mergeable

    def state(self) -> dict:
        return {**self._parameters, **self._buffers}  # no __getattr__ per tensor: this runs every forward

    def saved_tensors(self) -> dict:
        return {k: getattr(self, k).detach() for k in self.method.SAVED}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.factors(self.cfg, self.state())

    def delta_weight(self, W0: torch.Tensor) -> torch.Tensor:
        """dW (out, in), fp32, without the user weight."""
        if self.kind == "low-rank":
            down, up = self.factors()
            return up @ down
        if self.kind == "dense":
            return self.method.delta_weight(self.cfg, self.state(), W0.float())
        raise StudioError(f"a {self.method_name} adapter has no fixed weight delta (it is {self.kind})")

    def delta_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        hook = getattr(self.method, "delta_bias", None)
        return None if hook is None or bias is None else hook(self.cfg, self.state(), bias.float())

    def extra_repr(self) -> str:
        return f"{self.method_name}, {self.cfg}, weight={self.weight}, enabled={self.enabled}"


class AdaptedLayer(nn.Module):
    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._w0: torch.Tensor | None = None
        self._b0: torch.Tensor | None = None
        self._stack_key = None
        self._stack = None
        self.transposed = is_conv1d(base)   # weight stored (in, out)
        self.conv = is_conv2d(base)         # weight (out, in, kh, kw), channels on dim 1
        if not (self.transposed or self.conv or isinstance(base, nn.Linear)):
            raise StudioError(
                f"module '{path}' is a {type(base).__name__}{_conv_shape(base)}: only Linear layers, GPT-2 Conv1D and "
                f"Conv2d with one group and zero padding can be adapted: target other modules")
        self.kernel = tuple(base.kernel_size) if self.conv else (1, 1)
        self.train(base.training)  # adapters take the model's mode (an eval model stays eval)

    # -- the base weight, always as (out, in) ---------------------------------------------
    @property
    def pristine_weight(self) -> torch.Tensor:
        W = self._w0 if self._w0 is not None else self.base.weight.detach()
        if self.conv:
            return W.flatten(1)  # (out, in * kh * kw)
        return W.T if self.transposed else W

    @property
    def pristine_bias(self) -> torch.Tensor | None:
        b = self.base.bias
        return self._b0 if self._b0 is not None else (None if b is None else b.detach())

    @property
    def out_features(self) -> int:
        return self.pristine_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.pristine_weight.shape[1]

    @property
    def site(self) -> Site:
        return Site(self.path, self.out_features, self.in_features, self.kernel)

    # -- the layer's two matmuls, in its own layout ----------------------------------------
    def apply_matrix(self, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """x through a (k, in) matrix as this layer would: Linear, or a conv with the base's geometry."""
        if not self.conv:
            return F.linear(x, M)
        b = self.base
        return F.conv2d(x, M.view(M.shape[0], -1, *self.kernel), None, b.stride, b.padding, b.dilation)

    def _up(self, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(hidden, up[:, :, None, None]) if self.conv else F.linear(hidden, up)

    def channels(self, v: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast over this layer's activations."""
        return v.view(1, -1, 1, 1) if self.conv else v

    # -- forward ----------------------------------------------------------------------------
    def live_adapters(self) -> list[Adapter]:
        return [a for n, a in self.adapters.items() if a.enabled and a.weight != 0 and n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base(x)
        lowrank = [a for a in live if a.kind == "low-rank"]
        if len(lowrank) == len(live):
            return self._lowrank_forward(x, self.base(x), lowrank, in_place=True)
        xf = x if x.dtype == torch.float32 else x.float()
        whole = getattr(live[0].method, "output", None) if len(live) == 1 and not self.merged else None
        if whole is not None:  # a dense method's whole output; it may never need the base's own (DoRA's W' x)
            base = self._base_view(x, None)
            return whole(live[0].cfg, live[0].state(), xf, base, live[0].weight, live[0].training).to(x.dtype)
        y = self.base(x)
        base = self._base_view(x, y)
        delta = None
        for a in live:
            if a.kind != "low-rank":
                d = self._run(a, xf, base)
                delta = d if delta is None else delta + d
        out = y + delta.to(y.dtype)
        return self._lowrank_forward(x, out, lowrank, in_place=False) if lowrank else out

    def _base_view(self, x: torch.Tensor, y: torch.Tensor | None) -> Base:
        """``y``: the base layer's output when already computed; None: computed on first use."""
        cache: list[torch.Tensor] = []

        def pristine_out() -> torch.Tensor:
            if not cache:  # merged adapters are in y: recompute W0 x + b0 then
                if y is None:
                    cache.append(self.base(x).float())
                elif self.merged:
                    b0 = self.pristine_bias
                    out = self.apply_matrix(x.float(), self.pristine_weight.float())
                    cache.append(out if b0 is None else out + self.channels(b0.float()))
                else:
                    cache.append(y.float())
            return cache[0]

        bias, W0 = self.pristine_bias, self.pristine_weight
        return Base(W0 if W0.dtype == torch.float32 else W0.float(), None if bias is None else bias.float(),
                    pristine_out, self.apply_matrix, self.channels, self._up, W0.dtype)

    def _run(self, a: Adapter, x: torch.Tensor, base: Base) -> torch.Tensor:
        forward = getattr(a.method, "forward", None)
        if a.kind == "functional":  # the one extra argument: where a router leaves its statistics
            return forward(a.cfg, a.state(), x, base, a.weight, a.training, a.scratch)
        if forward is not None:
            return forward(a.cfg, a.state(), x, base, a.weight, a.training)
        dW = a.delta_weight(base.W0) * a.weight
        out = self.apply_matrix(x, dW)
        db = a.delta_bias(base.bias)
        return out if db is None else out + self.channels(db * a.weight)

    def _lowrank_forward(self, x: torch.Tensor, y: torch.Tensor, live: list[Adapter], in_place: bool) -> torch.Tensor:
        """y + up (down x). ``in_place``: y is the base layer's fresh output, which no backward needs
        (Linear and Conv1D save their input, not their output), so the up-step accumulates into it:
        one pass less over the activations, training included (measured 14 % off a 320 x 320 Linear
        LoRA step on 8192 tokens)."""
        if len(live) == 1 and live[0].training and getattr(live[0].cfg, "dropout", 0.0) > 0:
            x = F.dropout(x, live[0].cfg.dropout, training=True)  # elementwise: the layout does not matter
        if len(live) == 1 and not self.conv:  # the training path: no stacking
            down, up = live[0].factors()
            up = up if live[0].weight == 1 else up * live[0].weight
            hidden = F.linear(x if x.dtype == down.dtype else x.to(down.dtype), down)
        else:
            down, up = self._stacked(live)
            hidden = self.apply_matrix(x.to(down.dtype), down)  # (..., R) / (N, R, H, W)
        if in_place and not self.conv and y.dtype == up.dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.T)
            return y
        delta = self._up(hidden, up)
        if in_place and delta.dtype == y.dtype:
            return y.add_(delta)
        return y + delta.to(y.dtype)

    def _stacked(self, live: list[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate the factors of all live low-rank adapters; cache while nothing changed."""
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

    # -- deltas, merge / unmerge --------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        return self.adapters[name].delta_weight(self.pristine_weight)

    def merge(self, names: list[str]) -> None:
        new = [n for n in names if n in self.adapters and n not in self.merged and self.adapters[n].mergeable]
        if new:
            self._write(self.merged + new)

    def refresh(self) -> None:
        """Re-merge after a weight or enable change of a merged adapter."""
        if self.merged:
            self._write(self.merged)

    def unmerge(self) -> None:
        with torch.no_grad():
            if self._w0 is not None:
                self.base.weight.copy_(self._w0)
            if self._b0 is not None:
                self.base.bias.copy_(self._b0)
        self._w0 = self._b0 = None
        self.merged = []

    def _write(self, names: list[str]) -> None:
        W0, b0 = self.pristine_weight, self.pristine_bias
        W = W0.float().clone()
        b = None if b0 is None else b0.float().clone()
        bias_changed = False
        for name in names:
            adapter = self.adapters[name]
            if not adapter.enabled or adapter.weight == 0:
                continue
            dW = adapter.delta_weight(W0).detach().to(W.device)
            db = adapter.delta_bias(b0)
            if not torch.isfinite(dW).all() or (db is not None and not torch.isfinite(db).all()):
                raise StudioError(
                    f"cannot merge adapter '{name}' into module '{self.path}': its delta has NaN or "
                    f"infinite values (a diverged or damaged adapter): retrain it with a lower "
                    f"learning rate, or leave it out of the mix")
            W += adapter.weight * dW
            if db is not None:
                b += adapter.weight * db.detach().to(b.device)
                bias_changed = True
        out = W.to(W0.dtype)
        if not torch.isfinite(out).all():
            raise StudioError(
                f"merging {names} into module '{self.path}' overflows {W0.dtype}: lower the adapter "
                f"weights or merge in float32")
        if self._w0 is None:
            self._w0 = self.base.weight.detach().clone()
        if (bias_changed or self._b0 is not None) and self._b0 is None:
            self._b0 = self.base.bias.detach().clone()
        with torch.no_grad():
            weight = self.base.weight
            weight.copy_(out.view(weight.shape) if self.conv else out.T if self.transposed else out)
            if self._b0 is not None:
                self.base.bias.copy_((b if bias_changed else self._b0.float()).to(self._b0.dtype))
        self.merged = list(names)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, merged={self.merged}"


AdaptedLinear = AdaptedLayer  # the name of the Linear-only wrapper of core v1


def _conv_shape(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (f" (kernel {tuple(module.kernel_size)}, stride {tuple(module.stride)}, padding {module.padding}, "
                f"groups {module.groups}, padding mode {module.padding_mode})")
    return ""
