"""LMTrainConfig: every option of ``studio train --task lm`` (flags and TOML fill this one dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "sample_data" / "text"
DEFAULT_DATA = SAMPLE_TEXT / "pirate-train.jsonl"
"""The sample task (pirate answers) trains when no data file is given."""

METHOD_LR = {"lora": 2e-3, "pissa": 1e-3, "milora": 2e-3, "svf": 1e-1}
"""Default learning rate per method. PiSSA moves the principal directions, so it takes half of LoRA's
step. SVF's gains need much larger steps: on the mini LM's pirate task 2e-2 needed 400 steps for what
1e-1 reaches in 200, and 5e-2 x 120 steps broke the facts before the format (benchmarks/lm_task.py)."""

LM_TARGETS = ("lm-attn", "lm-mlp")
"""The target presets of ``studio.adapters.targets`` for causal LMs."""


@dataclass(frozen=True)
class LMTrainConfig:
    data: str = str(DEFAULT_DATA)
    """A plain-text file (packed into blocks) or an instruction .jsonl of {"prompt", "response"} lines."""
    base: str | None = None
    """transformers causal-LM folder or hub id; None = the embedded mini LM (sample_data/mini-lm)."""
    out: str | None = None
    """Output folder; default outputs/<data file stem>-<method>."""
    name: str | None = None
    """Adapter name (file DIR/<name>.safetensors); default: the data file's stem."""
    method: str = "lora"
    """lora | pissa | milora | svf."""
    rank: int = 8
    """Rank of lora / pissa / milora (ignored by svf)."""
    alpha: float | None = None
    """LoRA alpha; None = rank (scale 1)."""
    rslora: bool = False
    """alpha / sqrt(rank) scaling."""
    dropout: float = 0.0
    """Adapter input dropout."""
    svd: str = "fast"
    """PiSSA init SVD: fast (randomized) or exact."""
    targets: str = "lm-attn,lm-mlp"
    """lm-attn (q/k/v/o; GPT-2 c_attn, c_proj), lm-mlp (gate/up/down; GPT-2 c_fc, c_proj), or both comma-joined."""
    lr: float | None = None
    """Adapter learning rate; None = the method's default."""
    steps: int | None = None
    """Optimizer steps; None = from epochs, or 200 when neither is given."""
    epochs: int | None = None
    """Passes over the examples, when steps is not given."""
    batch_size: int = 8
    """Examples (or packed blocks) per optimizer step on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    block_size: int | None = None
    """Tokens per packed block of plain text; None = the model's context."""
    seed: int = 0
    """Seed of everything random: init, data order, dropout."""
    lr_schedule: str = "cosine"
    """constant | cosine | linear."""
    warmup_steps: int = 10
    """Linear LR warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (accelerate); fp32 on CPU."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    sample_every: int = 0
    """Log a greedy answer to each sample prompt every N steps (0: at the end only)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the text samples; default: the first two prompts of the data (or its first line)."""
    sample_tokens: int = 32
    """New tokens per text sample."""

    def __post_init__(self) -> None:
        from studio.adapters import METHODS

        if not self.data:
            raise StudioError("no data given: studio train --task lm FILE (.txt, or .jsonl of prompt/response lines)")
        if self.method not in METHODS:
            raise StudioError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        checks = [(self.rank > 0, f"--rank must be positive, got {self.rank}: use e.g. --rank 8"),
                  (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
                  (self.grad_accum > 0, f"grad_accum must be positive, got {self.grad_accum}"),
                  (self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}"),
                  (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
                  (self.block_size is None or self.block_size > 1, f"--block-size must be > 1, got {self.block_size}"),
                  (self.save_every > 0, f"save_every must be positive, got {self.save_every}"),
                  (self.sample_every >= 0, f"sample_every must be >= 0, got {self.sample_every}"),
                  (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)
        parts = [t.strip() for t in self.targets.split(",")]
        if not parts or not set(parts) <= set(LM_TARGETS):
            raise StudioError(f"--targets {self.targets!r}: language models take lm-attn, lm-mlp or lm-attn,lm-mlp")

    @property
    def dataset_name(self) -> str:
        return Path(self.data).expanduser().stem or "text"

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("outputs") / f"{self.dataset_name}-{self.method}"

    @property
    def adapter_name(self) -> str:
        return self.name or self.dataset_name

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else METHOD_LR[self.method]

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",")]

    def method_config(self):
        from studio.adapters import make_config

        fields = {"lora": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout),
                  "pissa": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout,
                                svd=self.svd),
                  "milora": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout),
                  "svf": {}}[self.method]
        return make_config(self.method, fields)
