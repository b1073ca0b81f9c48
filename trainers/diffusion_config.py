"""DiffusionTrainConfig: every option of ``studio train`` (flags and TOML fill this one dataclass).

The adapter and run sections are shared with the language-model trainer (``trainers/spec.py``);
what follows is what only images have: the dataset's augmentation, caches, the diffusion loss,
per-part learning rates and the sample grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from studio.adapters import registry
from studio.errors import StudioError
from trainers.spec import TrainSpec
from trainers.timesteps import TimestepSampling

UNET_TARGETS = ("unet-attn", "unet-transformer", "unet-full")
"""The UNet target presets of ``studio.adapters.targets``; the default is kohya's (unet-transformer)."""
CONV_TARGETS = ("unet-full",)
"""The presets with k x k convolutions (kohya's LoCon set), the only ones --conv-rank applies to."""

DEFAULT_STEPS = 1200
"""Steps when neither --steps nor --epochs is given (kohya users train 1000-2000): with min-SNR
gamma 1 the stripes style is still gaining at 600 and 900 steps (0.75, 0.81 of 64 generations)
and reaches 0.84 at 1200, in about 5 minutes on 2 CPU cores (benchmarks/methods.py, style_demo.py)."""


@dataclass(frozen=True)
class DiffusionTrainConfig(TrainSpec):
    data: str = ""
    """Folder of images with same-name .txt captions (kohya <repeats>_<name> sub-folders too)."""
    base: str | None = None
    """Diffusers folder, hub id or single-file .safetensors; None = the embedded mini base."""
    targets: str = "unet-transformer"
    """unet-transformer (kohya's set: attention, feed-forward, proj_in/out), unet-attn (attention only) or
    unet-full (kohya's LoCon set: + ResNet and sampler convs); te-attn; one UNet set at most, comma-joined."""
    sample_every: int = 100
    """Render the sample grid every N steps (and at the end); 0 = only at the end."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grid; default: four captions of the dataset."""
    unet_lr: float | None = None
    """UNet adapter learning rate; None = the method's default."""
    te_lr: float | None = None
    """Text-encoder adapter learning rate; None = unet_lr / 2."""
    resolution: int | None = None
    """Training resolution in pixels; None = the base's native size."""
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
    """Aspect-ratio buckets; off = centre-crop everything to a square."""
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
    save_adapter_every: int = 0
    """Also write DIR/<name>-step<N>.safetensors every N steps (kohya's save_every_n_steps); 0 = off."""
    val_data: str | None = None
    """Folder of held-out images, captioned like the data, scored for the validation loss (trainers/validation.py)."""
    val_split: float = 0.0
    """Fraction of the data's images held out (picked by the seed) for the validation loss; 0 = none."""
    val_every: int = 100
    """Validation loss every N steps (and at the end), to TensorBoard and OUT/losses.jsonl; 0 = only at the end."""
    keep_best: bool = False
    """Also write DIR/<name>-best.safetensors: the adapter at the lowest validation loss."""
    timestep_sampling: str = "uniform"
    """Noise levels training sees: uniform, logit-normal (SD3) or shift (logit-normal then SD3's shift); trainers/timesteps.py."""
    timestep_mean: float = 0.0
    """Mean of the logit-normal draw (logit-normal, shift); > 0 favours noisier timesteps."""
    timestep_std: float = 1.0
    """Standard deviation of the logit-normal draw (logit-normal, shift)."""
    timestep_shift: float = 3.0
    """Shift s of --timestep-sampling shift: u -> s u / (1 + (s - 1) u); > 1 favours noisier timesteps."""
    sample_steps: int = 20
    """Denoising steps of sample images."""
    sample_cfg: float = 4.0
    """Classifier-free guidance of sample images."""
    block_ranks: str | None = None
    """Rank per kohya UNet block, comma-separated (SD1.5 and the mini base: 25 = IN00-11, MID, OUT00-11;
    SDXL: 23); 0 = no adapter in that block (kohya's block_dims). None = --rank everywhere."""
    block_lrs: str | None = None
    """--unet-lr multiplier per kohya UNet block, comma-separated like --block-ranks; 0 = the block is
    not trained (kohya's down / mid / up_lr_weight). None = 1 everywhere."""
    token: str | None = None
    """--method ti: the new word to learn, e.g. '<kbot>' (also the captions' trigger unless --trigger has it)."""
    init_word: str | None = None
    """--method ti: a one-token word close to the concept; the new vectors start from its embedding."""
    vectors: int = 1
    """--method ti: vectors of the embedding (the token expands to token, token_1, ... in prompts)."""
    ti_lr: float | None = None
    """--method ti / --with-ti: learning rate of the new embedding rows; None = 5e-3."""
    with_ti: str | None = None
    """Pivotal tuning: also train this new token's embedding beside the layer adapter, e.g. --with-ti '<kbot>'
    (with --init-word, --vectors)."""
    ti_steps: int | None = None
    """--with-ti: the embedding trains for the first N steps only, then stays fixed while the LoRA goes on (pivotal
    tuning's early stop); None = every step."""
    mixture_of: list[str] = field(default_factory=list)
    """Trained LoRA files to route between: they stay frozen as MoLoRA experts and only a router per layer trains
    on DATA (studio/adapters/compose.py); the file embeds the experts exactly. E.g. --mixture-of a.safetensors b.safetensors"""

    DEFAULT_STEPS: ClassVar[int] = DEFAULT_STEPS
    BASE_NAME: ClassVar[str] = "mini-sd"

    def __post_init__(self) -> None:
        if not self.data:
            raise StudioError("no dataset given: studio train DATA_DIR (a folder of images with .txt captions)")
        self.check_run("image")
        if self.mixture_of:
            self._check_mixture_of()
        if self.method in self._prompt_methods or self.token is not None or self.with_ti is not None:
            self._check_ti()
        if self.prompt_kind is None:  # a layer adapter (a prompt-side method trains none)
            parts = self.target_list
            if not set(parts) <= {*UNET_TARGETS, "te-attn"} or len(set(parts) & set(UNET_TARGETS)) > 1 or not parts:
                raise StudioError(f"--targets {self.targets!r}: use unet-transformer, unet-attn or unet-full, te-attn, "
                                  "or one UNet set plus te-attn, e.g. unet-attn,te-attn")
            self.check_adapter(CONV_TARGETS, parts)
            from trainers import blocks
            blocks.check(self)
        checks = [(0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
                  (self.save_adapter_every >= 0, f"save_adapter_every must be >= 0, got {self.save_adapter_every}"),
                  (self.prediction_type in (None, "epsilon", "v_prediction"),
                   f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}"),
                  (0 <= self.val_split < 1, f"--val-split must be in [0, 1), got {self.val_split}: use e.g. 0.1"),
                  (not (self.val_split and self.val_data), "--val-split and --val-data both given: hold out part "
                                                           "of the data or give a folder, not both"),
                  (self.val_every >= 0, f"--val-every must be >= 0 (0 = only at the end), got {self.val_every}"),
                  (not self.keep_best or self.validates, "--keep-best needs a validation loss: add --val-data DIR "
                                                         "or --val-split 0.1")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)
        self.timestep_sampler  # an unknown sampler or a bad option is refused here, not mid-run

    def _check_mixture_of(self) -> None:
        """--mixture-of: a MoLoRA router over the files' LoRA experts on the UNet (the files decide the layers)."""
        from studio.adapters import compose

        default = next(f.default for f in dataclasses.fields(self) if f.name == "method")
        if self.method == default:  # not chosen: a composed mixture is a MoLoRA file
            object.__setattr__(self, "method", compose.ROUTED)
        checks = [(len(self.mixture_of) >= 2, f"--mixture-of needs two or more trained adapter files to route "
                                              f"between, got {len(self.mixture_of)}: add the other expert files"),
                  (self.method == compose.ROUTED, f"--mixture-of trains a {compose.ROUTED} router over the files' "
                                                  f"LoRA experts, not --method {self.method}: drop --method"),
                  (self.targets == "unet-transformer",
                   "--mixture-of routes the layers the expert files adapt: drop --targets"),
                  (self.with_ti is None and self.relora_every is None and self.loraplus_ratio is None
                   and self.block_ranks is None and self.block_lrs is None,
                   "--mixture-of trains only the routers: drop --with-ti, --relora-every, --loraplus-ratio, "
                   "--block-ranks and --block-lrs")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)

    def _check_ti(self) -> None:
        """Textual inversion alone (--method ti) or beside a layer adapter (--with-ti, pivotal tuning)."""
        entry = self._prompt_methods.get(self.method)
        task = entry.task if entry else "image"
        alone = self.prompt_kind is not None
        checks = [(task == "image", f"--method {self.method} is for --task {task}: add --task {task}"),
                  (alone or self.token is None, f"--token {self.token!r} is for --method ti (textual inversion); "
                                                f"beside a LoRA give the token as --with-ti {self.token!r}"),
                  (not alone or self.with_ti is None, f"--with-ti trains a token beside a layer adapter: with --method "
                                                      f"ti give the token as --token {self.with_ti!r}"),
                  (bool(self.ti_token), "--method ti needs the new word: add --token '<kbot>'"),
                  (bool(self.init_word), "textual inversion needs a start: add --init-word WORD (one token close to "
                                         "the concept, e.g. robot)"),
                  (self.ti_steps is None or self.ti_steps > 0, f"--ti-steps must be positive, got {self.ti_steps}"),
                  (not alone or self.ti_steps is None, "--ti-steps stops the embedding early beside a LoRA "
                                                       "(--with-ti); with --method ti give --steps"),
                  (self.vectors >= 1, f"--vectors {self.vectors}: an embedding needs at least one vector, e.g. "
                                      f"--vectors 2"),
                  (not alone or (self.relora_every is None and self.loraplus_ratio is None),
                   "--relora-every / --loraplus-ratio act on LoRA factors, which --method ti has none of: drop them"),
                  (not self.trigger or (self.ti_token or "") in self.trigger,
                   f"--trigger {self.trigger!r} lacks the token {self.ti_token!r}: captions must contain the token to "
                   f"train it; drop --trigger or include the token")]
        for ok, message in checks:
            if not ok:
                raise StudioError(message)
        if not self.trigger:  # every caption carries the token (construction, not a change mid-run)
            object.__setattr__(self, "trigger", self.ti_token)

    @property
    def _prompt_methods(self) -> dict:
        from studio import prompt
        return prompt.METHODS

    @property
    def prompt_kind(self):
        """The prompt-side module of --method (textual inversion), or None for a layer method."""
        from studio import prompt
        return prompt.kind(self.method)

    @property
    def ti_module(self):
        """studio.prompt.ti when this run trains a token (--method ti, or --with-ti beside a LoRA), else None."""
        if self.with_ti is None:
            return self.prompt_kind
        from studio.prompt import ti
        return ti

    @property
    def ti_token(self) -> str | None:
        return self.with_ti if self.with_ti is not None else self.token

    @property
    def text_frozen(self) -> bool:
        """Whether the text encoders' outputs stay the same all run (their cache is valid)."""
        return not self.train_te and self.ti_module is None

    @property
    def adapter_name(self) -> str:
        """An embedding's file is named after its token (A1111 and ComfyUI use the file name)."""
        if self.name or self.prompt_kind is None:
            return super().adapter_name
        return self.ti_file_stem

    @property
    def ti_file_stem(self) -> str:
        """The token as a file name ('<kbot>' -> 'kbot'): what A1111 / ComfyUI prompts then write."""
        return "".join(c for c in self.ti_token if c.isalnum() or c in "-_") or "embedding"

    @property
    def validates(self) -> bool:
        return bool(self.val_data or self.val_split)

    @property
    def timestep_sampler(self) -> TimestepSampling:
        return TimestepSampling(self.timestep_sampling, self.timestep_mean, self.timestep_std, self.timestep_shift)

    @property
    def dataset_name(self) -> str:
        return Path(self.data).expanduser().resolve().name or "dataset"

    @property
    def identity(self) -> dict:
        return {**super().identity, "block_ranks": self.block_ranks, "block_lrs": self.block_lrs,
                **({"token": self.ti_token, "vectors": self.vectors} if self.ti_module else {}),
                **({"mixture_of": list(self.mixture_of)} if self.mixture_of else {})}

    @property
    def lr_unet(self) -> float:
        if self.unet_lr is not None or self.prompt_kind is not None:
            return self.unet_lr
        return registry.default_lr(self.method, "image")

    @property
    def lr_ti(self) -> float:
        return self.ti_lr if self.ti_lr is not None else self.ti_module.DEFAULT_LR

    @property
    def lr_te(self) -> float:
        return self.te_lr if self.te_lr is not None else self.lr_unet / 2

    @property
    def train_te(self) -> bool:
        return "te-attn" in self.target_list and self.prompt_kind is None

    @property
    def unet_targets(self) -> str | None:
        """The UNet preset to adapt, or None when only the text encoder trains."""
        if self.prompt_kind is not None:
            return None
        return next((t for t in self.target_list if t in UNET_TARGETS), None)

    @property
    def train_unet(self) -> bool:
        return self.unet_targets is not None
