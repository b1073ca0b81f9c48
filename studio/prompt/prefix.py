"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): P learned key / value vectors per layer.

Every attention layer l of a causal LM attends, besides the tokens of the sequence, to P
virtual tokens whose keys and values are free parameters:

    key_l, value_l : (H_kv, P, d)        H_kv key/value heads of width d (GQA: the KV heads)
    attn_l(x) = softmax(q [K_prefix ; K_x]^T / sqrt(d)) [V_prefix ; V_x]

They enter as a past key/value cache of length P, exactly as PEFT's ``PrefixTuningConfig`` does:
the real tokens then sit at positions P, P+1, ... (RoPE / learned positions alike) and the
attention mask gains P ones in front. The file keeps the prefixes only:

    prompt.prefix.key, prompt.prefix.value : (L, H_kv, P, d)   fp32

Training can use the paper's reparametrisation (§4.3, PEFT's ``prefix_projection=True``):
the prefix is an MLP of a smaller table, E (P, H_kv d) -> Linear(H_kv d, h) -> tanh ->
Linear(h, L 2 H_kv d); after training the MLP is evaluated once and dropped (``fold``).
Without it (``projection=None``) the prefixes themselves are the parameters, initialised with
the base model's own keys / values over P real tokens of the training data (§7.2: real-word
activations train better than random ones); the MLP starts from PEFT's initialisation.

PEFT's flat layout (``prompt_embeddings`` (P, L 2 H_kv d), last axis ordered layer, key|value,
head, d) converts both ways with ``to_flat`` / ``from_flat``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from studio.errors import StudioError

KEYS = ("prefix.key", "prefix.value")
"""The prompt-side tensors of a prefix in an adapter file (``prompt.`` + these in the native layout)."""


@dataclass(frozen=True)
class Geometry:
    """Where a prefix goes: the model's layers, key/value heads and head width."""

    layers: int
    heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.heads * self.head_dim


def geometry(config) -> Geometry:
    """The prefix shape a transformers config implies (PEFT's rule: GQA models get their KV heads)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Geometry(int(layers), int(kv_heads), int(head_dim))


def from_flat(flat: torch.Tensor, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (P, L*2*H*d) -> key, value (L, H, P, d)."""
    P = flat.shape[0]
    kv = flat.reshape(P, geo.layers, 2, geo.heads, geo.head_dim).permute(2, 1, 3, 0, 4)  # (2, L, H, P, d)
    return kv[0].contiguous(), kv[1].contiguous()


def to_flat(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """key, value (L, H, P, d) -> PEFT's (P, L*2*H*d)."""
    kv = torch.stack([key, value])  # (2, L, H, P, d)
    return kv.permute(3, 1, 0, 2, 4).reshape(key.shape[2], -1)


def check(key: torch.Tensor, value: torch.Tensor, geo: Geometry, context: int, where: str) -> None:
    """A prefix fits a model: its (L, H, P, d) matches and P leaves room in the context."""
    expected = (geo.layers, geo.heads, key.shape[2] if key.dim() == 4 else -1, geo.head_dim)
    if key.dim() != 4 or tuple(key.shape) != expected or key.shape != value.shape:
        raise StudioError(f"the prefix in {where} has key {tuple(key.shape)} / value {tuple(value.shape)} but this "
                          f"model takes (layers {geo.layers}, kv heads {geo.heads}, P, head dim {geo.head_dim}): "
                          f"use the base model it was trained on")
    if key.shape[2] >= context:
        raise StudioError(f"the prefix in {where} is {key.shape[2]} tokens but the model's context is {context}: "
                          f"use a shorter prefix")


class PrefixEncoder(nn.Module):
    """The trained parameters of a prefix: the prefixes themselves, or the table + MLP that makes them."""

    def __init__(self, geo: Geometry, length: int, projection: int | None = None,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.geo, self.length, self.projection = geo, length, projection
        out = geo.layers * 2 * geo.token_dim
        if projection:
            self.embedding = nn.Embedding(length, geo.token_dim)  # (P, H d)
            self.transform = nn.Sequential(nn.Linear(geo.token_dim, projection), nn.Tanh(), nn.Linear(projection, out))
        else:
            self.embedding = nn.Embedding(length, out)  # (P, L 2 H d): PEFT's prompt_embeddings
            if init is not None:
                with torch.no_grad():
                    self.embedding.weight.copy_(to_flat(*init))

    def flat(self) -> torch.Tensor:
        table = self.embedding.weight
        return self.transform(table) if self.projection else table  # (P, L 2 H d)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return from_flat(self.flat(), self.geo)

    @torch.no_grad()
    def fold(self) -> dict[str, torch.Tensor]:
        """The prefixes alone (the MLP evaluated once): what the adapter file keeps."""
        key, value = self()
        return {KEYS[0]: key.detach().float().cpu().contiguous(), KEYS[1]: value.detach().float().cpu().contiguous()}


@torch.no_grad()
def real_word_init(model, input_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own keys / values over the first ``length`` of ``input_ids`` (tiled when shorter)."""
    ids = input_ids.reshape(-1)
    ids = ids.repeat((length + ids.numel() - 1) // ids.numel())[:length].unsqueeze(0)
    out = model(input_ids=ids.to(model.device), use_cache=True)
    cache = out["cache"] if "cache" in out else out.past_key_values  # (transformers 5 renamed it)
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float()  # (L, H, P, d)
    values = torch.stack([layer.values[0] for layer in cache.layers]).float()
    return keys, values


class Installed:
    """A prefix fed to every forward of ``model`` (training, evaluation and ``generate`` alike).

    A forward pre-hook on the causal LM: when no cache is filled yet it passes one holding the
    prefix, puts P ones in front of a 2-D attention mask, and shifts given position ids by P
    (``generate`` counts positions from the mask, which knows nothing of the prefix), so a
    continuation decoded step by step sees the same positions as one full forward.
    ``source`` returns key, value (L, H, P, d): an encoder while training, fixed tensors after.
    """

    def __init__(self, model: nn.Module, source, length: int, name: str | None = None) -> None:
        from transformers import DynamicCache

        self.model, self.source, self.length, self.name, self._cache_type = model, source, length, name, DynamicCache
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        tokens = ids if ids is not None else kwargs["inputs_embeds"]
        batch = tokens.shape[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            cache = cache if cache is not None else self._cache_type(config=module.config)
            dtype = module.get_input_embeddings().weight.dtype
            key, value = self.source()
            for layer in range(key.shape[0]):
                cache.update(key[layer].to(dtype).expand(batch, -1, -1, -1),
                             value[layer].to(dtype).expand(batch, -1, -1, -1), layer)
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise StudioError("a prefix needs a 2-D attention mask (batch, tokens)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.length), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.length
        return args, kwargs


def installed_length(model: nn.Module) -> int:
    """Virtual tokens a model's installed prefix takes from its context (0 without one)."""
    prefix = getattr(model, "_studio_prefix", None)
    return prefix.length if prefix is not None else 0


def install(model: nn.Module, source, length: int, name: str | None = None) -> Installed:
    """Feed a prefix to ``model`` (one at a time); ``uninstall`` takes it off."""
    if getattr(model, "_studio_prefix", None) is not None:
        raise StudioError("the model already has a prefix: use one prefix adapter at a time")
    installed = Installed(model, source, length, name)
    object.__setattr__(model, "_studio_prefix", installed)  # not a submodule: its tensors are no model weights
    return installed


def context(config) -> int:
    """The model's context in tokens (Llama family / GPT-2 names)."""
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0))


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """A saved prefix (``prefix.key`` / ``prefix.value``) fits ``model``, which has none yet."""
    check(tensors[KEYS[0]], tensors[KEYS[1]], geometry(model.config), context(model.config), where)
    if installed_length(model):
        raise StudioError(f"{where} brings a prefix but the model has one already: use one prefix adapter at a time")


def install_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, name: str | None = None) -> Installed:
    """Install a saved prefix, checked against the model first."""
    check_tensors(model, tensors, where)
    device = model.get_input_embeddings().weight.device
    key, value = tensors[KEYS[0]].to(device), tensors[KEYS[1]].to(device)
    return install(model, lambda: (key, value), int(key.shape[2]), name)


def installed_name(model: nn.Module) -> str | None:
    prefix = getattr(model, "_studio_prefix", None)
    return prefix.name if prefix is not None else None


def uninstall(model: nn.Module) -> None:
    installed = getattr(model, "_studio_prefix", None)
    if installed is not None:
        installed.remove()
        object.__setattr__(model, "_studio_prefix", None)


def for_training(model: nn.Module, length: int, projection: int | None, init_ids: torch.Tensor) -> PrefixEncoder:
    """A fresh trainable prefix installed on ``model`` (initialised from ``init_ids``' activations
    when trained directly; the MLP starts from PEFT's init). Call it with the base still pristine
    (a zero-init layer adapter is fine): the real-word keys / values are the base's own."""
    geo = geometry(model.config)
    was_training = model.training
    model.eval()
    try:
        init = None if projection else real_word_init(model, init_ids, length)
    finally:
        model.train(was_training)
    encoder = PrefixEncoder(geo, length, projection, init).to(model.get_input_embeddings().weight.device)
    install(model, encoder, length)
    return encoder


def check_length(length: int, context: int) -> int:
    """``length`` virtual tokens leave room for at least one real token in a ``context``-token model."""
    if length >= context:
        raise StudioError(f"a prefix of {length} virtual tokens does not fit the model's context of {context} "
                          f"tokens (the prefix takes its positions): use --prefix-length / --with-prefix below {context}")
    return length
