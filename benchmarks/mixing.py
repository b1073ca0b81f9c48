"""Mixing three adapters on an SD1.5-sized UNet + text encoder (random weights), against peers.

Three rank-16 LoRA files on UNet and text-encoder attention (128 + 48 modules), attached once.

(a) A weight change until the model is ready to render:
    studio        set the three weights (adapters stay unmerged; the layers re-stack their
                  factors, which the next forward would do, is included)
    diffusers     ``pipe.set_adapters(names, weights)`` on the same files loaded with
                  ``load_lora_weights`` (PEFT, unfused)
    re-merge      the A1111 / ComfyUI way: every patched weight restored from its backup and
                  W0 + sum_i w_i dW_i recomputed (the core's merged mode does exactly this)
    goal: studio <= 0.1x the re-merge
(b) One denoising step (UNet forward, CFG batch 2, 256 px = 32x32 latents, 77 tokens) with the
    three adapters unmerged: studio vs diffusers + PEFT unfused (goal <= 1.0) and vs the same
    mix merged into the weights (goal <= 1.15).

Prints BENCH weight_change_vs_remerge, weight_change_vs_set_adapters, unmerged3_step_vs_peft,
unmerged3_step_vs_merged. Run: OMP_NUM_THREADS=1 python benchmarks/mixing.py [--threads N]
(two model copies, ~8 GiB; about 10 minutes on one core).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not one load report per adapter
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import studio.adapters as A  # noqa: E402
import studio.formats as F  # noqa: E402
from builders import CLIP_L, SD15_UNET, tiny_pipeline  # noqa: E402
from timing import bench, interleaved  # noqa: E402

TARGETS = {"unet": "unet-attn", "te": "te-attn"}
NAMES = ["a0", "a1", "a2"]
WEIGHT_SETS = [(0.8, -0.4, 0.5), (0.3, 0.9, -0.2)]


def build():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    te = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    return tiny_pipeline(unet, te)


def lora_files(models: dict, folder: Path) -> list[Path]:
    """Three random rank-16 LoRA files (kohya layout, fp32), shaped for these models."""
    paths = []
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(10 + i)
        parts = {}
        for component, model in models.items():
            tensors = {}
            for path, module in A.find_targets(model, TARGETS[component]).items():
                out, inp = module.weight.shape
                tensors[f"{path}.A"] = torch.randn(16, inp, generator=g) / inp ** 0.5
                tensors[f"{path}.B"] = 0.01 * torch.randn(out, 16, generator=g)
            parts[component] = F.Part("lora", {"rank": 16, "alpha": 16.0}, tensors)
        af = F.AdapterFile("sd15", parts)
        paths.append(folder / f"{name}.safetensors")
        F.save(af, paths[-1], "kohya", dtype="fp32", overwrite=True)
    return paths


def step_fn(unet):
    """One CFG denoising step: the UNet on a batch of 2 latents of 32x32 (256 px) with 77 context tokens."""
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])

    def step():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=context).sample
    return step


def studio_weight_change(models: dict):
    layers = [layer for m in models.values() for layer in A.targets.adapted_layers(m).values()]
    state = {"i": 0}

    def change():
        state["i"] += 1
        for name, w in zip(NAMES, WEIGHT_SETS[state["i"] % 2]):
            F.set_file_weight(models, name, w)
        for layer in layers:  # what the next forward does first: re-stack the scaled factors
            live = layer.live_adapters()
            if live:
                layer._stacked(live)
    return change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    # two identical copies (same seed): studio's adapters on one, diffusers + PEFT on the other, so
    # every comparison runs round-robin in the same minutes and load on the machine hits both alike
    ours, theirs = build(), build()
    models = {"unet": ours.unet, "te": ours.text_encoder}
    folder = Path(tempfile.mkdtemp(prefix="mixing-bench-"))
    paths = lora_files(models, folder)
    for name, path, w in zip(NAMES, paths, WEIGHT_SETS[0]):
        F.attach_file(F.read(path), models, name, w)
        theirs.load_lora_weights(str(path), adapter_name=name)
    theirs.set_adapters(NAMES, list(WEIGHT_SETS[0]))
    step, peft_step = step_fn(ours.unet), step_fn(theirs.unet)
    difference = ((step() - peft_step()).norm() / peft_step().norm()).item()
    print(f"built two SD1.5-sized UNet + TE copies and three rank-16 LoRA files in "
          f"{time.perf_counter() - began:.0f} s; studio vs PEFT UNet outputs differ by {difference:.1e} "
          f"(relative): the same computation", flush=True)

    state = {"i": 0}

    def set_adapters():
        state["i"] += 1
        theirs.set_adapters(NAMES, list(WEIGHT_SETS[state["i"] % 2]))

    change = studio_weight_change(models)
    changes = interleaved({"studio": change, "diffusers": set_adapters}, repeat=args.repeat * 4)
    unmerged = interleaved({"studio": step, "peft": peft_step}, repeat=args.repeat)
    for model in models.values():
        A.merge(model)
    remerge = interleaved({"remerge": change}, repeat=max(2, args.repeat // 2))["remerge"]  # merged: a change re-merges
    merged = interleaved({"merged": step, "peft": peft_step}, repeat=args.repeat)

    print(f"(a) weight change -> ready: studio {changes['studio'] * 1e3:.1f} ms, diffusers set_adapters "
          f"{changes['diffusers'] * 1e3:.1f} ms, full re-merge {remerge * 1e3:.0f} ms")
    print(f"(b) one CFG denoising step at 256 px, 3 adapters: studio unmerged {unmerged['studio']:.2f} s vs "
          f"diffusers+PEFT unfused {unmerged['peft']:.2f} s; then merged {merged['merged']:.2f} s vs PEFT "
          f"{merged['peft']:.2f} s (PEFT is the common yardstick of the two rounds)")
    print(f"total {time.perf_counter() - began:.0f} s")
    vs_peft = unmerged["studio"] / unmerged["peft"]
    bench("weight_change_vs_remerge", changes["studio"] / remerge, "<= 0.1")
    bench("weight_change_vs_set_adapters", changes["studio"] / changes["diffusers"])
    bench("unmerged3_step_vs_peft", vs_peft, "<= 1.0")
    bench("unmerged3_step_vs_merged", vs_peft / (merged["merged"] / merged["peft"]), "<= 1.15")


if __name__ == "__main__":
    main()
