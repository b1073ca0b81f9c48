"""Adapter files at SD1.5 size (UNet + TE attention: 128 + 48 modules), each against a peer.

1. Export of a rank-16 LoRA to kohya fp16 (QR + small SVD per module, metadata, hash, atomic
   write) vs writing the same tensors with plain safetensors.save_file.    goal: < 1 s
2. Import of that file (checks, names, canonical LoRA) vs diffusers' own
   StableDiffusionLoraLoaderMixin.lora_state_dict (kohya -> diffusers keys).  goal: < 1 s
3. SVF -> LoRA export at 99 % energy (the delta is already an SVD: sort, no new SVD) vs the
   naive route: form each dense dW and take its SVD.                        goal: < 5 s
   (the base's SVD is computed once beforehand, as during training: it is cached)

4. LyCORIS files at SD1.5 size, as community LoKr / LoHa files come (UNet transformer blocks, ResNets
   and samplers, 3x3 convs included, + TE attention: 278 + 48 modules; LoKr with factor 16 and a full W2
   (LyCORIS's full-matrix mode), LoHa rank 8 / conv rank 4; fp16): import (read, checks, canonical tensors) vs
   safetensors.torch.load_file of the same file                            goal: < 1 s each
   and conversion of the imported file to a rank-32 plain LoRA (SVD from the factors, energy
   reported) with ``studio export --format kohya --rank 32``'s call           goal: < 10 s each

Prints BENCH export_sd15_seconds, import_sd15_seconds, svf_export_sd15_seconds, import_lokr_sd15_seconds,
import_loha_sd15_seconds, lokr_to_lora32_sd15_seconds, loha_to_lora32_sd15_seconds.
Run: python benchmarks/formats.py [--threads N] [--skip-svf] [--only-lycoris]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import studio.adapters as A  # noqa: E402
import studio.formats as F  # noqa: E402
from builders import CLIP_L, SD15_UNET, meta_clip, meta_unet  # noqa: E402
from timing import bench, interleaved  # noqa: E402

TARGETS = {"unet": "unet-attn", "te": "te-attn"}
LYCORIS_TARGETS = {"unet": "unet-full", "te": "te-attn"}
LYCORIS = {"lokr": {"rank": 8, "factor": 16, "full_matrix": True}, "loha": {"rank": 8, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 2.0}}


def sd15_shapes() -> dict[str, dict[str, tuple[int, int]]]:
    """{component: {module path: (out, in)}} of the SD1.5 attention Linears (meta device: no memory)."""
    models = {"unet": meta_unet(SD15_UNET), "te": meta_clip(CLIP_L)}
    return {c: {p: tuple(m.weight.shape) for p, m in A.find_targets(model, TARGETS[c]).items()}
            for c, model in models.items()}


def lora_file(shapes, rank: int = 16) -> F.AdapterFile:
    g = torch.Generator().manual_seed(0)
    parts = {}
    for component, modules in shapes.items():
        tensors = {}
        for path, (out, inp) in modules.items():
            tensors[f"{path}.A"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[f"{path}.B"] = 0.01 * torch.randn(out, rank, generator=g)
        parts[component] = F.Part("lora", {"rank": rank, "alpha": float(rank), "rslora": False, "dropout": 0.0},
                                  tensors)
    return F.AdapterFile("sd15", parts)


def lycoris_file(method: str, fields: dict) -> F.AdapterFile:
    """An SD1.5-size adapter of ``method`` with random factors (the shapes its training would give), from
    the meta-device models' geometry: no base weights are allocated."""
    import dataclasses

    from studio.adapters.contract import Site
    from studio.adapters.registry import get
    g = torch.Generator().manual_seed(3)
    cfg = A.make_config(method, fields)
    parts = {}
    for component, model in {"unet": meta_unet(SD15_UNET), "te": meta_clip(CLIP_L)}.items():
        tensors = {}
        for path, module in A.find_targets(model, LYCORIS_TARGETS[component]).items():
            W = module.weight
            site = Site(path, W.shape[0], W[0].numel(), tuple(W.shape[2:]) or (1, 1))
            state = get(method).init(cfg, torch.empty(W.shape[0], W[0].numel(), device="meta"), site, g)
            for key, t in state.items():
                tensors[f"{path}.{key}"] = t if key == "alpha" else 0.05 * torch.randn(t.shape, generator=g)
        parts[component] = F.Part(method, dataclasses.asdict(cfg), tensors)
    return F.AdapterFile("sd15", parts)


def bench_lycoris(folder: Path) -> None:
    from safetensors.torch import load_file
    for method, fields in LYCORIS.items():
        path = folder / f"{method}.safetensors"
        F.save(lycoris_file(method, fields), path, "kohya", dtype="fp16", overwrite=True)  # LyCORIS's layout
        t = interleaved({"studio": lambda: F.read(path), "load_file": lambda: load_file(str(path))}, repeat=3)
        af = F.read(path)
        print(f"import of an SD1.5 {method} file ({sum(af.module_counts().values())} modules, "
              f"{path.stat().st_size / 1e6:.0f} MB fp16): studio {t['studio']:.3f} s, safetensors load_file "
              f"{t['load_file']:.3f} s (ratio {t['studio'] / t['load_file']:.1f})")
        bench(f"import_{method}_sd15_seconds", t["studio"], "< 1")
        wall, cpu = time.perf_counter(), time.process_time()
        report = F.save(af, folder / f"{method}-r32.safetensors", "kohya", rank=32, dtype="fp16", overwrite=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{method} -> plain LoRA rank 32: {wall:.2f} s ({cpu:.2f} s CPU), retained energy {report.energy:.4f}, "
              f"relative error {report.relative_error:.3g}")
        bench(f"{method}_to_lora32_sd15_seconds", wall, "< 10")


class Skeleton(nn.Module):
    """Only the adapted Linears of a model, at their module paths (random weights)."""

    def __init__(self, modules: dict[str, tuple[int, int]]):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for path, (out, inp) in modules.items():
            parent = self
            *parents, leaf = path.split(".")
            for name in parents:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            linear = nn.Linear(inp, out, bias=False)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(out, inp, generator=g) / inp ** 0.5)
            parent.add_module(leaf, linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-svf", action="store_true", help="skip part 3 (its setup SVD takes ~40 s here)")
    parser.add_argument("--only-lycoris", action="store_true", help="run part 4 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_lycoris:
        return bench_lycoris(Path(tempfile.mkdtemp(prefix="bench-formats-")))
    shapes = sd15_shapes()
    af = lora_file(shapes)
    folder = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    ours, theirs = folder / "ours.safetensors", folder / "plain.safetensors"

    from safetensors.torch import save_file
    flat = {k: v.half() for k, v in af.tensors().items()}
    t = interleaved({"studio": lambda: F.save(af, ours, "kohya", overwrite=True),
                     "save_file": lambda: save_file(flat, str(theirs))}, repeat=3)
    print(f"export, SD1.5 rank 16 -> kohya fp16: studio {t['studio']:.3f} s, plain save_file {t['save_file']:.3f} s "
          f"(ratio {t['studio'] / t['save_file']:.1f})")
    bench("export_sd15_seconds", t["studio"], "< 1")

    from diffusers import StableDiffusionPipeline
    t = interleaved({"studio": lambda: F.read(ours),
                     "diffusers": lambda: StableDiffusionPipeline.lora_state_dict(str(ours))}, repeat=3)
    print(f"import of that file: studio {t['studio']:.3f} s, diffusers lora_state_dict {t['diffusers']:.3f} s "
          f"(ratio {t['studio'] / t['diffusers']:.2f})")
    bench("import_sd15_seconds", t["studio"], "< 1")

    bench_lycoris(folder)
    if args.skip_svf:
        return
    models = {c: Skeleton(modules) for c, modules in shapes.items()}
    g = torch.Generator().manual_seed(2)
    for component, model in models.items():  # the SVD of every base weight, computed once and cached
        A.attach(model, "s", "svf", targets=TARGETS[component])
        with torch.no_grad():
            for p in A.trainable_parameters(model, "s"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    svf = F.from_models(models, "s", base="sd15")
    dense = {c: A.delta_weights(m, "s") for c, m in models.items()}

    def naive():
        for deltas in dense.values():
            for dW in deltas.values():
                torch.linalg.svd(dW, full_matrices=False)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return result, time.perf_counter() - wall, time.process_time() - cpu

    report, ours, ours_cpu = timed(lambda: F.save(svf, folder / "svf.safetensors", "kohya", energy=0.99,
                                                  models=models, overwrite=True))
    _, naive_s, naive_cpu = timed(naive)
    print(f"SVF -> LoRA at 99 % energy: studio {ours:.2f} s ({ours_cpu:.2f} s CPU), dense dW + SVD {naive_s:.2f} s "
          f"({naive_cpu:.2f} s CPU) (ratio {ours / naive_s:.2f}); ranks {min(report.ranks)}..{max(report.ranks)}, "
          f"retained energy {report.energy:.4f}, file {(folder / 'svf.safetensors').stat().st_size / 1e6:.0f} MB")
    bench("svf_export_sd15_seconds", ours, "< 5")


if __name__ == "__main__":
    main()
