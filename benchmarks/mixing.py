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
    mix merged into the weights (goal <= 1.15). All three run on ONE model copy -- the same
    weight tensors -- with the adapters swapped within each round (studio attached, the same
    merged, detached; PEFT ``load_lora_weights``, unloaded), so no copy-to-copy difference in memory
    layout enters the ratio; each ratio is taken inside a round (the fastest of 4 steps after 2
    untimed ones, since load only ever adds time) and the median over rounds is reported.

Prints BENCH weight_change_vs_remerge, weight_change_vs_set_adapters, unmerged3_step_vs_peft,
unmerged3_step_vs_merged. Run: OMP_NUM_THREADS=1 python benchmarks/mixing.py [--threads N]
(two copies for (a), ~8 GiB; about 8 minutes on one core).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def peft_loaded(pipe, paths: list[Path], weights) -> None:
    for name, path in zip(NAMES, paths):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(NAMES, list(weights))


def studio_attached(models: dict, paths: list[Path], weights) -> None:
    for name, path, w in zip(NAMES, paths, weights):
        F.attach_file(F.read(path), models, name, w)


def fastest(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def step_rounds(pipe, models: dict, paths: list[Path], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per round: fastest step with studio unmerged, with diffusers + PEFT unfused, with studio
    merged -- the same UNet object each time, adapters swapped in between."""
    step = step_fn(pipe.unet)
    ratios: dict[str, list[float]] = {"vs_peft": [], "vs_merged": [], "studio": [], "peft": [], "merged": []}
    outputs = {}
    for r in range(rounds):
        studio_attached(models, paths, WEIGHT_SETS[0])
        fastest(step, warmup)  # the layers stack their factors once; the allocator settles
        t_studio = fastest(step, steps)
        outputs["studio"] = step()
        for model in models.values():
            A.merge(model)
        fastest(step, warmup)
        t_merged = fastest(step, steps)
        for name in NAMES:
            F.detach_file(models, name)
        peft_loaded(pipe, paths, WEIGHT_SETS[0])
        fastest(step, warmup)
        t_peft = fastest(step, steps)
        outputs["peft"] = step()
        pipe.unload_lora_weights()
        for key, value in (("studio", t_studio), ("peft", t_peft), ("merged", t_merged),
                           ("vs_peft", t_studio / t_peft), ("vs_merged", t_studio / t_merged)):
            ratios[key].append(value)
        print(f"  round {r + 1}: studio {t_studio:.2f} s, PEFT {t_peft:.2f} s, merged {t_merged:.2f} s "
              f"-> {t_studio / t_peft:.3f} of PEFT, {t_studio / t_merged:.3f} of merged", flush=True)
    difference = ((outputs["studio"] - outputs["peft"]).norm() / outputs["peft"].norm()).item()
    print(f"  studio vs PEFT UNet outputs differ by {difference:.1e} (relative): the same computation")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5, help="weight changes: rounds x 4")
    parser.add_argument("--rounds", type=int, default=4, help="denoising steps: adapter swaps")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps timed per mode and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after each swap")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    # (a) on two identical copies (same seed): studio's adapters on one, diffusers + PEFT on the
    # other, timed round-robin so load on the machine hits both alike
    ours, theirs = build(), build()
    models = {"unet": ours.unet, "te": ours.text_encoder}
    folder = Path(tempfile.mkdtemp(prefix="mixing-bench-"))
    paths = lora_files(models, folder)
    studio_attached(models, paths, WEIGHT_SETS[0])
    peft_loaded(theirs, paths, WEIGHT_SETS[0])
    print(f"built two SD1.5-sized UNet + TE copies and three rank-16 LoRA files in "
          f"{time.perf_counter() - began:.0f} s", flush=True)

    state = {"i": 0}

    def set_adapters():
        state["i"] += 1
        theirs.set_adapters(NAMES, list(WEIGHT_SETS[state["i"] % 2]))

    change = studio_weight_change(models)
    changes = interleaved({"studio": change, "diffusers": set_adapters}, repeat=args.repeat * 4)
    for model in models.values():
        A.merge(model)
    remerge = interleaved({"remerge": change}, repeat=max(2, args.repeat // 2))["remerge"]  # merged: a change re-merges
    print(f"(a) weight change -> ready: studio {changes['studio'] * 1e3:.1f} ms, diffusers set_adapters "
          f"{changes['diffusers'] * 1e3:.1f} ms, full re-merge {remerge * 1e3:.0f} ms", flush=True)
    for name in NAMES:
        F.detach_file(models, name)
    del theirs

    print(f"(b) one CFG denoising step at 256 px, 3 adapters, one UNet with the adapters swapped:", flush=True)
    ratios = step_rounds(ours, models, paths, args.rounds, args.steps, args.warmup)
    print(f"total {time.perf_counter() - began:.0f} s")
    bench("weight_change_vs_remerge", changes["studio"] / remerge, "<= 0.1")
    bench("weight_change_vs_set_adapters", changes["studio"] / changes["diffusers"])
    bench("unmerged3_step_vs_peft", statistics.median(ratios["vs_peft"]), "<= 1.0")
    bench("unmerged3_step_vs_merged", statistics.median(ratios["vs_merged"]), "<= 1.15")


if __name__ == "__main__":
    main()
