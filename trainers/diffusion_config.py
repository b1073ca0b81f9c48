"""DiffusionTrainConfig: every option of ``studio train`` (flags and TOML fill this one dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

METHOD_LR = {"lora": 1e-3, "pissa": 1e-3, "milora": 1e-3, "svf": 2e-2}
"""Default UNet learning rate per method (SVF's gains need larger steps)."""

UNET_TARGETS = ("unet-attn", "unet-transformer")
"""The UNet target presets of ``studio.adapters.targets``; the default is kohya's (unet-transformer)."""

DEFAULT_STEPS = 1200
"""Steps when neither --steps nor --epochs is given (kohya users train 1000-2000): with min-SNR
gamma 1 the stripes style is still gaining at 600 and 900 steps (0.75, 0.81 of 64 generations)
and reaches 0.84 at 1200, in about 5 minutes on 2 CPU cores (benchmarks/methods.py, style_demo.py)."""


@dataclass(frozen=True)
class DiffusionTrainConfig:
    data: str = ""
    """Folder of images with same-name .txt captions (kohya <repeats>_<name> sub-folders too)."""
    base: str | None = None
    """Diffusers folder, hub id or single-file .safetensors; None = the embedded mini base."""
    out: str | None = None
    """Output folder; default outputs/<dataset>-<method>."""
    name: str | None = None
    """Adapter name (file DIR/<name>.safetensors); default: the dataset folder's name."""
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
    targets: str = "unet-transformer"
    """unet-attn (attention), unet-transformer (kohya's set: + feed-forward, proj_in/out), te-attn; comma-joined."""
    unet_lr: float | None = None
    """UNet adapter learning rate; None = the method's default."""
    te_lr: float | None = None
    """Text-encoder adapter learning rate; None = unet_lr / 2."""
    steps: int | None = None
    """Optimizer steps; None = from epochs, or DEFAULT_STEPS when neither is given."""
    epochs: int | None = None
    """Passes over the data (with repeats), when steps is not given."""
    batch_size: int = 4
    """Images per optimizer step on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    resolution: int | None = None
    """Training resolution in pixels; None = the base's native size."""
    seed: int = 0
    """Seed of everything random: init, data order, noise, augmentation."""
    trigger: str | None = None
    """Word prepended to captions that lack it."""
    caption_dropout: float = 0.0
    """Probability of training on an empty caption (keeps CFG working)."""
    shuffle_captions: bool = False
    """Shuffle comma-separated tags, keeping the first keep_tokens in place."""
    keep_tokens: int = 1
    """Leading tags never shuffled (the trigger usually)."""
    flip: bool = False
    """Random horizontal flip (cached both ways when latents are cached)."""
    buckets: bool = True
    """Aspect-ratio buckets; False = centre-crop everything to a square."""
    reg_data: str | None = None
    """Class / regularisation images (prior preservation), captioned like the data."""
    prior_loss_weight: float = 1.0
    """Weight of the regularisation images' loss."""
    cache_latents: bool = True
    """Encode images once, cached on disk by file hash + base + size."""
    cache_text: bool = True
    """Cache text-encoder outputs while the text encoder is not trained."""
    cache_dir: str | None = None
    """Cache folder; default ~/.cache/studio."""
    noise_offset: float = 0.0
    """Offset noise strength (darker darks / brighter brights)."""
    min_snr_gamma: float | None = 1.0
    """Min-SNR loss weighting gamma; None disables it. 1, not the paper's 5: it gives more weight
    to the noisy timesteps, where a style's layout is decided, and the stripes style on the mini
    base is learned faster (64 generations after 600 steps: 0.61 without min-SNR, 0.72 at 5, 0.77 at 1 and 0.5;
    benchmarks/style_demo.py's detector with its earlier 3-pixel closing)."""
    prediction_type: str | None = None
    """epsilon or v_prediction; None = the base scheduler's."""
    lr_schedule: str = "constant"
    """constant | cosine | linear (diffusers.optimization)."""
    warmup_steps: int = 0
    """Linear LR warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (accelerate); fp32 on CPU."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    save_adapter_every: int = 0
    """Also write DIR/<name>-step<N>.safetensors every N steps (kohya's save_every_n_steps); 0 = off."""
    sample_every: int = 100
    """Render the sample grid every N steps (and at the end); 0 = only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grid; default: four captions of the dataset."""
    sample_steps: int = 20
    """Denoising steps of sample images."""
    sample_cfg: float = 4.0
    """Classifier-free guidance of sample images."""

    def __post_init__(self) -> None:
        from studio.adapters import METHODS

        if not self.data:
            raise StudioError("no dataset given: studio train DATA_DIR (a folder of images with .txt captions)")
        if self.method not in METHODS:
            raise StudioError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        checks = [(self.rank > 0, f"--rank must be positive, got {self.rank}: use e.g. --rank 8"),
                  (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
                  (self.grad_accum > 0, f"grad_accum must be positive, got {self.grad_accum}"),
                  (self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}"),
                  (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
                  (0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
                  (self.save_every > 0, f"save_every must be positive, got {self.save_every}"),
                  (self.save_adapter_every >= 0, f"save_adapter_every must be >= 0, got {self.save_adapter_every}"),
                  (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16"),
                  (self.prediction_type in (None, "epsilon", "v_prediction"),
                   f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)
        parts = [t.strip() for t in self.targets.split(",")]
        if not set(parts) <= {*UNET_TARGETS, "te-attn"} or len(set(parts) & set(UNET_TARGETS)) > 1:
            raise StudioError(f"--targets {self.targets!r}: use unet-attn or unet-transformer, te-attn, "
                              "or one UNet set plus te-attn, e.g. unet-attn,te-attn")

    @property
    def dataset_name(self) -> str:
        return Path(self.data).expanduser().resolve().name or "dataset"

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("outputs") / f"{self.dataset_name}-{self.method}"

    @property
    def adapter_name(self) -> str:
        return self.name or self.dataset_name

    @property
    def lr_unet(self) -> float:
        return self.unet_lr if self.unet_lr is not None else METHOD_LR[self.method]

    @property
    def lr_te(self) -> float:
        return self.te_lr if self.te_lr is not None else self.lr_unet / 2

    @property
    def train_te(self) -> bool:
        return "te-attn" in self.targets

    @property
    def unet_targets(self) -> str | None:
        """The UNet preset to adapt, or None when only the text encoder trains."""
        return next((t.strip() for t in self.targets.split(",") if t.strip() in UNET_TARGETS), None)

    @property
    def train_unet(self) -> bool:
        return self.unet_targets is not None

    def method_config(self):
        from studio.adapters import make_config

        fields = {"lora": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout),
                  "pissa": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout,
                                svd=self.svd),
                  "milora": dict(rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout),
                  "svf": {}}[self.method]
        return make_config(self.method, fields)
