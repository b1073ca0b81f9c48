"""Load base models: the embedded mini base, diffusers folders, hub ids, single-file checkpoints.

Imports nothing of ours but ``studio.errors``. A base is returned as a diffusers pipeline plus
its family ("sd15" or "sdxl") and the named components adapters attach to:
``unet``, ``te`` (SD1.5) or ``te1`` / ``te2`` (SDXL).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError

MINI_BASE = Path(__file__).resolve().parents[1] / "sample_data" / "mini-sd"
SDXL_KEY_HINTS = ("conditioner.embedders.1", "add_embedding.linear_1")
CHANNELS_LAST = ("unet", "vae")  # pipeline parts whose conv weights go NHWC on first use
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@dataclass
class DiffusionBase:
    pipe: object
    family: str          # "sd15" | "sdxl"
    source: str          # what the user gave (or the mini base folder)
    channels_last: tuple[str, ...] = CHANNELS_LAST

    def __post_init__(self) -> None:
        # convolutions in NHWC (channels_last) run faster in oneDNN / cuDNN for inference, and
        # the activations follow the weights' layout: on this 2-core CPU a mini-base VAE decode
        # takes ~0.75x the time. The values are the same up to float rounding; nothing that reads
        # the weights depends on the layout. Training keeps the UNet as it is (see the trainer).
        for name in self.channels_last:
            module = getattr(self.pipe, name, None)
            if module is not None:
                to_channels_last(module)

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        if self.family == "sdxl":
            return {"unet": self.pipe.unet, "te1": self.pipe.text_encoder, "te2": self.pipe.text_encoder_2}
        return {"unet": self.pipe.unet, "te": self.pipe.text_encoder}

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for k, m in self.components.items() if k != "unet"]

    @property
    def resolution(self) -> int:
        unet = self.pipe.unet
        return int(unet.config.sample_size) * self.pipe.vae_scale_factor


def to_channels_last(module: torch.nn.Module) -> None:
    """Put every 4-D weight in channels_last, each on its module's first forward.

    diffusers maps .safetensors files into memory instead of reading them, so a conv weight's
    bytes are file pages that become resident only when read. Converting every weight up front
    reads all of them -- an SD1.5 VAE decoder that training never runs included -- and the
    pages read stay resident, counted in the process's memory, as long as the file stays
    mapped. So each module converts its own weights when it first runs, and hands the pages of
    the originals back. On an SD1.5 base training at 256 px the eager conversion peaked at 7.7 GB
    of RSS, against 5.1 GB for the same loop without any conversion.
    """
    files = _file_mappings()  # the weights are loaded: any file they live in is mapped by now
    for sub in module.modules():
        if any(p.dim() == 4 for p in sub.parameters(recurse=False)):
            handle = []

            def convert(mod, _inputs, handle=handle):
                _convert_own_weights(mod, files)
                handle[0].remove()
            handle.append(sub.register_forward_pre_hook(convert))


def _convert_own_weights(module: torch.nn.Module, files: list[tuple[int, int]]) -> None:
    for param in module.parameters(recurse=False):
        if param.dim() != 4:
            continue
        old = (param.data_ptr(), param.nbytes)
        converted = param.data.contiguous(memory_format=torch.channels_last)
        if converted.data_ptr() != old[0]:
            param.data = converted
            _release_file_pages(old, files)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every file-backed mapping of this process (Linux; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return []
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return spans


def _release_file_pages(span: tuple[int, int], files: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside (address, size) of a dead tensor, when they
    lie in a file mapping; anonymous memory (the heap) is never touched.

    Dropping a file page cannot change a value -- a later read faults the same bytes back in
    from the file -- and the span is a tensor that no longer exists, whose pages no live tensor
    shares (the partial pages at either end are left alone).
    """
    address, size = span
    page = mmap.PAGESIZE
    low, high = -(-address // page) * page, (address + size) // page * page
    if high <= low or not any(start <= low and high <= end for start, end in files):
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise(low, high - low, 4)  # MADV_DONTNEED


def _family_of_file(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises several types for damaged files
        raise StudioError(f"cannot read checkpoint {path}: {err}: give a .safetensors checkpoint or a diffusers folder") from None
    return "sdxl" if any(k.startswith(h) or h in k for k in keys for h in SDXL_KEY_HINTS) else "sd15"


def load_diffusion_base(base: str | None = None, dtype: torch.dtype = torch.float32,
                        channels_last: tuple[str, ...] = CHANNELS_LAST) -> DiffusionBase:
    """The mini base when ``base`` is None; else a folder, a single .safetensors file or a hub id.

    ``channels_last`` names the pipeline parts whose conv weights go NHWC on first use."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one bar per component is noise; errors stay one line
    transformers_logging.disable_progress_bar()
    source = str(base) if base else str(MINI_BASE)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise StudioError(f"base checkpoint {path} is not a .safetensors file: convert it, or give a diffusers folder "
                              f"(pickled .ckpt files are never loaded)")
        family = _family_of_file(path)
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        extra = {} if family == "sdxl" else NO_SAFETY
        try:
            pipe = cls.from_single_file(str(path), dtype=dtype, **extra)
        except Exception as err:
            raise StudioError(f"cannot load checkpoint {path} as {family}: {err}") from None
        return DiffusionBase(pipe, family, source, channels_last)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise StudioError(f"base folder {path} has no model_index.json: give a diffusers pipeline folder")
        family = "sdxl" if "XL" in json.loads(index.read_text()).get("_class_name", "") else "sd15"
        return DiffusionBase(_from_pretrained(family, str(path), dtype), family, source, channels_last)
    if base and "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        family = "sdxl" if "xl" in source.lower() else "sd15"
        return DiffusionBase(_from_pretrained(family, source, dtype), family, source, channels_last)
    raise StudioError(f"base {source} does not exist: give a diffusers folder, a .safetensors checkpoint or a hub id "
                      f"such as runwayml/stable-diffusion-v1-5 (or omit --base for the embedded mini base)")


def load_tokenizer(base: str | None = None):
    """The (first) tokenizer of a diffusers folder base, without loading any weights; None when
    the base is a single file or a hub id (the dataset check then skips caption lengths)."""
    from transformers import CLIPTokenizer

    folder = Path(str(base) if base else MINI_BASE).expanduser() / "tokenizer"
    return CLIPTokenizer.from_pretrained(str(folder)) if folder.is_dir() else None


def _from_pretrained(family: str, source: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else NO_SAFETY
    try:
        return cls.from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError, TypeError) as err:  # missing files, or a folder missing pipeline parts
        raise StudioError(f"cannot load base {source}: {str(err).splitlines()[0]}: check the path, or download the "
                          f"model where the hub is reachable") from None


# -- causal language models ----------------------------------------------------------------------
MINI_LM = Path(__file__).resolve().parents[1] / "sample_data" / "mini-lm"


def load_causal_lm(base: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a transformers causal-LM folder (or hub id); the embedded mini LM when None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    source = str(base) if base else str(MINI_LM)
    path = Path(source).expanduser()
    is_hub_id = not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if path.is_dir() and (path / "model_index.json").is_file():
        raise StudioError(f"base {path} is a diffusion pipeline: language-model training needs a causal LM "
                          f"(a transformers folder), or drop --task lm to train an image adapter")
    if path.is_dir() and not (path / "config.json").is_file():
        raise StudioError(f"base folder {path} has no config.json: give a transformers causal-LM folder")
    if not path.is_dir() and not is_hub_id:
        raise StudioError(f"base {source} does not exist: give a transformers causal-LM folder or a hub id "
                          f"(or omit --base for the embedded mini LM)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise StudioError(f"cannot load language model {source}: {str(err).splitlines()[0]}: check the folder, or "
                          f"download the model where the hub is reachable") from None
    if tokenizer.pad_token_id is None:  # GPT-2 style tokenizers: pad with EOS, masked out of every loss
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
