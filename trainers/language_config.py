"""LMTrainConfig: every option of ``studio train --task lm`` (flags and TOML fill this one dataclass).

The adapter and run sections are shared with the image trainer (``trainers/spec.py``); this
class re-declares the run defaults that suit a causal LM (a cosine schedule with warmup, a
larger batch of short examples) and adds what only text has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from studio.adapters import registry
from studio.errors import StudioError
from trainers.spec import TrainSpec

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "sample_data" / "text"
DEFAULT_DATA = SAMPLE_TEXT / "pirate-train.jsonl"
"""The sample task (pirate answers) trains when no data file is given."""

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

    DEFAULT_STEPS: ClassVar[int] = 200
    BASE_NAME: ClassVar[str] = "mini-lm"

    def __post_init__(self) -> None:
        if not self.data:
            raise StudioError("no data given: studio train --task lm FILE (.txt, or .jsonl of prompt/response lines)")
        self.check_run("lm")
        parts = self.target_list
        if not parts or not set(parts) <= set(LM_TARGETS):
            raise StudioError(f"--targets {self.targets!r}: language models take lm-attn, lm-mlp or lm-attn,lm-mlp")
        self.check_adapter((), parts)
        if self.block_size is not None and self.block_size <= 1:
            raise StudioError(f"--block-size must be > 1, got {self.block_size}")

    @property
    def dataset_name(self) -> str:
        return Path(self.data).expanduser().stem or "text"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else registry.default_lr(self.method, "lm")
