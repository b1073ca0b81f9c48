"""LMTrainConfig: every option of ``studio train --task lm`` (flags and TOML fill this one dataclass).

The adapter and run sections are shared with the image trainer (``trainers/spec.py``); this
class re-declares the run defaults that suit a causal LM (a cosine schedule with warmup, a
larger batch of short examples) and adds what only text has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from studio import prompt
from studio.adapters import registry
from studio.errors import StudioError
from trainers.spec import TrainSpec

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "sample_data" / "text"
DEFAULT_DATA = SAMPLE_TEXT / "pirate-train.jsonl"
"""The sample task (pirate answers) trains when no data file is given."""

DEFAULT_PREFIX = 16
"""Virtual tokens of --method prefix when --prefix-length is not given."""
PREFIX_LR = 3e-3
"""The prefix's default learning rate: on the mini LM's pirate task (README) 3e-3 was the best of 1e-3 .. 1e-2
through the MLP, and the highest a directly trained prefix takes without losing the base's facts."""

LM_TARGETS = ("lm-attn", "lm-mlp")
"""The target presets of ``studio.adapters.targets`` for causal LMs."""


@dataclass(frozen=True)
class LMTrainConfig(TrainSpec):
    task: str = "lm"
    """image | lm: the trainer this config is for (`studio train --task`)."""
    data: str = str(DEFAULT_DATA)
    """A plain-text file (packed into blocks) or an instruction .jsonl of {"prompt", "response"} lines."""
    base: str | None = None
    """transformers causal-LM folder or hub id; None = the embedded mini LM (sample_data/mini-lm)."""
    targets: str = "lm-attn,lm-mlp"
    """lm-attn (q/k/v/o; GPT-2 c_attn, c_proj), lm-mlp (gate/up/down; GPT-2 c_fc, c_proj), or both comma-joined."""
    # the run section's defaults for a causal LM: short examples, a cosine schedule with warmup
    batch_size: int = 8
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    save_every: int = 50
    sample_every: int = 0
    """Log a greedy answer to each sample prompt every N steps; 0 = only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the text samples; default: the first two prompts of the data (or its first line)."""
    lr: float | None = None
    """Adapter learning rate; None = the method's default."""
    block_size: int | None = None
    """Tokens per packed block of plain text; None = the model's context."""
    sample_tokens: int = 32
    """New tokens per text sample."""
    prefix_length: int | None = None
    """--method prefix: virtual tokens per layer (Li & Liang's prefix length); None = 16."""
    with_prefix: int | None = None
    """LoRA + prefix: train a prefix of this many virtual tokens together with the layer adapter."""
    prefix_projection: int | None = None
    """Train the prefix through an MLP of this hidden width (Li & Liang's reparametrisation, PEFT's
    encoder_hidden_size), folded into the prefixes in the file; None = train the prefixes directly."""
    prefix_lr: float | None = None
    """Learning rate of the prefix; None = --lr with --method prefix, else 3e-3."""

    DEFAULT_STEPS: ClassVar[int] = 200
    BASE_NAME: ClassVar[str] = "mini-lm"

    def __post_init__(self) -> None:
        if not self.data:
            raise StudioError("no data given: studio train --task lm FILE (.txt, or .jsonl of prompt/response lines)")
        self.check_run("lm")
        parts = self.target_list
        if not parts or not set(parts) <= set(LM_TARGETS):
            raise StudioError(f"--targets {self.targets!r}: language models take lm-attn, lm-mlp or lm-attn,lm-mlp")
        if self.layer_method is not None:
            self.check_adapter((), parts)
        self._check_prefix()
        if self.block_size is not None and self.block_size <= 1:
            raise StudioError(f"--block-size must be > 1, got {self.block_size}")

    @property
    def dataset_name(self) -> str:
        return Path(self.data).expanduser().stem or "text"

    def _check_prefix(self) -> None:
        """The prefix flags (studio/prompt/prefix.py); the context check needs the model (train)."""
        entry = prompt.METHODS.get(self.method)
        if entry is not None and entry.task != "lm":
            raise StudioError(f"--method {self.method} trains on the image task: drop --task lm")
        if entry is not None and self.with_prefix is not None:
            raise StudioError(f"--with-prefix adds a prefix to a layer adapter; --method {self.method} is one "
                              f"already: give its length with --prefix-length {self.with_prefix}")
        if entry is None and self.prefix_length is not None:
            raise StudioError(f"--prefix-length is the length of --method prefix; to train a prefix with "
                              f"--method {self.method} use --with-prefix {self.prefix_length}")
        for flag, value in (("--prefix-length", self.prefix_length), ("--with-prefix", self.with_prefix),
                            ("--prefix-projection", self.prefix_projection)):
            if value is not None and value <= 0:
                raise StudioError(f"{flag} must be positive, got {value}: use e.g. {flag} 16")
        if not self.prefix_tokens and (self.prefix_projection is not None or self.prefix_lr is not None):
            raise StudioError("--prefix-projection / --prefix-lr set but no prefix trains: add --with-prefix N or "
                              "use --method prefix")
        if self.prefix_tokens and (self.ema_decay is not None or self.relora_every is not None):
            raise StudioError("--ema-decay / --relora-every act on the layer adapter only, not on a prefix: drop "
                              "them, or train without a prefix")
        if self.prefix_tokens and self.gradient_checkpointing:
            raise StudioError("--gradient-checkpointing re-runs each layer in the backward pass, which would add the "
                              "prefix to the key/value cache a second time: drop it when training a prefix")
        if self.layer_method is None and self.loraplus_ratio is not None:
            raise StudioError("--loraplus-ratio scales LoRA's up factors; a prefix has none: drop it")

    @property
    def layer_method(self) -> str | None:
        """The layer adapter of the run (studio.adapters), None when only a prompt-side method trains."""
        return None if self.method in prompt.METHODS else self.method

    @property
    def prefix_tokens(self) -> int:
        """Virtual tokens of the run's prefix (0: no prefix)."""
        if self.layer_method is None:
            return self.prefix_length or DEFAULT_PREFIX
        return self.with_prefix or 0

    @property
    def prefix_learning_rate(self) -> float:
        if self.prefix_lr is not None:
            return self.prefix_lr
        return self.lr if self.layer_method is None and self.lr is not None else PREFIX_LR

    @property
    def learning_rate(self) -> float:
        if self.layer_method is None:
            return self.prefix_learning_rate
        return self.lr if self.lr is not None else registry.default_lr(self.method, "lm")

    @property
    def identity(self) -> dict:
        prefix = {"prefix": self.prefix_tokens, "prefix_projection": self.prefix_projection} if self.prefix_tokens else {}
        return {**super().identity, **prefix}  # (runs without a prefix keep the identity they always had)
