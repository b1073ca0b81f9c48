"""Counting on the meta device, for ``studio train --check`` (trainers/memory.py): the bytes
autograd saves in a forward (plain and checkpointed), the bytes alive at once in a forward without
autograd (the VAE encode), and the sizes of attached adapters. Shapes only: nothing is computed.

A saved tensor is counted by its storage, once, however many views of it are saved, and never when
the storage is one of the model's own tensors (a Linear saves its weight's transpose: a view of a
weight the estimate counts as weights). Attention is counted as the run's device computes it
(``_fused_attention``).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# -- saved activations ---------------------------------------------------------------------------
class _Saved:
    """Distinct storages saved for backward, in bytes (views of one storage count once), leaving
    out the storages in ``own`` (the model's parameters and buffers, counted as weights)."""

    def __init__(self, own: set[int] = frozenset()):
        self.own = own
        self.seen: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # alive while counting, so no storage id is reused

    def add(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            if s._cdata not in self.own:
                self.seen.setdefault(s._cdata, s.nbytes())
                self.keep.append(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}


@contextmanager
def _counting(saved: _Saved):
    with torch.autograd.graph.saved_tensors_hooks(saved.add, lambda t: t), _fused_attention():
        yield


@contextmanager
def _fused_attention():
    """scaled_dot_product_attention as the run's device computes it.

    On the meta device SDPA always takes the math path, which saves the (L x L) attention
    probabilities of every head: 64 MB a 32 x 32-latent self-attention at batch 2. The CPU runs
    a flash kernel and CUDA flash / memory-efficient ones whenever the inputs allow, which save
    q, k, v, the output and one logsumexp per query instead. So each call asks the device which
    backend it would choose for inputs like these (``torch._fused_sdp_choice`` on a small probe)
    and, for a fused one, runs the CPU flash kernel's meta function: its saved tensors are those
    of every fused kernel, up to their small scalars."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.is_meta and not enable_gqa and _device_fuses(query, key, attn_mask, dropout_p, is_causal, scale):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _device_fuses(query, key, attn_mask, dropout_p, is_causal, scale) -> bool:
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def probe(t, grad=False):  # the same heads, head size, dtype; 8 positions
        return torch.zeros(*t.shape[:-2], 8, t.shape[-1], dtype=t.dtype, device=device, requires_grad=grad)
    q, k = probe(query, query.requires_grad), probe(key)
    mask = None if attn_mask is None else torch.zeros(1, 1, 8, 8, dtype=attn_mask.dtype, device=device)
    choice = torch._fused_sdp_choice(q, k, k, mask, dropout_p, is_causal, scale=scale)
    return choice != int(torch.nn.attention.SDPBackend.MATH)


@dataclass
class Activations:
    plain: int
    """Saved bytes of one image's forward, everything kept."""
    outside: int = 0
    """With checkpointing: bytes kept outside the checkpointed blocks (their inputs included)."""
    largest_block: int = 0
    """With checkpointing: the largest block's own saved bytes (live while it is recomputed)."""

    @property
    def checkpointed(self) -> int:
        return self.outside + self.largest_block


def count_activations(model: nn.Module, run, checkpointable: bool = True) -> Activations:
    """Saved bytes of ``run(model)`` (a forward on meta tensors), plain and, when the model has
    checkpointing, with it (each checkpointed call counted on its own)."""
    own = _storages(model)
    plain = _Saved(own)
    with _counting(plain):
        run(model)
    if not checkpointable:
        return Activations(plain.total, plain.total, 0)
    outside, blocks = _Saved(own), []

    def counted_block(function, *args, **kwargs):
        for a in args:  # non-reentrant checkpointing keeps the block's inputs for the recompute
            if isinstance(a, torch.Tensor):
                outside.add(a)
        inner = _Saved(own)
        with _counting(inner):
            out = function(*args, **kwargs)
        blocks.append(inner.total)
        return out

    _set_checkpoint_function(model, counted_block)
    try:
        with _counting(outside):
            run(model)
    finally:
        _unset_checkpointing(model)
    return Activations(plain.total, outside.total, max(blocks, default=0))


def _set_checkpoint_function(model: nn.Module, function) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers calls function(module.__call__, *args)
        model.enable_gradient_checkpointing(gradient_checkpointing_func=lambda module, *a: function(module, *a))
    else:  # transformers calls function(layer.__call__, *args, **kwargs)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)


def _unset_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
    else:
        model._set_gradient_checkpointing(enable=False)


# -- bytes alive at once, without autograd ---------------------------------------------------------
class _Live(TorchDispatchMode):
    """Every storage an op creates is alive from its op until the last tensor on it dies
    (CPython frees a tensor when its last reference goes, as the run would)."""

    def __init__(self, own: set[int]):
        super().__init__()
        self.own, self.live, self.now, self.peak = own, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.own:  # a view of a weight
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def peak_live(model: nn.Module, run) -> int:
    """Peak bytes alive at once while ``run(model)`` runs without autograd on meta tensors (its
    inputs included when ``run`` makes them), leaving out the model's own tensors."""
    live = _Live(_storages(model))
    with torch.no_grad(), _fused_attention(), live:
        run(model)
    return live.peak


# -- adapters ------------------------------------------------------------------------------------
def adapter_sizes(models) -> tuple[int, int]:
    """(trainable values, bytes of every other adapter tensor) of the adapters attached to ``models``.

    Per adapter, not per distinct tensor: each layer of a real base has its own W0, so its own SVD
    (SVF's U, S, Vh), even where the meta proxy's cache hands one basis to same-shaped layers."""
    from studio.adapters.layer import Adapter

    trainable = fixed = 0
    for module in (m for model in models for m in model.modules() if isinstance(m, Adapter)):
        for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values():
            if t.requires_grad:
                trainable += t.numel()
            else:
                fixed += t.numel() * t.element_size()
    return trainable, fixed


class NoValues(TorchDispatchMode):
    """Attaching the run's adapters on the meta proxy, where no tensor has values:

    - a method that reads W0's values at init (SVF and its kin hash W0 to key their SVD cache)
      gets uninitialised memory of W0's shape when it copies W0 off the meta device: only the
      state's shapes are used, and they follow from W0's shape;
    - a method's 0-dim flags ((IA)^3's and MoV's ``input_side``) stay on the CPU with their
      value instead of moving to the meta device: its forward branches on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and device is not None:
            source, target = args[0], torch.device(device).type
            if source.is_meta and target != "meta":
                return torch.empty(source.shape, dtype=kwargs.get("dtype") or source.dtype, device=device)
            if not source.is_meta and source.dim() == 0 and target == "meta":
                return source.clone()
        return func(*args, **kwargs)
