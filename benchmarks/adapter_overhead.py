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

Run: python benchmarks/adapter_overhead.py [--threads N] [--skip-sd15]
"""

from __future__ import annotations

import argparse
import copy
import sys
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

    def rejected():  # channels last, the Linear path's forward_delta, channels back
        with torch.no_grad():
            y = ours[0].base(x)
            y.add_(A.lora.forward_delta(adapter.cfg, adapter.state(), x.movedim(1, -1)).movedim(-1, 1))

    def chosen():
        with torch.no_grad():
            ours(x)

    forward = interleaved({"conv": chosen, "movedim": rejected}, repeat=repeat, warmup=2)
    print(f"1x1 conv 320ch 64x64 rank-8 LoRA: forward+backward studio {train['studio'] * 1e3:.1f} ms, PEFT "
          f"{train['peft'] * 1e3:.1f} ms; forward as 1x1 convs {forward['conv'] * 1e3:.1f} ms, channels-last "
          f"Linear path {forward['movedim'] * 1e3:.1f} ms")
    return train["studio"] / train["peft"], forward["conv"] / forward["movedim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD1.5-sized inference part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench("core_train_step_vs_peft", training_step_vs_peft(args.repeat * 3), "<= 1.0")
    train, forward = conv1x1(args.repeat * 2)
    bench("conv1x1_train_step_vs_peft", train, "<= 1.0")
    bench("conv1x1_forward_vs_channels_last", forward, "< 1.0")
    if not args.skip_sd15:
        unmerged, merged = inference_overhead(args.repeat)
        bench("unmerged3_vs_base", unmerged, "<= 1.15")
        bench("merged_vs_base", merged, "<= 1.01")


if __name__ == "__main__":
    main()
