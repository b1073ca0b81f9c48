"""The method contract: what one adapter method module provides, and the kinds the layer runs.

Every method is one module ``studio/adapters/<name>.py`` listed once in ``registry.METHODS``.
Nothing outside that module tests a method's name: layers, formats, trainers, the CLI and the
UI read the module's ``TRAITS`` and call the functions below.

A method module provides

    NAME: str                       the registry key (``--method NAME``)
    TRAITS: Traits                  kind, needs, export rule, default learning rates, help
    Config                          frozen dataclass of its options, validated in __post_init__
    TRAINABLE, SAVED: tuple[str]    state tensors that train / that a file stores
    init(cfg, W0, site, generator) -> state          a fresh adapter (a no-op at init)
    from_saved(cfg, W0, tensors, site) -> state      rebuild from saved tensors (W0 may be None
                                                     when TRAITS.needs_base is False)
    expected_shapes(cfg, site) -> {tensor: shape}    what a file must hold for this layer

optionally ``accepts(cfg, site) -> bool`` (a method that adapts only some of the targeted layers,
as (IA)^3 adapts keys, values and the feed-forward's second projection), and, by kind,

    low-rank     factors(cfg, state) -> (down (k, in), up (out, k)), dW = up @ down, every scale
                 folded in. Runs stacked with the other low-rank adapters of the layer.
    dense        delta_weight(cfg, state, W0) -> dW (out, in); optionally
                 delta_bias(cfg, state, bias) -> (out,) and a fast
                 forward(cfg, state, x, base, weight, training) -> the output delta.
                 Without ``forward`` it runs as x @ dW.T (a convolution with dW as kernel).
                 Optionally ``output(...)`` with forward's arguments -> y + delta, used when the
                 adapter is its layer's only live one (training): one pass less over the output.
    functional   forward(cfg, state, x, base, weight, training, scratch) -> the output delta, and no
                 fixed weight delta (routed experts): never merged, no plain-LoRA export.
                 ``scratch`` is the adapter's own dict (``Adapter.scratch``, never saved) where the
                 forward leaves what its training hooks or the UI read (a router's statistics).

and optionally ``CHECKPOINTED: tuple[str]``: state tensors a file does not hold but a resumed run needs
(AdaLoRA's importance statistics); training checkpoints save and restore them beside the optimizer's
state (trainers/extras.py), so a resume continues bit-identically;

and optionally ``prepare(cfg, paths) -> cfg``: a config resolved against the targeted module paths
before any layer is built (MoLA's per-block expert counts); the result is what a file stores.

A LyCORIS kind may add ``LYCORIS_KIND`` (its name in LyCORIS presets: "LoCon", "LoHa", "LoKr") and, to hold
the other kinds of a preset's mixed component, ``HOLD_LEVEL: int`` with ``hold(parts, where) -> tensors``: a lower
kind's module re-expressed exactly in its own LyCORIS keys (formats/lycoris.py picks the highest level present).

A method whose delta is already an SVD (SVF) may add ``svd(cfg, state) -> (U, g, Vh)`` with signed,
unsorted g: its plain-LoRA export then sorts g instead of taking a new SVD.

Two optional hooks read saved files rather than live layers (the routed experts have them):
``describe(config, modules) -> dict`` adds the method's own lines to ``studio inspect`` (experts,
routing, experts per block), and ``freeze(config, modules, gates, kernels) -> (method, modules)``
turns the file at fixed average gates into the static method it then equals, for
``studio bake --freeze-gates`` (studio/freeze_gates.py).

Every weight is seen as a matrix: a Linear's (out, in), GPT-2 Conv1D's transpose, a Conv2d's
(out, in * kh * kw) flattened kernel. ``Site`` tells a method where it is (path, kernel), for
the few choices that depend on it (a conv rank, the side an (IA)^3 vector scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import torch

KINDS = ("low-rank", "dense", "functional")
EXPORTS = ("exact", "truncated", "none")
"""How a method becomes a plain LoRA: exactly at its own rank; by SVD at a rank / energy with the
error reported; or not at all."""


@dataclass(frozen=True)
class Traits:
    kind: str
    """low-rank | dense | functional (see the module docstring)."""
    summary: str
    """One line for --help, the UI's pickers and the README."""
    label: str = ""
    """The method's short name as its paper writes it ('LoRA', '(IA)³'); default: the summary's first word."""
    lr: dict = field(default_factory=dict)
    """Default learning rate per task: {"image": ..., "lm": ...}."""
    needs_base: bool = False
    """from_saved needs the base weight W0 (SVF's basis, DoRA's norm, (IA)^3's scaled W0), so
    converting a file of this method to a plain LoRA needs the base model too."""
    has_rank: bool = True
    """The method has a rank (--rank applies)."""
    mergeable: bool = True
    """Its effect is a fixed weight delta that can be folded into W0."""
    export: str = "exact"
    """exact | truncated | none: see EXPORTS."""
    default_energy: float | None = None
    """Energy kept by a plain-LoRA export when neither --rank nor --energy is given (truncated
    exports); None = exact."""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.summary.split(",")[0].split(" ")[0])
        assert self.kind in KINDS, self.kind
        assert self.export in EXPORTS, self.export
        assert self.kind != "functional" or not self.mergeable


class Site(NamedTuple):
    """Where an adapter sits: the module path and the layer's geometry."""

    path: str
    out_features: int
    in_features: int          # in_channels * kh * kw for a convolution
    kernel: tuple[int, int] = (1, 1)

    @property
    def is_conv(self) -> bool:
        """A k x k (k > 1) convolution: kohya's LoCon targets (conv_dim / conv_alpha)."""
        return tuple(self.kernel) != (1, 1)


class Base(NamedTuple):
    """What a dense or functional ``forward`` may read of the frozen layer."""

    W0: torch.Tensor                          # (out, in), pristine
    bias: torch.Tensor | None                 # (out,) or None
    out: Callable[[], torch.Tensor]           # the pristine base output W0 x + b, computed once
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # apply(x, matrix (k, in)) -> (.., k) in the layer's layout
    channels: Callable[[torch.Tensor], torch.Tensor]              # a per-channel vector shaped to broadcast
    project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # project(hidden, up (out, k)): the 1x1 up-step
    dtype: torch.dtype = torch.float32       # the frozen layer's own dtype (W0 and x above are fp32 views)


@runtime_checkable
class Method(Protocol):
    NAME: str
    TRAITS: Traits
    Config: type
    TRAINABLE: tuple
    SAVED: tuple

    def init(self, cfg: Any, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict: ...

    def from_saved(self, cfg: Any, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict: ...

    def expected_shapes(self, cfg: Any, site: Site) -> dict: ...


def check_method(module) -> None:
    """A method module honours the contract (run for every registered method at import)."""
    assert isinstance(module, Method), f"{module.__name__} misses part of the method contract"
    kind = module.TRAITS.kind
    need = {"low-rank": ("factors",), "dense": ("delta_weight",), "functional": ("forward",)}[kind]
    missing = [n for n in need if not callable(getattr(module, n, None))]
    assert not missing, f"{module.__name__} is {kind} but has no {missing}"
