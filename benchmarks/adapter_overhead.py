"""Adapter overhead against PEFT and against the bare base, measured in the same run.

1. Training step (forward + backward + AdamW) of a tiny UNet with rank-16 LoRA on unet-attn:
   studio vs PEFT, same model, same factors, same batches.          goal: ratio <= 1.0
2. SD1.5-sized UNet (random weights), one denoising forward at 256 px (32x32 latents):
   three unmerged rank-16 LoRA adapters vs the bare base             goal: <= 1.15
   the same three merged vs the bare base                           goal: <= 1.01
3. SD1.5 proj_in-shaped 1x1 Conv2d (320 channels, 64x64 latents, batch 2), rank-8 LoRA:
   forward + backward, studio vs PEFT's LoRA Conv2d                  goal: ratio <= 1.0
   forward, the delta as two 1x1 convs (what the layer does) vs channels moved last and
   the Linear path reused (the alternative it rejected)               goal: ratio < 1.0
4. DoRA training step (forward + backward + AdamW), studio vs PEFT ``use_dora=True``, rank 16,
   the same factors:                                                 goal: ratio <= 0.8
   dora_step_vs_peft_tiny_unet  the tiny UNet of 1., DoRA on unet-attn
   dora_step_vs_peft_sd15_attn  an SD1.5 attention projection (Linear 320 -> 320 on a (2, 4096,
                                320) input that carries a gradient, as inside the UNet); this is
                                the headline dora_step_vs_peft
   dora_step_vs_peft_sd15_attn_frozen_input  the same with an input that needs no gradient (the
                                first adapted layer; the adapter's own work weighs more)
   dora_merged_vs_lora_merged   merged inference of the tiny UNet, DoRA vs LoRA: both are just a
                                weight                                goal: ~1.0
   Each line also prints the floor (no adapter at all) and, for the attention layer, the studio's
   plain LoRA as fractions of PEFT's DoRA step: no DoRA can beat the floor, and where the base's own
   work dominates (the tiny UNet: the floor is ~0.88 of PEFT's step at 16x16) 0.8 is out of reach.
5. The physical limit: an SD1.5-sized UNet (random weights, fp32), 256 px (32x32 latents), batch
   1, 77 x 768 context; one training step with a rank-16 adapter on unet-transformer (192
   layers) against the *floor*: the same forward plus a backward that only computes the input
   gradient through the frozen base (noisy latents require grad, nothing else) -- the work any
   adapter training must do. One model; the adapters are switched on in turn.
   lora_step_vs_floor                                                 goal: <= 1.10
   dora_step_vs_floor                                                 reported

Every comparison runs its peers in turn, one step each, inside one run; the ratio of each round's
adjacent steps is taken and the median over rounds printed, so load drifting on the (shared)
machine hits both sides alike. Absolute times on this CPU are noise.

Run: python benchmarks/adapter_overhead.py [--threads N] [--repeat N] [--skip-sd15] [--skip-floor]
     [--floor-rounds 3] [--floor-latent 32] [--attn-tokens 4096] [--keep-freed-memory]
     python benchmarks/adapter_overhead.py --quick      every part at toy sizes, to check the script
                                                          (a minute; its numbers mean little)
The SD1.5 floor steps take ~7-10 s each on one core here: the default 3 rounds (+1 warm-up) of
floor, LoRA and DoRA steps take about two minutes after building the UNet.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import studio.adapters as A  # noqa: E402
from builders import SD15_UNET  # noqa: E402
from timing import bench, interleaved  # noqa: E402

BENCH_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def _train_step_fn(model, params, batch):
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, context, target = batch

    def step():
        loss = F.mse_loss(model(x, t, encoder_hidden_states=context).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def training_step_vs_peft(repeat: int) -> float:
    import peft
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**BENCH_UNET)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    A.attach(ours, "a", "lora", A.lora.Config(rank=16), "unet-attn")
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=16, target_modules=UNET_MODULES))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 1000, (8,), generator=g),
             torch.randn(8, 8, 64, generator=g), torch.randn(8, 4, 16, 16, generator=g))
    times = interleaved({
        "studio": _train_step_fn(ours, A.trainable_parameters(ours, "a"), batch),
        "peft": _train_step_fn(theirs, [p for p in theirs.parameters() if p.requires_grad], batch),
    }, repeat=repeat, warmup=2)
    print(f"tiny UNet rank-16 LoRA training step: studio {times['studio'] * 1e3:.1f} ms, "
          f"PEFT {times['peft'] * 1e3:.1f} ms")
    return times["studio"] / times["peft"]


def inference_overhead(repeat: int) -> tuple[float, float]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    g = torch.Generator().manual_seed(2)
    x, t, context = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([500, 500]), torch.randn(2, 77, 768, generator=g)

    def forward():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=context)

    bare = interleaved({"bare": forward}, repeat=repeat)["bare"]
    for i, w in enumerate((0.8, -0.4, 0.5)):
        A.attach(unet, f"a{i}", "lora", A.lora.Config(rank=16), "unet-attn", weight=w)
        with torch.no_grad():
            for p in A.trainable_parameters(unet, f"a{i}"):
                p.add_(0.01 * torch.randn_like(p))

    def merged_forward():
        forward()

    times = {"unmerged": interleaved({"unmerged": forward}, repeat=repeat)["unmerged"]}
    A.merge(unet)
    times["merged"] = interleaved({"merged": merged_forward}, repeat=repeat)["merged"]
    A.unmerge(unet)
    # a second bare measurement after the others, to average out drift of the machine
    for name in A.adapter_names(unet):
        A.detach(unet, name)
    bare = (bare + interleaved({"bare": forward}, repeat=repeat)["bare"]) / 2
    print(f"SD1.5-sized UNet forward, batch 2 at 32x32 latents: bare {bare:.2f} s, "
          f"3 unmerged LoRA {times['unmerged']:.2f} s, merged {times['merged']:.2f} s")
    return times["unmerged"] / bare, times["merged"] / bare


def conv1x1(repeat: int) -> tuple[float, float]:
    import peft

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(320, 320, 1))
    ours, theirs = copy.deepcopy(conv), copy.deepcopy(conv)
    A.attach(ours, "a", "lora", A.lora.Config(rank=8), "0")
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=8, target_modules=["0"]), theirs)
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(2, 320, 64, 64, generator=g), torch.randn(2, 320, 64, 64, generator=g)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.mse_loss(model(x), target).backward()
        return run

    train = interleaved({"studio": step(ours), "peft": step(theirs)}, repeat=repeat, warmup=2)
    adapter = ours[0].adapters["a"]

    def rejected():  # channels last, the Linear path's two matmuls, channels back
        with torch.no_grad():
            y = ours[0].base(x)
            down, up = adapter.factors()
            y.add_(F.linear(F.linear(x.movedim(1, -1), down), up).movedim(-1, 1))

    def chosen():
        with torch.no_grad():
            ours(x)

    forward = interleaved({"conv": chosen, "movedim": rejected}, repeat=repeat, warmup=2)
    print(f"1x1 conv 320ch 64x64 rank-8 LoRA: forward+backward studio {train['studio'] * 1e3:.1f} ms, PEFT "
          f"{train['peft'] * 1e3:.1f} ms; forward as 1x1 convs {forward['conv'] * 1e3:.1f} ms, channels-last "
          f"Linear path {forward['movedim'] * 1e3:.1f} ms")
    return train["studio"] / train["peft"], forward["conv"] / forward["movedim"]


def paired(candidates: dict, rounds: int, warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Run the callables in turn, one call each per round; return (median seconds, median ratio to the
    first candidate within a round). Adjacent calls share the machine's load of the moment."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    first = next(iter(candidates))
    ratios = {name: statistics.median(t / f for t, f in zip(ts, times[first])) for name, ts in times.items()}
    return {name: statistics.median(ts) for name, ts in times.items()}, ratios


def _step(forward, params, target, inputs=()):
    """One training step: forward, MSE, backward, AdamW over ``params``; ``inputs``' gradients dropped.
    AdamW is the fused kernel, as ``trainers.loop`` builds it (one pass over all adapter tensors; the
    per-tensor loop costs ~30 ms a step over 384 small tensors on this CPU), for every peer alike."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss = F.mse_loss(forward(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for tensor in inputs:
            tensor.grad = None
    return step


def _peft_dora(model, targets: list[str], rank: int):
    import peft
    return peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=rank, use_dora=True, target_modules=targets), model)


def dora_tiny_unet(rounds: int, size: int) -> tuple[float, float]:
    """DoRA training step on the tiny UNet, studio vs PEFT; merged DoRA vs merged LoRA inference."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**BENCH_UNET)
    ours, theirs, lora = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    paths = A.attach(ours, "a", "dora", A.dora.Config(rank=16), "unet-attn")
    theirs = _peft_dora(theirs, paths, 16)
    A.attach(lora, "a", "lora", A.lora.Config(rank=16), "unet-attn")
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 4, size, size, generator=g), torch.randint(0, 1000, (8,), generator=g)
    context, target = torch.randn(8, 8, 64, generator=g), torch.randn(8, 4, size, size, generator=g)
    x_grad = x.clone().requires_grad_(True)

    def floor():  # no adapter: forward and the backward to the input through the frozen UNet
        F.mse_loss(base(x_grad, t, encoder_hidden_states=context).sample, target).backward()
        x_grad.grad = None

    times, ratios = paired({
        "peft": _step(lambda: theirs(x, t, encoder_hidden_states=context).sample,
                      [p for p in theirs.parameters() if p.requires_grad], target),
        "studio": _step(lambda: ours(x, t, encoder_hidden_states=context).sample,
                        A.trainable_parameters(ours, "a"), target),
        "floor": floor,
    }, rounds=rounds, warmup=2)
    print(f"tiny UNet rank-16 DoRA training step, batch 8 at {size}x{size}: studio {times['studio'] * 1e3:.1f} ms, "
          f"PEFT {times['peft'] * 1e3:.1f} ms; no adapter at all (the floor) {times['floor'] * 1e3:.1f} ms = "
          f"{ratios['floor']:.3f} of PEFT's step, the best any ratio can be")
    with torch.no_grad():
        for model in (ours, lora):
            for p in A.trainable_parameters(model, "a"):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
            A.merge(model)

    def infer(model):
        def run():
            with torch.no_grad():
                model(x, t, encoder_hidden_states=context)
        return run

    merged_times, merged = paired({"lora": infer(lora), "dora": infer(ours)}, rounds=rounds, warmup=2)
    print(f"tiny UNet merged inference: DoRA {merged_times['dora'] * 1e3:.1f} ms, "
          f"LoRA {merged_times['lora'] * 1e3:.1f} ms")
    return ratios["studio"], merged["dora"]


def dora_sd15_attention(rounds: int, tokens: int, input_grad: bool) -> float:
    """DoRA training step on one SD1.5 attention projection (to_q of the 64x64 blocks), studio vs PEFT."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(320, 320, bias=False))
    ours, theirs, lora = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    A.attach(ours, "a", "dora", A.dora.Config(rank=16), ["0"])
    theirs = _peft_dora(theirs, ["0"], 16)
    A.attach(lora, "a", "lora", A.lora.Config(rank=16), ["0"])
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, tokens, 320, generator=g).requires_grad_(input_grad)
    target = torch.randn(2, tokens, 320, generator=g)

    def floor():  # no adapter: forward, and the input gradient when the input has one
        loss = F.mse_loss(base(x), target)
        if input_grad:
            loss.backward()
            x.grad = None

    times, ratios = paired({
        "peft": _step(lambda: theirs(x), [p for p in theirs.parameters() if p.requires_grad], target, [x]),
        "studio": _step(lambda: ours(x), A.trainable_parameters(ours, "a"), target, [x]),
        "lora": _step(lambda: lora(x), A.trainable_parameters(lora, "a"), target, [x]),
        "floor": floor,
    }, rounds=rounds, warmup=2)
    print(f"SD1.5 attention projection 320->320 on (2, {tokens}, 320), input {'with' if input_grad else 'without'} "
          f"gradient, rank-16 DoRA step: studio {times['studio'] * 1e3:.1f} ms, PEFT {times['peft'] * 1e3:.1f} ms; "
          f"of PEFT's step: studio {ratios['studio']:.3f}, the studio's plain LoRA {ratios['lora']:.3f}, "
          f"no adapter {ratios['floor']:.3f}")
    return ratios["studio"]


QUICK_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64)
"""SD1.5's layout (192 unet-transformer layers) at toy width, for --quick."""


def step_vs_floor(rounds: int, latent: int, quick: bool) -> tuple[float, float]:
    """LoRA and DoRA training steps on an SD1.5-sized UNet against the floor (see the docstring)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = QUICK_UNET if quick else SD15_UNET
    unet = UNet2DConditionModel(**config).train()
    lora_paths = A.attach(unet, "lora", "lora", A.lora.Config(rank=16), "unet-transformer")
    A.attach(unet, "dora", "dora", A.dora.Config(rank=16), "unet-transformer")
    assert len(lora_paths) == 192, len(lora_paths)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, latent, latent, generator=g)
    t, target = torch.tensor([500]), torch.randn(1, 4, latent, latent, generator=g)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=g)
    for p in unet.parameters():
        p.requires_grad_(False)
    for name in ("lora", "dora"):
        for p in A.trainable_parameters(unet, name):
            p.requires_grad_(True)

    layers = A.targets.adapted_layers(unet).values()
    adapters = {name: [layer.adapters[name] for layer in layers] for name in ("lora", "dora")}

    def only(name: str | None):  # what set_enabled does, without walking the model's modules every step
        for adapter_name, per_layer in adapters.items():
            for adapter in per_layer:
                adapter.enabled = adapter_name == name

    x_grad = x.clone().requires_grad_(True)

    def floor():  # the frozen base: forward, and a backward to the noisy latents only
        only(None)
        unet(x_grad, t, encoder_hidden_states=context).sample.sub(target).square().mean().backward()
        x_grad.grad = None

    def with_adapter(name: str):
        step = _step(lambda: unet(x, t, encoder_hidden_states=context).sample, A.trainable_parameters(unet, name),
                     target)

        def run():
            only(name)
            step()
        return run

    times, ratios = paired({"floor": floor, "lora": with_adapter("lora"), "dora": with_adapter("dora")},
                           rounds=rounds, warmup=1)
    print(f"{'toy-width SD1.5-layout' if quick else 'SD1.5-sized'} UNet training step, batch 1 at {latent}x{latent} "
          f"latents: floor {times['floor']:.2f} s, rank-16 LoRA {times['lora']:.2f} s, DoRA {times['dora']:.2f} s "
          f"(192 layers)")
    return ratios["lora"], ratios["dora"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD1.5-sized inference part")
    parser.add_argument("--skip-floor", action="store_true", help="skip the SD1.5-sized step-vs-floor part")
    parser.add_argument("--floor-rounds", type=int, default=3, help="rounds of (floor, LoRA, DoRA) steps")
    parser.add_argument("--floor-latent", type=int, default=32, help="latent size of the floor part (32 = 256 px)")
    parser.add_argument("--attn-tokens", type=int, default=4096, help="tokens of the SD1.5 attention layer (64x64)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc's malloc as `studio train` does (studio/allocator.py), for every part and "
                             "both peers; default: glibc's own settings, where each fresh activation-sized tensor "
                             "faults its pages in again")
    parser.add_argument("--quick", action="store_true",
                        help="every part at toy sizes and few rounds: checks the script, not the numbers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from studio.allocator import keep_freed_memory
        print(f"allocator: freed memory kept for reuse ({'set' if keep_freed_memory() else 'not glibc: unchanged'})")
    repeat, unet_size, tokens = args.repeat, 16, args.attn_tokens
    if args.quick:
        repeat, unet_size, tokens = 2, 8, 256
        args.floor_rounds, args.floor_latent = 2, 16
    bench("core_train_step_vs_peft", training_step_vs_peft(repeat * 3), "<= 1.0")
    train, forward = conv1x1(repeat * 2)
    bench("conv1x1_train_step_vs_peft", train, "<= 1.0")
    bench("conv1x1_forward_vs_channels_last", forward, "< 1.0")
    dora_unet, merged = dora_tiny_unet(repeat * 3, unet_size)
    bench("dora_step_vs_peft_tiny_unet", dora_unet, "<= 0.8")
    bench("dora_merged_vs_lora_merged", merged, "~1.0")
    frozen = dora_sd15_attention(repeat * 2, tokens, input_grad=False)
    bench("dora_step_vs_peft_sd15_attn_frozen_input", frozen, "<= 0.8")
    attn = dora_sd15_attention(repeat * 2, tokens, input_grad=True)
    bench("dora_step_vs_peft_sd15_attn", attn, "<= 0.8")
    bench("dora_step_vs_peft", attn, "<= 0.8")
    if not args.skip_floor:
        lora, dora = step_vs_floor(args.floor_rounds, args.floor_latent, args.quick)
        bench("lora_step_vs_floor", lora, "<= 1.10")
        bench("dora_step_vs_floor", dora)
    if not args.skip_sd15 and not args.quick:
        unmerged, merged = inference_overhead(repeat)
        bench("unmerged3_vs_base", unmerged, "<= 1.15")
        bench("merged_vs_base", merged, "<= 1.01")


if __name__ == "__main__":
    main()
