"""The two sections every trainer config shares: the adapter (method and its options) and the run.

``DiffusionTrainConfig`` and ``LMTrainConfig`` are both ``AdapterSpec`` + ``RunSpec`` + their
task's own fields, so a key means the same in both, is checked once, and its ``studio train``
flag and help come from the one field and its docstring (``trainers/commands.py``). The keys
stay flat (``rank = 8``, ``steps = 900``) in TOML, ``--set`` and saved ``config.toml`` files;
only the method-specific options form a table, ``method_args = {svd = "exact"}``.

A task that wants another default re-declares the field in its own class (the LM trainer's
cosine schedule); everything about methods -- their names, options, default learning rates --
comes from ``studio.adapters.registry``, so nothing here names a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from studio.adapters import registry
from studio.errors import StudioError
from trainers.loop import SCHEDULES


@dataclass(frozen=True)
class AdapterSpec:
    method: str = "lora"
    """Adapter method: one of studio/adapters/registry.py (listed by `studio train --help`)."""
    rank: int = 8
    """Rank of the methods that have one (ignored by the others)."""
    alpha: float | None = None
    """LoRA alpha; None = rank (scale 1)."""
    rslora: bool = False
    """alpha / sqrt(rank) scaling (rsLoRA)."""
    dropout: float = 0.0
    """Adapter input dropout while training."""
    conv_rank: int | None = None
    """LoCon rank of the k x k convolutions of a conv preset (targets unet-full); None = rank."""
    conv_alpha: float | None = None
    """LoCon alpha of the k x k convolutions; None = conv_rank."""
    method_args: dict = field(default_factory=dict)
    """Options of the method itself, e.g. svd=exact for pissa (an unknown one is refused by name)."""

    LEGACY_KEYS: ClassVar[dict] = {"svd": str}
    """Flat keys of configs written before method_args: every run stored PiSSA's ``svd``."""

    @classmethod
    def upgrade_legacy(cls, values: dict) -> dict:
        """Read a legacy ``svd`` key as a method option when the method has it; old files wrote it
        for every method, so for the others it meant nothing and is dropped. An explicit
        ``method_args`` entry wins."""
        values = dict(values)
        old = values.pop("svd", None)
        method = values.get("method", cls.method)
        if old is not None and method in registry.METHODS and "svd" in registry.option_names(method):
            values["method_args"] = {"svd": old, **values.get("method_args", {})}
        return values

    def check_adapter(self, conv_presets: tuple[str, ...], targets: list[str]) -> None:
        """Everything about the adapter a user can get wrong, refused before anything runs."""
        registry.get(self.method)  # unknown method: the registry's error lists the choices
        if self.rank <= 0:
            raise StudioError(f"--rank must be positive, got {self.rank}: use e.g. --rank 8")
        if (self.conv_rank is not None or self.conv_alpha is not None) and not set(conv_presets) & set(targets):
            fix = (f"add {' or '.join(conv_presets)} to --targets" if conv_presets
                   else "this task has no convolution preset: drop them")
            raise StudioError(f"--conv-rank / --conv-alpha adapt k x k convolutions, which --targets "
                              f"{','.join(targets)!r} does not include: {fix}")
        self.method_config()  # the method's own checks (and unknown --method-args) fail here, not mid-run

    @property
    def generic_options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "dropout": self.dropout,
                "conv_rank": self.conv_rank, "conv_alpha": self.conv_alpha}

    def method_config(self):
        """The method's frozen Config: the generic options it has, plus method_args."""
        return registry.config_from_options(self.method, self.generic_options, self.method_args)


@dataclass(frozen=True)
class RunSpec:
    task: str = "image"
    """image | lm: the trainer this config is for (`studio train --task`)."""
    out: str | None = None
    """Output folder; default outputs/<dataset>-<method>."""
    name: str | None = None
    """Adapter name (file DIR/<name>.safetensors); default: the dataset's name."""
    steps: int | None = None
    """Optimizer steps; None = from epochs, or 1200 (--task lm: 200) when neither is given."""
    epochs: int | None = None
    """Passes over the data (with repeats), when steps is not given."""
    batch_size: int = 4
    """Images (--task lm: examples or packed blocks) per optimizer step on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed of everything random: init, data order, noise, dropout, augmentation."""
    lr_schedule: str = "constant"
    """constant | cosine | linear (diffusers.optimization)."""
    warmup_steps: int = 0
    """Linear LR warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    optimizer: str = "adamw"
    """adamw | adamw8bit | adafactor | prodigy | schedulefree (trainers/optimizers.py; the optional ones
    need pip install -e ".[gpu]")."""
    optimizer_args: dict = field(default_factory=dict)
    """Keyword arguments of the optimizer, e.g. d_coef=0.5 for prodigy (an unknown one is refused by name)."""
    loraplus_ratio: float | None = None
    """LoRA+: the up factors' (B's) learning rate is this times the down factors' (the paper's 16 for LMs);
    None = off."""
    relora_every: int | None = None
    """ReLoRA: every N steps merge the low-rank update into a frozen accumulated delta and restart the
    factors (jagged LR schedule); None = off."""
    relora_warmup: int | None = None
    """ReLoRA: linear LR re-warmup steps after each restart; None = relora_every / 10."""
    relora_prune: float = 0.99
    """ReLoRA: fraction of each optimizer moment zeroed at a restart, smallest magnitudes first (the
    paper's 0.99); 1 resets the optimizer state."""
    ema_decay: float | None = None
    """EMA of the adapter weights with this decay (e.g. 0.999), saved as DIR/<name>-ema.safetensors and
    used for samples; None = off."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (accelerate); fp32 on CPU."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    sample_every: int = 100
    """Samples every N steps (and at the end); 0 = only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the samples; default: taken from the data."""
    gradient_checkpointing: bool = False
    """Recompute the activations of each UNet / transformer block in the backward pass instead of
    keeping them (less memory, ~20-30 % more time per step; trains the same numbers)."""
    base_dtype: str = "fp32"
    """fp32 | bf16 | fp16: the dtype of the frozen base weights; adapters, their gradients and the
    optimizer state stay fp32 and the saved adapter is fp32 (bf16 is slow on CPUs without it)."""
    vram_budget: str | None = None
    """With --check: the accelerator memory the run must fit, e.g. 12GB; --check says what to turn on."""

    DEFAULT_STEPS: ClassVar[int]
    """Steps when neither steps nor epochs is given: each task sets its own."""

    def check_run(self, task: str) -> None:
        if self.task != task:
            raise StudioError(f"task = {self.task!r} given to the {task} trainer: use --task {self.task}")
        self.check_training_options()
        checks = [(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
                  (self.grad_accum > 0, f"grad_accum must be positive, got {self.grad_accum}"),
                  (self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}"),
                  (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
                  (self.lr_schedule in SCHEDULES, f"--lr-schedule {self.lr_schedule!r}: choose one of "
                                                  f"{', '.join(SCHEDULES)}"),
                  (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
                  (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got "
                                            f"{self.max_grad_norm}"),
                  (self.save_every > 0, f"--save-every must be positive, got {self.save_every}"),
                  (self.sample_every >= 0, f"--sample-every must be >= 0, got {self.sample_every}"),
                  (self.mixed_precision in ("no", "fp16", "bf16"),
                   f"--mixed-precision {self.mixed_precision!r}: use no, fp16 or bf16"),
                  (self.base_dtype in ("fp32", "bf16", "fp16"),
                   f"--base-dtype {self.base_dtype!r}: use fp32, bf16 or fp16")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)
        if self.vram_budget is not None:
            from trainers.memory import parse_size
            parse_size(self.vram_budget)  # a budget that is not a size fails here, not after loading

    def check_training_options(self) -> None:
        """The optimizer, LoRA+, ReLoRA and EMA options (trainers/optimizers.py, relora.py, ema.py)."""
        from trainers import optimizers

        optimizers.check(self.optimizer, self.optimizer_args, self.lr_schedule)
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise StudioError(f"--loraplus-ratio must be > 0, got {self.loraplus_ratio}: use e.g. --loraplus-ratio 16, "
                              f"or leave it out for plain LoRA learning rates")
        if self.loraplus_ratio is not None and optimizers.get(self.optimizer).lr_multiplier is not None:
            raise StudioError(f"--optimizer {self.optimizer} takes one learning rate for all parameters, so LoRA+'s "
                              f"--loraplus-ratio cannot apply: use --optimizer adamw with it, or leave it out")
        if self.relora_every is not None:
            checks = [(self.relora_every > 0, f"--relora-every must be positive, got {self.relora_every}"),
                      (self.relora_warmup is None or 0 < self.relora_warmup <= self.relora_every,
                       f"--relora-warmup must be in 1..--relora-every ({self.relora_every}), got {self.relora_warmup}"),
                      (0 <= self.relora_prune <= 1, f"--relora-prune must be in [0, 1], got {self.relora_prune}"),
                      (self.ema_decay is None, "--ema-decay averages weights across steps, which a ReLoRA restart "
                                               "re-initialises: use one of --ema-decay and --relora-every"),
                      (not optimizers.get(self.optimizer).schedule_free,
                       f"--relora-every restarts the factors, which --optimizer {self.optimizer}'s averaged "
                       f"weights would mix with the old ones: use --optimizer adamw")]
            for ok, message in checks:
                if not ok:
                    raise StudioError(message)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise StudioError(f"--ema-decay must be in (0, 1), got {self.ema_decay}: use e.g. --ema-decay 0.999")
        method = getattr(self, "method", None)  # the adapter section of the same config
        if method in registry.METHODS and (self.loraplus_ratio is not None or self.relora_every is not None):
            from trainers import relora

            if self.loraplus_ratio is not None:
                optimizers.check_loraplus(method, self.method_config())
            if self.relora_every is not None:
                relora.check_method(method, self.dropout)
                if self.steps is not None or self.epochs is None:
                    relora.check_steps(self.relora_every, self.steps or self.DEFAULT_STEPS)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps or (self.epochs * steps_per_epoch if self.epochs else self.DEFAULT_STEPS)


@dataclass(frozen=True)
class TrainSpec(AdapterSpec, RunSpec):
    """Both sections and what every trainer has besides: its data, its base and its targets
    (each task re-declares these three with its own docstring and default)."""

    data: str = ""
    """The training data."""
    base: str | None = None
    """The base model; None = the embedded mini model."""
    targets: str = ""
    """Target presets, comma-joined."""

    BASE_NAME: ClassVar[str] = "mini"
    """The name of the embedded base (``base = None``) in checkpoints and file metadata."""

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def dataset_name(self) -> str:
        raise NotImplementedError  # each task names its data (a folder's name, a file's stem)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("outputs") / f"{self.dataset_name}-{self.method}"

    @property
    def adapter_name(self) -> str:
        return self.name or self.dataset_name

    @property
    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint it continues (loop.check_identity):
        anything that changes the adapter's tensors or their shapes."""
        return {"method": self.method, "base": self.base or self.BASE_NAME, "targets": self.targets,
                "rank": self.rank, "conv_rank": self.conv_rank, "method_args": dict(self.method_args),
                # the optimizer state's layout and the extra training state depend on these
                "optimizer": self.optimizer, "loraplus_ratio": self.loraplus_ratio, "relora_every": self.relora_every,
                "ema_decay": self.ema_decay}
