"""The training knobs around the loss and the weights: masked loss (trainers/masks.py), the EMA of the
adapter (trainers/ema.py), timestep sampling (trainers/timesteps.py) and ReLoRA's restarts
(trainers/relora.py) -- against hand computations, diffusers' EMAModel and exact resumes."""

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import studio.adapters as A
from builders import tiny_unet
from cli_helpers import one_error_line
from studio import formats
from studio.cli import main
from trainers import loop, masks, optimizers, relora, timesteps, validation
from trainers.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "sample_data" / "styles" / "stripes"


def _copy_data(folder: Path, mask_value: int | None = None) -> Path:
    """4 stripes images (64 x 64) with their captions, each with a uniform mask of ``mask_value``."""
    folder.mkdir(parents=True)
    for png in sorted(STYLE.glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
        if mask_value is not None:
            Image.new("L", (64, 64), mask_value).save(folder / f"{png.stem}.mask.png")
    return folder


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _run(data: Path, out: Path, cache: Path, *extra) -> Path:
    assert main(["train", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2", "--sample-every", "0",
                 "--set", f"cache_dir={cache}", "--set", "sample_steps=2", *extra]) == 0
    return out


# -- masked loss ---------------------------------------------------------------------------------

def _adapted_unet():
    """A tiny UNet with a LoRA whose B is random too, so every factor gets a gradient."""
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.requires_grad_(False)
    A.attach(unet, "a", "lora", A.registry.make_config("lora", {"rank": 4}), "unet-transformer")
    with torch.no_grad():
        for p in A.trainable_parameters(unet, "a"):
            p.normal_(0, 0.1)
    return unet


def _loss_and_grads(unet, weights):
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    unet.zero_grad(set_to_none=True)
    loss = masks.weighted_mse(unet(x, t, encoder_hidden_states=ctx).sample, target, weights).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in A.trainable_parameters(unet, "a")]


def _latent_weights(value: int) -> torch.Tensor:
    """(2, 1, 8, 8) weights of two 64 x 64 images with uniform masks (the mini base's 8x VAE)."""
    pixels = np.full((64, 64), value, dtype=np.uint8)
    return masks.LatentMasks([pixels, pixels], [(64, 64), (64, 64)], 8).batch([0, 1], [False, True], (8, 8))


def test_white_mask_equals_no_mask_and_black_mask_gives_zero_gradient():
    unet = _adapted_unet()
    plain_loss, plain_grads = _loss_and_grads(unet, None)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    white = _latent_weights(255)
    assert white.shape == (2, 1, 8, 8) and torch.equal(white, torch.ones_like(white))
    loss, grads = _loss_and_grads(unet, white)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    loss, grads = _loss_and_grads(unet, _latent_weights(0))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_partial_mask_weights_pixels_and_follows_the_flip():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255  # left half learns
    mask[:, 32:40] = 51  # one latent column at 0.2
    lm = masks.LatentMasks([mask, None], [(64, 64), (64, 64)], 8)
    w = lm.weight(0, False)[0]  # (8, 8)
    assert torch.equal(w[:, :4], torch.ones(8, 4)) and torch.allclose(w[:, 4], torch.full((8,), 0.2))
    assert torch.equal(w[:, 5:], torch.zeros(8, 3))
    assert torch.equal(lm.weight(0, True)[0], w.flip(-1))  # mirrored with its flipped image
    batch = lm.batch([0, 1], [False, False], (8, 8))
    assert torch.equal(batch[1], torch.ones(1, 8, 8))  # an image without a mask weighs 1 everywhere
    assert masks.LatentMasks([None], [(64, 64)], 8).batch([0], [False], (8, 8)) is None
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    error = (pred - target) ** 2
    # kohya's convention: mean over every pixel of mask * error, not renormalised by the mask's area
    hand = (error[0, :, :, :4].sum() + 0.2 * error[0, :, :, 4].sum()) / error[0].numel()
    got = masks.weighted_mse(pred, target, batch)
    assert torch.allclose(got[0], hand, rtol=1e-6) and torch.allclose(got[1], error[1].mean(), rtol=1e-6)


def test_white_masks_train_the_same_adapter_as_no_masks_and_black_ones_nothing(tmp_path):
    cache = tmp_path / "cache"
    plain = _run(_copy_data(tmp_path / "plain" / "stripes"), tmp_path / "r0", cache)
    white = _run(_copy_data(tmp_path / "white" / "stripes", 255), tmp_path / "r1", cache)
    black = _run(_copy_data(tmp_path / "black" / "stripes", 0), tmp_path / "r2", cache)
    a, b = _tensors(plain / "stripes.safetensors"), _tensors(white / "stripes.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(white / "stripes.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "4"  # the masks are not training images
    ups = {k: v for k, v in _tensors(black / "stripes.safetensors").items() if k.endswith(".B")}
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups.values())  # zero gradient: B never left 0
    assert any(torch.count_nonzero(a[k]) for k in ups)  # while the unmasked run did train


def test_bad_masks_are_one_error_line_and_write_nothing(tmp_path, capsys):
    data = _copy_data(tmp_path / "stripes")
    Image.new("L", (32, 64), 255).save(data / "stripes_01.mask.png")
    out = tmp_path / "run"
    args = ["train", str(data), "--out", str(out), "--steps", "2", "--set", f"cache_dir={tmp_path / 'cache'}"]
    line = one_error_line(capsys, args)
    assert "mask size 32x64 differs from its image's 64x64" in line and "stripes_01.mask.png" in line
    (data / "stripes_01.mask.png").write_text("not pixels")
    assert "is not an image" in one_error_line(capsys, args)
    assert not out.exists() and not (tmp_path / "cache").exists()


# -- EMA -----------------------------------------------------------------------------------------

def _decays(n: int, decay: float) -> list[float]:
    """d_t for t = 1..n: 0, then min(decay, t / (9 + t)) (diffusers' EMAModel without use_ema_warmup)."""
    return [0.0 if t == 1 else min(decay, t / (9 + t)) for t in range(1, n + 1)]


def _closed_form(values: list[torch.Tensor], decays: list[float], start: torch.Tensor) -> torch.Tensor:
    """e_N = (prod_t d_t) e_0 + sum_t (1 - d_t) (prod_{s > t} d_s) p_t, in float64."""
    n = len(values)
    total = float(np.prod(decays)) * start.double()
    for t, p in enumerate(values):
        total = total + (1 - decays[t]) * float(np.prod(decays[t + 1:])) * p.double()
    return total


def test_ema_after_n_steps_equals_the_closed_form_and_diffusers():
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    start = p.detach().clone()
    ema = EMA([p], 0.9)
    reference = EMAModel([p], decay=0.9)
    values = []
    for _ in range(30):  # the warm-up reaches 0.9 at t = 81: every step here is still warming up
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=g))
        values.append(p.detach().clone())
        ema.update()
        reference.step([p])
    torch.testing.assert_close(ema.shadow[0].double(), _closed_form(values, _decays(30, 0.9), start), rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.shadow[0], reference.shadow_params[0], rtol=0, atol=1e-6)


def test_ema_at_full_decay_is_the_textbook_average_and_its_state_round_trips():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, generator=g))
    ema = EMA([p], 0.5)
    e0 = torch.randn(4, generator=g)
    ema.load_state_dict({"decay": 0.5, "updates": 100, "shadow": [e0]})  # long past the warm-up: d = 0.5
    values = []
    for _ in range(6):
        with torch.no_grad():
            p.copy_(torch.randn(4, generator=g))
        values.append(p.detach().clone())
        ema.update()
    # e_N = d^N e_0 + sum_t (1 - d) d^(N - t) p_t
    torch.testing.assert_close(ema.shadow[0].double(), _closed_form(values, [0.5] * 6, e0), rtol=0, atol=1e-7)
    trained = p.detach().clone()
    with ema.applied():
        assert torch.equal(p, ema.shadow[0])
    assert torch.equal(p, trained)  # swapped back exactly
    again = EMA([p], 0.5)
    again.load_state_dict(copy.deepcopy(ema.state_dict()))
    for e in (ema, again):
        e.update()
    assert torch.equal(again.shadow[0], ema.shadow[0]) and again.updates == ema.updates == 107


class Killed(Exception):
    pass


def test_ema_file_is_the_average_of_the_steps_and_survives_a_kill(tmp_path, monkeypatch):
    from trainers import diffusion_outputs

    data, cache = _copy_data(tmp_path / "stripes"), tmp_path / "cache"
    args = ("--ema-decay", "0.9", "--steps", "4", "--save-every", "2", "--save-adapter-every", "1")
    render, sampled = diffusion_outputs.render_samples, []

    def spying_render(pipe, *rest, **kw):  # the weights the sample grid is rendered with
        sampled.append({f"unet.{k}": v.clone() for k, v in A.adapter_state_dict(pipe.unet, "stripes").items()})
        return render(pipe, *rest, **kw)

    monkeypatch.setattr(diffusion_outputs, "render_samples", spying_render)
    straight = _run(data, tmp_path / "straight", cache, *args)
    monkeypatch.setattr(diffusion_outputs, "render_samples", render)
    ema = _tensors(straight / "stripes-ema.safetensors")
    steps = [_tensors(straight / f"stripes-step{s:07d}.safetensors") for s in (1, 2, 3)]
    steps.append(_tensors(straight / "stripes.safetensors"))
    assert ema.keys() == steps[-1].keys()
    for key in ema:  # the warm-up's d_1 = 0: the average starts at step 1's weights
        want = _closed_form([s[key] for s in steps], _decays(4, 0.9), torch.zeros_like(ema[key]))
        torch.testing.assert_close(ema[key].double(), want, rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(ema[k], steps[-1][k]) for k in ema)
    assert len(sampled) == 1 and sampled[0].keys() == ema.keys()  # --sample-every 0: one grid, at the end
    assert all(torch.equal(sampled[0][k], ema[k]) for k in ema)  # rendered with the EMA weights

    write = validation.LossLog.write

    def dying_write(self, step, *rest):
        write(self, step, *rest)
        if step == 3:  # after the step-2 checkpoint, before the end
            raise Killed

    monkeypatch.setattr(validation.LossLog, "write", dying_write)
    with pytest.raises(Killed):
        _run(data, tmp_path / "killed", cache, *args)
    monkeypatch.setattr(validation.LossLog, "write", write)
    assert not (tmp_path / "killed" / "stripes-ema.safetensors").exists()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    resumed = _tensors(tmp_path / "killed" / "stripes-ema.safetensors")
    assert resumed.keys() == ema.keys() and all(torch.equal(resumed[k], ema[k]) for k in ema)


# -- timestep sampling ---------------------------------------------------------------------------

def _draw(name: str, seed: int = 0, n: int = 20000, **options) -> torch.Tensor:
    return timesteps.TimestepSampling(name, **options).draw(n, 1000, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(timesteps.SAMPLERS))
def test_timestep_draws_are_deterministic_and_in_range(name):
    t = _draw(name)
    assert t.dtype == torch.int64 and t.shape == (20000,) and t.min() >= 0 and t.max() <= 999
    assert torch.equal(t, _draw(name)) and not torch.equal(t, _draw(name, seed=1))
    assert len(t.unique()) > 500  # it covers the schedule, not a few values


def test_timestep_samplers_shift_the_mean_as_documented():
    uniform = _draw("uniform")
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    mean = {name: _draw(name).double().mean().item() for name in timesteps.SAMPLERS}
    # sigmoid(N(0, 1)) is symmetric about 0.5 and concentrated in the middle of the schedule
    assert abs(mean["uniform"] - 499.5) < 5 and abs(mean["logit-normal"] - 499.5) < 5
    assert _draw("logit-normal").double().std() < 0.8 * uniform.double().std()
    # shift 3 maps u = 0.5 to 0.75: the mean moves far towards noise (0.71 T with this seed), 1/3 towards detail (0.28 T)
    assert mean["shift"] > mean["uniform"] + 150
    assert _draw("shift", shift=1 / 3).double().mean() < mean["uniform"] - 150
    assert _draw("logit-normal", mean=1.0).double().mean() > mean["uniform"] + 100  # mean > 0: noisier
    assert torch.equal(_draw("shift", shift=1.0), _draw("logit-normal"))  # s = 1 is logit-normal itself


def test_bad_timestep_options_are_one_error_line(tmp_path, capsys):
    data = _copy_data(tmp_path / "stripes")
    out = tmp_path / "run"
    base = ["train", str(data), "--out", str(out), "--steps", "2"]
    line = one_error_line(capsys, [*base, "--timestep-sampling", "cosine"])
    assert "--timestep-sampling 'cosine'" in line and all(n in line for n in timesteps.SAMPLERS)
    assert "--timestep-std must be positive" in one_error_line(capsys, [*base, "--timestep-std", "0"])
    assert "--timestep-shift must be positive" in one_error_line(capsys, [*base, "--timestep-shift", "-1"])
    assert not out.exists()


# -- ReLoRA --------------------------------------------------------------------------------------

def test_relora_restart_keeps_the_function_and_the_file_holds_it(tmp_path):
    unet = _adapted_unet()  # LoRA rank 4 on the transformer set (Linears and 1x1 convs)
    torch.manual_seed(0)
    pristine = tiny_unet()  # the same base weights, no adapter
    params = A.trainable_parameters(unet, "a")
    optimizer = loop.make_optimizer([(params, 1e-2)], "adamw")
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 7, 32, generator=g)

    def output(model):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=ctx).sample

    def train_step():
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # as the trainer's hook does after a fused step (extras.Extras.stepped)
            torch.autograd.graph.increment_version(p)

    restarts = relora.ReLoRA({"unet": unet}, "a", every=2, warmup=1, prune=0.99, optimizer_name="adamw",
                             optimizer=optimizer, seed=0)
    train_step()
    for k in (1, 2):
        before = output(unet)
        old_A = [layer.adapters["a"].A.detach().clone() for _, _, layer in restarts.layers()]
        restarts.after_step(2 * k - 1, total=10)  # the end of cycle k
        torch.testing.assert_close(output(unet), before, rtol=1e-5, atol=1e-6)  # the merge is exact
        for (_, _, layer), A_old in zip(restarts.layers(), old_A):
            fresh, acc = layer.adapters["a"], layer.adapters["a_relora"]
            assert torch.count_nonzero(fresh.B) == 0 and not torch.equal(fresh.A, A_old)  # re-initialised
            assert acc.factors()[0].shape[0] == 4 * k and not any(p.requires_grad for p in acc.parameters())
        moments = [optimizer.state[p]["exp_avg"] for p in params]
        kept = sum(int(torch.count_nonzero(m)) for m in moments)
        assert 0 < kept <= sum(m.numel() - int(0.99 * m.numel()) for m in moments)  # 99 % pruned
        train_step()  # the fresh factors learn on top of the accumulated delta

    trained = output(unet)
    with restarts.folded():  # what the run's files hold: one plain LoRA of rank 8 + 4
        torch.testing.assert_close(output(unet), trained, rtol=1e-5, atol=1e-6)
        af = formats.from_models({"unet": unet}, "a")
    back = {id(p) for _, _, layer in restarts.layers() for p in layer.adapters["a"].parameters()}
    assert back == {id(p) for p in params}  # the trained adapter is put back, the optimizer's own tensors
    path = tmp_path / "folded.safetensors"
    formats.save(af, path, "native")
    formats.attach_file(formats.read(path), {"unet": pristine}, "a")
    torch.testing.assert_close(output(pristine), trained, rtol=1e-5, atol=1e-6)
    assert formats.read(path).parts["unet"].config["rank"] == 12


def test_relora_schedule_rewarms_after_each_restart():
    params = [torch.nn.Parameter(torch.zeros(2))]

    def lrs(name, warmup_steps, every, rewarm, total=12):
        opt = loop.make_optimizer([(params, 1.0)], "adamw")
        schedule = loop.make_schedule(opt, name, warmup_steps, total, "adamw", every, rewarm)
        values = []
        for _ in range(total):
            values.append(schedule.get_last_lr()[0])
            opt.step()
            schedule.step()
        return values

    # restarts after steps 3 and 7 (0-based t = 4, 8 start a cycle), re-warmed over 2 steps
    assert lrs("constant", 0, 4, 2) == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1, 1]
    assert lrs("constant", 0, 4, 4) == [1, 1, 1, 1, 0.25, 0.5, 0.75, 1, 0.25, 0.5, 0.75, 1]
    linear = lrs("linear", 2, 4, 2)  # the base schedule times the re-warmup factor
    base = [t / 2 if t < 2 else (12 - t) / 10 for t in range(12)]
    factor = [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1, 1]
    assert linear == pytest.approx([b * f for b, f in zip(base, factor)], abs=1e-12)
    assert relora.rewarm_steps(100, None) == 10 and relora.rewarm_steps(5, None) == 1
    assert optimizers.get("adamw").moments == ("exp_avg", "exp_avg_sq")  # what a restart prunes
