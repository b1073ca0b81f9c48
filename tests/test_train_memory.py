"""Training memory: checkpointing gives the same gradients, a half base halves the frozen bytes
and keeps the adapters fp32, and the --check estimate matches the measured peak on the mini base,
counts the adapters the trainer attaches (SVF's bases, --mixture-of's routers) and counts saved
activations as the device keeps them (no weights, fused attention)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import studio.adapters as A
from builders import tiny_clip, tiny_llama, tiny_unet
from cli_helpers import one_error_line
from studio.cli import main
from trainers import memory, memory_count, memory_report

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


def _seeded(build):
    torch.manual_seed(0)
    return build()


def _adapted(model, targets, seed=0):
    """``model`` with a rank-4 LoRA whose B is random too, so every factor gets a gradient."""
    torch.manual_seed(seed)
    A.attach(model, "a", "lora", A.registry.make_config("lora", {"rank": 4}), targets)
    with torch.no_grad():
        for p in A.trainable_parameters(model, "a"):
            p.normal_(0, 0.1)
    return model.train()


def _grads(model, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    saved = memory_count._Saved()
    with memory_count._counting(saved):
        loss = loss_of(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return grads, saved.total


def _same_gradients(make, loss_of):
    """``make()`` builds the same adapted model each time (seeded)."""
    plain, plain_saved = _grads(make(), loss_of)
    checkpointed = make()
    memory.enable_checkpointing(checkpointed)
    again, kept = _grads(checkpointed, loss_of)
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
    assert kept < plain_saved / 2, (kept, plain_saved)  # it did checkpoint: far less kept for backward


def test_checkpointing_same_adapter_gradients_unet():
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)
    _same_gradients(lambda: _adapted(_seeded(tiny_unet), "unet-transformer"), lambda m: m(x, t, encoder_hidden_states=ctx).sample.square().mean())


def test_checkpointing_same_adapter_gradients_clip_and_lm():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    _same_gradients(lambda: _adapted(_seeded(tiny_clip), "te-attn"), lambda m: m(ids).last_hidden_state.square().mean())
    _same_gradients(lambda: _adapted(_seeded(tiny_llama), ["lm-attn", "lm-mlp"]),
                    lambda m: torch.nn.functional.cross_entropy(m(input_ids=ids).logits[:, :-1].reshape(-1, 100),
                                                                ids[:, 1:].reshape(-1)))


def test_half_base_halves_frozen_bytes_and_adapters_stay_fp32():
    unet = _adapted(tiny_unet(), "unet-attn")
    before = memory.parameter_bytes(unet)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 7, 32, generator=g)
    want = unet(x, t, encoder_hidden_states=ctx).sample
    memory.cast_frozen(unet, torch.bfloat16)
    after = memory.parameter_bytes(unet)
    assert after["frozen"] * 2 == before["frozen"] and after["adapters"] == before["adapters"]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in A.trainable_parameters(unet, "a"))
    got = unet(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16()).sample
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not a wrong delta
    got.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in A.trainable_parameters(unet, "a"))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "stripes"
    folder.mkdir()
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def test_bf16_base_run_trains_and_saves_fp32(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2", "--sample-every", "0",
                 "--base-dtype", "bf16", "--gradient-checkpointing", "--set", f"cache_dir={tmp_path / 'cache'}",
                 "--set", "sample_steps=2"]) == 0  # a NaN loss would have stopped the run (loop.guard_finite)
    with safe_open(str(out / "stripes.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(k.endswith(".B") and t.abs().max() > 0 for k, t in tensors.items())  # it trained


def test_check_estimate_matches_measured_peak_on_the_mini_base(data, tmp_path):
    """`studio train --check` in a fresh process against the peak RSS of the same run (4 steps)."""
    args = [str(data), "--out", str(tmp_path / "run"), "--steps", "4", "--sample-every", "0",
            "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2"]
    check = subprocess.run([sys.executable, "-m", "studio.cli", "train", *args, "--check"], capture_output=True,
                           text=True, cwd=ROOT, check=True).stdout
    total = re.search(r"total\s+([0-9.]+) (GB|MB)", check)
    estimate = float(total.group(1)) * (1024 if total.group(2) == "GB" else 1)
    run = subprocess.run([sys.executable, "-c", "import sys; from studio.cli import main; from trainers import memory; "
                          "assert main(['train', *sys.argv[1:]]) == 0; print(memory.peak_rss() / 1024 ** 2)", *args],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    measured = float(run.strip().splitlines()[-1])
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured, check)


def test_vram_budget_nothing_fits_and_bad_size(data, tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(data), "--check", "--vram-budget", "10MB"])
    assert "no memory setting fits --vram-budget 10 MB" in line and "smallest estimate is" in line
    assert "not a memory size" in one_error_line(capsys, ["train", str(data), "--check", "--vram-budget", "lots"])
    assert "--base-dtype 'fp8'" in one_error_line(capsys, ["train", str(data), "--base-dtype", "fp8"])
    assert not (tmp_path / "run").exists()


def test_vram_budget_says_what_to_turn_on():
    from trainers.diffusion_config import DiffusionTrainConfig

    cfg = DiffusionTrainConfig(data=str(STYLE), batch_size=4)
    e = memory.Estimate({"unet": 4 * memory.GB}, "fp32", 10 ** 6, 0,
                        {"unet": memory.Activations(memory.GB, memory.GB // 10, memory.GB // 10)}, 4, memory.GB // 2,
                        "assumed", 512)
    # 0.5 runtime + 4 weights + 16 MB adapters + 4 x 1 activations = 8.5 GB; checkpointed (0.1 + 0.1 per
    # image): 0.5 + 4 + 0.016 + 0.8 = 5.31; + bf16 (weights and activations halve): 0.5 + 2.4 + 0.016 = 2.91
    assert e.total(False) == pytest.approx(8.5 * memory.GB, rel=0.01)
    assert "fits" in memory_report.advise(e, cfg, 9 * memory.GB)
    assert memory_report.advise(e, cfg, 6 * memory.GB).endswith("turn on: --gradient-checkpointing (5.31 GB)")
    assert "--gradient-checkpointing --base-dtype bf16 (2.91 GB)" in memory_report.advise(e, cfg, 3 * memory.GB)


def _mini_cfg(**fields):
    from trainers.diffusion_config import DiffusionTrainConfig

    return DiffusionTrainConfig(data=str(STYLE), **fields)


def _real_adapters(cfg) -> tuple[int, int, list]:
    """(values the optimizer trains, bytes of the adapters' other tensors, the adapted layers) of
    ``cfg``'s adapters attached by the trainer on the real mini base."""
    from studio.adapters.layer import Adapter
    from studio.models import load_diffusion_base
    from trainers import diffusion

    base = load_diffusion_base(None, channels_last=())
    groups = diffusion.attach_adapters(cfg, base.components, base.family, "run",
                                       diffusion.composed_experts(cfg) if cfg.mixture_of else None)
    trained = {id(p) for group, _ in groups for p in group}
    adapters = [m for model in base.components.values() for m in model.modules() if isinstance(m, Adapter)]
    fixed = sum(t.numel() * t.element_size() for a in adapters for t in [*a.parameters(), *a.buffers()]
                if id(t) not in trained)
    layers = [layer for model in base.components.values() for layer in A.targets.adapted_layers(model).values()]
    return sum(p.numel() for group, _ in groups for p in group), fixed, layers


@pytest.mark.parametrize("method", list(A.registry.METHODS))
def test_check_counts_the_adapters_the_trainer_attaches(method):
    """Every method attaches on the meta proxy and runs its own forward there (the activations are
    counted with it), and leaves the trainable values and fixed bytes the real attach leaves."""
    cfg = _mini_cfg(method=method, targets="unet-transformer,te-attn")
    estimate = memory.estimate_diffusion(cfg)
    assert estimate.activations.keys() == {"unet", "te"} and estimate.activations["te"].plain > 0
    trained, fixed, layers = _real_adapters(cfg)
    assert (estimate.adapter_params, estimate.adapter_fixed) == (trained, fixed) and trained > 0
    if method == "svf":  # closed form: per layer U (out, n), S (n,), Vh (n, in) in fp32 and a 32-byte hash
        sites = [(s.out_features, s.in_features, min(s.out_features, s.in_features)) for s in (l.site for l in layers)]
        assert fixed == sum(4 * (o * n + n + n * i) + 32 for o, i, n in sites) and trained == sum(n for *_, n in sites)


def test_check_counts_only_the_routers_of_mixture_of(tmp_path):
    """Two LoRA files (ranks 4 and 2) as experts: the router's R (E, in) and c (E,) train, the
    experts' stacked A and B (zero-padded to rank 4) and their scales s (E,) are fixed fp32 tensors."""
    import studio.adapters as A
    from studio import formats
    from studio.models import load_diffusion_base

    experts = []
    for rank in (4, 2):
        base = load_diffusion_base(None, channels_last=())
        A.attach(base.pipe.unet, "e", "lora", A.registry.make_config("lora", {"rank": rank}), "unet-attn")
        path = tmp_path / f"rank{rank}.safetensors"
        formats.save(formats.from_models(base.components, "e"), path, "native")
        experts.append(path)
    sites = {p: layer.site for p, layer in A.targets.adapted_layers(base.pipe.unet).items()}
    cfg = _mini_cfg(mixture_of=[str(p) for p in experts])
    estimate = memory.estimate_diffusion(cfg)
    E = 2
    assert estimate.adapter_params == sum(E * s.in_features + E for s in sites.values())
    assert estimate.adapter_fixed == sum(4 * E * (4 * (s.in_features + s.out_features) + 1) for s in sites.values())
    assert (estimate.adapter_params, estimate.adapter_fixed) == _real_adapters(cfg)[:2]


def test_saved_activations_leave_out_the_weights_and_count_fused_attention():
    """A Linear saves its input and its weight's transpose (a view of the weight), and scaled dot-product
    attention on the CPU saves q, k, v, the output and a logsumexp row, not the (L x L) probabilities: the
    count on the meta device is the input's bytes plus what the CPU kernel saves, measured on real tensors."""
    import torch.nn.functional as F

    def attention(model, x):
        q, k, v = model(x).view(2, 256, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)

    def built(device):
        with torch.device(device):
            torch.manual_seed(0)
            return torch.nn.Linear(64, 3 * 64), torch.randn(2, 256, 64, requires_grad=True)

    layer, x = built("cpu")
    real = memory_count._Saved()
    with torch.autograd.graph.saved_tensors_hooks(real.add, lambda t: t):
        out = attention(layer, x)
    assert "Flash" in type(out.grad_fn).__name__  # the CPU's fused kernel
    weight = layer.weight.untyped_storage()._cdata
    assert weight in real.seen  # the Linear did save its weight (a transposed view)
    want = sum(b for c, b in real.seen.items() if c != weight)
    meta_layer, meta_x = built("meta")
    counted = memory_count.count_activations(meta_layer, lambda model: attention(model, meta_x), checkpointable=False).plain
    assert counted == want, (counted, want)
    assert counted < 2 * 256 * 64 * 4 * 6  # x, qkv, output, lse: no 2 x 4 x 256 x 256 probabilities


def test_check_counts_the_activations_textual_inversion_backpropagates_through():
    """A token's rows get their gradient through the UNet and the text encoder: the UNet keeps what it
    keeps for a text-encoder adapter, the text encoder its own activations (a LoRA alone: none there)."""
    ti = memory.estimate_diffusion(_mini_cfg(method="ti", token="<s1>", init_word="stripes")).activations
    te_lora = memory.estimate_diffusion(_mini_cfg(targets="te-attn")).activations
    assert ti.keys() == {"unet", "te"} and ti["unet"] == te_lora["unet"] and ti["te"].plain > 0
    assert "te" in memory.estimate_diffusion(_mini_cfg(with_ti="<s1>", init_word="stripes")).activations
    assert "te" not in memory.estimate_diffusion(_mini_cfg()).activations


def test_peak_live_bytes_of_a_forward_without_autograd():
    """conv -> relu -> conv on a (1, 3, 32, 32) input: each output frees the one before it once the next
    exists (nn.Sequential rebinds its input), so the peak is the input and two 8-channel maps."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))

    def run(m):
        with torch.device("meta"):
            m(torch.zeros(1, 3, 32, 32))
    assert memory_count.peak_live(model, run) == 3 * 32 * 32 * 4 + 2 * 8 * 32 * 32 * 4


def test_check_takes_the_vae_encode_when_it_needs_more_than_the_checkpointed_step():
    e = memory.Estimate({"unet": memory.GB}, "fp32", 0, 0, {"unet": memory.Activations(300, 40, 10)}, 2, 0, "", 64, 100)
    assert e.working_bytes(False) == 600 and e.working_bytes(True) == 200  # max(50, 100) x batch 2
    assert e.total(True) == memory.GB + 200
    assert memory_report.total_of(e, _mini_cfg(batch_size=2), {"gradient_checkpointing": True, "base_dtype": "bf16"}) \
        == (memory.GB + 200) // 2
    mini = memory.estimate_diffusion(_mini_cfg(resolution=128))
    assert 0 < mini.encode < mini.activations["unet"].plain  # the mini VAE's encode at 128 px, counted
