"""Which diffusion timestep each training image is noised to: ``--timestep-sampling``.

Every sampler draws a fraction ``u`` in [0, 1) (0 = clean, 1 = pure noise) and maps it to the
scheduler's discrete index ``t = floor(u * T)`` (T = ``num_train_timesteps``, 1000 on SD bases):

- ``uniform``: t ~ U{0, ..., T-1}; drawn with ``torch.randint`` exactly as the trainer always did,
  so old runs (and their resumes) keep their draws bit for bit.
- ``logit-normal``: u = sigmoid(n), n ~ N(mean, std) -- SD3's "rf/lognorm(m, s)" (Esser et al.
  2024, arXiv:2403.03206, section 3.1), diffusers' ``compute_density_for_timestep_sampling``
  ("logit_normal", logit_mean / logit_std), SimpleTuner's and OneTrainer's logit-normal option.
  mean 0, std 1 puts most draws in the middle of the schedule; mean > 0 favours noisier steps.
- ``shift``: the logit-normal u, then u' = s u / (1 + (s - 1) u) -- the resolution shift of SD3
  (arXiv:2403.03206, eq. 23) that flux / SD3 trainers apply to their sampled sigmas; s > 1 moves
  draws towards noise (layout), s < 1 towards detail. s = 1 is logit-normal itself.

Every draw comes from the generator the caller passes (``loop.step_generator`` of the step), so
a resumed run and every process of a multi-process run draw the same timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.errors import StudioError


def _logit_normal(n: int, generator: torch.Generator, s: "TimestepSampling") -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64) * s.std + s.mean)


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift of a fraction u in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def _index(u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


SAMPLERS = {
    "uniform": lambda n, T, g, s: torch.randint(0, T, (n,), generator=g),
    "logit-normal": lambda n, T, g, s: _index(_logit_normal(n, g, s), T),
    "shift": lambda n, T, g, s: _index(shifted(_logit_normal(n, g, s), s.shift), T),
}
"""The one list of timestep samplers: name -> (n, T, generator, TimestepSampling) -> (n,) int64 in [0, T)."""


@dataclass(frozen=True)
class TimestepSampling:
    """A sampler and its options (the config's timestep_* fields)."""
    name: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 3.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise StudioError(f"--timestep-sampling {self.name!r}: choose one of {', '.join(SAMPLERS)}")
        if not self.std > 0:
            raise StudioError(f"--timestep-std must be positive, got {self.std}: use e.g. --timestep-std 1")
        if not self.shift > 0:
            raise StudioError(f"--timestep-shift must be positive, got {self.shift}: use e.g. --timestep-shift 3")

    def draw(self, n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) int64 scheduler timesteps in [0, T)."""
        return SAMPLERS[self.name](n, num_train_timesteps, generator, self)
