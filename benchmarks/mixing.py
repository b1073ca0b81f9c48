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
(b) One denoising step (UNet forward, CFG batch 2, 77 tokens; 256 px = 32x32 latents unless
    --size) with the three adapters unmerged: studio vs diffusers + PEFT unfused (goal <= 1.0)
    and vs the same mix merged into the weights (goal <= 1.15). The UNets are module copies over
    the SAME weight tensors (the merged one has its own copies of the 128 merged attention
    weights only), so no difference in memory placement enters the ratio; a fourth, plain copy
    without adapters shows what each way of applying the adapters adds to a step. Steps
    alternate between the copies (order rotated every round), each round's ratios are taken
    between neighbouring steps, and the median over rounds is reported: load on this shared
    machine drifts over seconds to minutes, and a round spans four steps.

(c) The three-kind mix (LoKr + LoHa + LoRA files on the same attention modules, LoKr and LoHa in
    LyCORIS's layout, as community files come; diffusers loads neither, so no PEFT peer): a weight
    change vs a re-merge (goal: far below, <= 0.1) and the unmerged step vs the same mix merged
    (goal <= 1.3); LoKr and LoHa stay dense deltas, applied through their factors each step.

(d) Routed mixtures (issue 17), on the same SD1.5-sized UNet:
    routed4_step_vs_static     one CFG denoising step with a MoLoRA mixture of 4 experts (the 4 rank-16
                               LoRAs of unet-attn as ``--mixture-of`` composes them, a random router per
                               layer: softmax gates per token) vs the same 4 LoRAs as a static unmerged
                               mix                                                        goal <= 1.3
    molora_train_step_vs_lora  one training step (forward, MSE, backward, fused AdamW; batch 1, 256 px,
                               kohya's unet-transformer set) of MoLoRA, 4 experts of rank 4, vs one LoRA
                               of rank 16: the same A, B values (the router adds 4 x in a module)
                                                                                          goal <= 1.3
    Two module copies over the same base weights, one step of each in turn; the median of the
    rounds' ratios.

Prints BENCH weight_change_vs_remerge, weight_change_vs_set_adapters, unmerged3_step_vs_peft,
unmerged3_step_vs_merged, three_kinds_weight_change_vs_remerge, three_kinds_step_vs_merged,
routed4_step_vs_static, molora_train_step_vs_lora.
Run: OMP_NUM_THREADS=1 python benchmarks/mixing.py [--threads N] [--only-three-kinds | --only-mixtures]
(one copy of the weights at a time, ~5 GiB; about 10 minutes on one core at 256 px, (c) and (d) a few more).
"""

from __future__ import annotations

import argparse
import copy
import itertools
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


# (c): method -> its fields; LoKr as LyCORIS's defaults factor it (factor -1, W2 factored), LoHa at rank 8
THREE_KINDS = {"lokr": {"rank": 8, "alpha": 4.0}, "loha": {"rank": 8, "alpha": 4.0}, "lora": {"rank": 16, "alpha": 16.0}}


def three_kind_files(models: dict, folder: Path) -> list[Path]:
    """A LoKr, a LoHa and a LoRA file on the models' attention (random factors; kohya names, LyCORIS's layout)."""
    paths = []
    for i, (method, fields) in enumerate(THREE_KINDS.items()):
        g = torch.Generator().manual_seed(20 + i)
        for component, model in models.items():
            A.attach(model, "tmp", method, A.make_config(method, fields), TARGETS[component])
            with torch.no_grad():
                for p in A.trainable_parameters(model, "tmp"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        af = F.from_models(models, "tmp", base="sd15")
        for model in models.values():
            A.detach(model, "tmp")
        paths.append(folder / f"{method}.safetensors")
        F.save(af, paths[-1], "kohya", dtype="fp32", overwrite=True)
    return paths


def three_kinds(args) -> None:
    began = time.perf_counter()
    ours = build()
    plain_unet, bare_unet = shared_copy(ours.unet), shared_copy(ours.unet)
    models = {"unet": ours.unet, "te": ours.text_encoder}
    paths = three_kind_files(models, Path(tempfile.mkdtemp(prefix="mixing-bench-3-")))
    studio_attached(models, paths, WEIGHT_SETS[0])
    print(f"(c) LoKr + LoHa + LoRA files ({', '.join(f'{p.stat().st_size / 1e6:.0f} MB' for p in paths)}) on an "
          f"SD1.5-sized UNet + TE in {time.perf_counter() - began:.0f} s", flush=True)
    change = studio_weight_change(models)
    unmerged = interleaved({"studio": change}, repeat=args.repeat * 4)["studio"]
    for model in models.values():
        A.merge(model)
    remerge = interleaved({"remerge": change}, repeat=max(2, args.repeat // 2))["remerge"]
    print(f"(c) weight change -> ready: studio {unmerged * 1e3:.1f} ms, full re-merge {remerge * 1e3:.0f} ms", flush=True)
    for model in models.values():
        A.unmerge(model)
    for name, w in zip(NAMES, WEIGHT_SETS[0]):
        F.set_file_weight(models, name, w)
    unets = {"studio": ours.unet, "merged": merged_copy(plain_unet, models), "plain": bare_unet}
    ratios = step_rounds(unets, args.rounds, args.warmup, args.size)
    bench("three_kinds_weight_change_vs_remerge", unmerged / remerge, "<= 0.1")
    bench("three_kinds_step_vs_merged", statistics.median(ratios["vs_merged"]), "<= 1.3")


def step_fn(unet, size: int = 256):
    """One CFG denoising step: the UNet on a batch of 2 latents of size/8 (32x32 at 256 px) with 77 context tokens."""
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, size // 8, size // 8, generator=g), torch.randn(2, 77, 768, generator=g)
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
        for layer in layers:  # what the next forward does first: re-stack the low-rank adapters' scaled factors
            live = [a for a in layer.live_adapters() if a.kind == "low-rank"]  # (dense ones scale as they run)
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


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors: no weight memory copied."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def merged_copy(plain_unet, models: dict) -> torch.nn.Module:
    """``plain_unet`` (a shared copy of the pristine UNet) with studio's merge of the current mix
    written into its own copies of the adapted weights; the studio model is unmerged again."""
    A.merge(models["unet"])
    for path, layer in A.targets.adapted_layers(models["unet"]).items():
        plain_unet.get_submodule(path).weight = torch.nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
    A.unmerge(models["unet"])
    return plain_unet


def step_rounds(unets: dict, rounds: int, warmup: int, size: int) -> dict[str, list[float]]:
    """Alternate one step of each UNet, ``warmup`` untimed rounds first; per-round ratios."""
    steps = {name: step_fn(unet, size) for name, unet in unets.items()}
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    ratios: dict[str, list[float]] = {f"vs_{n}": [] for n in ("peft", "merged", "static") if n in steps}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        took = {}
        for name in order:
            start = time.perf_counter()
            steps[name]()
            took[name] = time.perf_counter() - start
            seconds[name].append(took[name])
        for key in ratios:
            ratios[key].append(took["studio"] / took[key[3:]])
        print(f"  round {r + 1}: " + ", ".join(f"{n} {took[n]:.2f} s" for n in names) + " -> " +
              ", ".join(f"{v[-1]:.3f} of {k[3:]}" for k, v in ratios.items()), flush=True)
    outputs = {name: step() for name, step in steps.items()}
    if "plain" in seconds:  # what the adapters add to a step, each way
        plain = statistics.median(seconds["plain"])
        print("  added to the plain UNet's step: " + ", ".join(
            f"{n} {statistics.median(seconds[n]) - plain:+.3f} s" for n in ("studio", "peft", "merged", "static")
            if n in seconds))
    for other in (k[3:] for k in ratios):
        difference = ((outputs["studio"] - outputs[other]).norm() / outputs[other].norm()).item()
        note = "the router's gates are not the static 1/4 each" if other == "static" else "the same computation"
        print(f"  studio vs {other} UNet outputs differ by {difference:.1e} (relative): {note}")
    print("  median step: " + ", ".join(f"{n} {statistics.median(v):.2f} s" for n, v in seconds.items()))
    return ratios


def routed_experts(unet, experts: int, rank: int, targets: str, seed: int) -> dict[str, list[dict]]:
    """``experts`` random LoRA factor sets ({path: {A, B}}) for ``unet``'s ``targets`` layers."""
    g = torch.Generator().manual_seed(seed)
    sets = [{} for _ in range(experts)]
    for path, module in A.find_targets(unet, targets).items():
        out, inp = module.weight.shape
        for factors in sets:
            factors[path] = {"A": torch.randn(rank, inp, generator=g) / inp ** 0.5,
                             "B": 0.01 * torch.randn(out, rank, generator=g)}
    return sets


def routed4(args) -> float:
    """(d) a generation step, 4 LoRAs routed per token vs the same 4 as a static unmerged mix."""
    from studio.adapters import compose

    unet = build().unet
    static, bare = shared_copy(unet), shared_copy(unet)
    sets = routed_experts(unet, 4, 16, TARGETS["unet"], seed=30)
    fields = {"rank": 16, "alpha": 16.0}
    config, tensors = compose.lora_experts([(f"e{i}", "lora", fields, f) for i, f in enumerate(sets)])
    g = torch.Generator().manual_seed(31)
    saved = {path: {k: tensors[f"{path}.{k}"] for k in "ABRc"} for path in sets[0]}
    for t in saved.values():  # a router that routes: gates differ per token
        t["R"] = torch.randn(t["R"].shape, generator=g) / t["R"].shape[1] ** 0.5
    A.attach(unet, "mix", "molora", A.make_config("molora", config), TARGETS["unet"], saved=saved)
    for i, factors in enumerate(sets):
        A.attach(static, f"e{i}", "lora", A.make_config("lora", fields), TARGETS["unet"], weight=0.25, saved=factors)
    print(f"(d) one CFG denoising step at {args.size} px: MoLoRA over 4 rank-16 LoRAs (routed) vs the 4 as a static "
          f"unmerged mix, {len(saved)} modules", flush=True)
    ratios = step_rounds({"studio": unet, "static": static, "plain": bare}, args.rounds, args.warmup, args.size)
    return statistics.median(ratios["vs_static"])


def train_step(unet, name: str, size: int):
    """One adapter training step on ``unet``: forward at batch 1, MSE, backward, fused AdamW (as trainers.loop)."""
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, size // 8, size // 8, generator=g), torch.randn(1, 77, 768, generator=g)
    t, target = torch.tensor([500]), torch.randn(1, 4, size // 8, size // 8, generator=g)
    opt = torch.optim.AdamW(A.trainable_parameters(unet, name), lr=1e-4, fused=True)

    def step():
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=context).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def molora_train(args) -> float:
    """(d) a training step of MoLoRA (4 experts x rank 4) vs LoRA rank 16 on the same frozen UNet."""
    unet = build().unet.train()
    lora = shared_copy(unet)
    torch.manual_seed(0)
    mixture = A.make_config("molora", {"rank": 4, "alpha": 4.0, "experts": 4})
    A.attach(unet, "mix", "molora", mixture, "unet-transformer")
    A.attach(lora, "lora", "lora", A.make_config("lora", {"rank": 16, "alpha": 16.0}), "unet-transformer")
    values = {n: sum(p.numel() for p in A.trainable_parameters(m, n)) for n, m in (("mix", unet), ("lora", lora))}
    print(f"(d) one training step at {args.size} px, batch 1, unet-transformer: MoLoRA 4 x r4 "
          f"({values['mix']:,} values with the routers) vs LoRA r16 ({values['lora']:,})", flush=True)
    steps = {"molora": train_step(unet, "mix", args.size), "lora": train_step(lora, "lora", args.size)}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    ratios = []
    for r in range(args.train_rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        took = {}
        for name in order:
            start = time.perf_counter()
            steps[name]()
            took[name] = time.perf_counter() - start
        ratios.append(took["molora"] / took["lora"])
        print(f"  round {r + 1}: molora {took['molora']:.2f} s, lora {took['lora']:.2f} s -> {ratios[-1]:.3f}",
              flush=True)
    return statistics.median(ratios)


def mixtures(args) -> None:
    import gc

    routed = routed4(args)
    gc.collect()
    train = molora_train(args)
    bench("routed4_step_vs_static", routed, "<= 1.3")
    bench("molora_train_step_vs_lora", train, "<= 1.3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5, help="weight changes: rounds x 4")
    parser.add_argument("--rounds", type=int, default=20, help="denoising steps timed per UNet")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--size", type=int, default=256, help="image size of the denoising step, in pixels")
    parser.add_argument("--train-rounds", type=int, default=10, help="(d): training steps timed per adapter")
    parser.add_argument("--only-three-kinds", action="store_true", help="run (c) only")
    parser.add_argument("--only-mixtures", action="store_true", help="run (d) only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only_three_kinds:
        return three_kinds(args)
    if args.only_mixtures:
        return mixtures(args)
    began = time.perf_counter()
    # (a) on two identical copies (same seed): studio's adapters on one, diffusers + PEFT on the
    # other, timed round-robin so load on the machine hits both alike
    ours = build()
    plain_unet, bare_unet = shared_copy(ours.unet), shared_copy(ours.unet)
    theirs = tiny_pipeline(shared_copy(ours.unet), shared_copy(ours.text_encoder))
    models = {"unet": ours.unet, "te": ours.text_encoder}
    folder = Path(tempfile.mkdtemp(prefix="mixing-bench-"))
    paths = lora_files(models, folder)
    studio_attached(models, paths, WEIGHT_SETS[0])
    peft_loaded(theirs, paths, WEIGHT_SETS[0])
    print(f"built an SD1.5-sized UNet + TE (studio and PEFT on module copies over the same weights) and "
          f"three rank-16 LoRA files in {time.perf_counter() - began:.0f} s", flush=True)

    # (a) studio and diffusers set_adapters timed round-robin, so load on the machine hits both alike
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
    for model in models.values():
        A.unmerge(model)
    for name, w in zip(NAMES, WEIGHT_SETS[0]):
        F.set_file_weight(models, name, w)
    theirs.set_adapters(NAMES, list(WEIGHT_SETS[0]))

    print(f"(b) one CFG denoising step at {args.size} px, 3 adapters, steps alternating between the three UNets:", flush=True)
    unets = {"studio": ours.unet, "peft": theirs.unet, "merged": merged_copy(plain_unet, models), "plain": bare_unet}
    ratios = step_rounds(unets, args.rounds, args.warmup, args.size)
    print(f"total {time.perf_counter() - began:.0f} s")
    bench("weight_change_vs_remerge", changes["studio"] / remerge, "<= 0.1")
    bench("weight_change_vs_set_adapters", changes["studio"] / changes["diffusers"])
    bench("unmerged3_step_vs_peft", statistics.median(ratios["vs_peft"]), "<= 1.0")
    bench("unmerged3_step_vs_merged", statistics.median(ratios["vs_merged"]), "<= 1.15")
    del ours, theirs, models, unets, plain_unet, bare_unet, change, set_adapters  # (c) builds its own copy
    import gc
    gc.collect()
    three_kinds(args)
    gc.collect()
    mixtures(args)


if __name__ == "__main__":
    main()
