"""LoRA-XS (arXiv 2405.17604) against its definition: dW = s U_r R diag(S_r) V_r^T on the frozen top-r
SVD frame of W0, only the r x r R trained and saved, exported exactly as a rank-r plain LoRA."""

import json
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import studio.adapters as A
import studio.formats as SF
from builders import tiny_unet
from cli_helpers import one_error_line
from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from studio.adapters import common, lora_xs
from studio.cli import main
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "sample_data" / "mini-sd"


def frame(W0: torch.Tensor, r: int):
    """U_r, S_r, Vh_r of W0 by torch.linalg.svd, each u_i's largest-magnitude entry made positive (the
    file's documented rule, so a basis is the same whatever signs a LAPACK returns)."""
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    signs = torch.sign(U[U.abs().argmax(0), torch.arange(r)])
    return U * signs, S, Vh * signs[:, None]


def hand_delta(W0: torch.Tensor, R: torch.Tensor, scale: float) -> torch.Tensor:
    U, S, Vh = frame(W0, R.shape[0])
    return (scale * U @ R.double() @ torch.diag(S) @ Vh).float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


LAYERS = [  # (layer, input, rank, alpha): a Linear, a 1x1 conv, a strided 3x3 conv (LoCon layout)
    (lambda: nn.Linear(24, 16), (5, 24), 4, 8.0),
    (lambda: nn.Conv2d(12, 10, 1), (2, 12, 5, 5), 3, 3.0),
    (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), 4, 2.0),
]


@pytest.mark.parametrize("build,shape,rank,alpha", LAYERS, ids=["linear", "conv1x1", "conv3x3"])
def test_delta_is_u_r_s_v_by_hand_and_a_fresh_adapter_is_a_no_op(build, shape, rank, alpha):
    model = nn.Sequential(OrderedDict(to_k=build()))
    W0 = model.to_k.weight.detach().flatten(1).clone()
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
        A.attach(model, "xs", "lora_xs", A.make_config("lora_xs", {"rank": rank, "alpha": alpha}), ["to_k"])
        (R,) = A.trainable_parameters(model, "xs")
        # R starts at exactly 0, not the paper's N(0, 1e-5): attaching must change nothing (lora_xs.py says why)
        assert torch.equal(R, torch.zeros(rank, rank)) and torch.equal(model(x), before)
        R.copy_(torch.randn(rank, rank))
        want = hand_delta(W0, R, alpha / rank)
        got = A.delta_weights(model, "xs")["to_k"]
        assert _rel(got, want) < 1e-5
        # the output moves by exactly that delta: x @ dW^T (a convolution with dW as kernel)
        base = model.to_k.base
        moved = (F.linear(x, want) if isinstance(base, nn.Linear) else
                 F.conv2d(x, want.reshape(base.weight.shape), stride=base.stride, padding=base.padding))
        assert _rel(model(x) - before, moved) < 1e-4  # a difference of two fp32 outputs
    # R sits between U_r and diag(S_r) (the paper's x A R B with A = U_r S_r of its W = our W0^T):
    # the other order, U_r diag(S_r) R V_r^T, is a different delta for the same R
    U, S, Vh = frame(W0, rank)
    other = (alpha / rank * U @ torch.diag(S) @ R.detach().double() @ Vh).float()
    assert _rel(other, want) > 0.1


def test_gradient_at_init_is_the_papers_and_nonzero():
    """dL/dR = s U_r^T G X^T V_r diag(S_r) at R = 0: training starts from the zero init (LoRA's B = A = 0 would not)."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(to_k=nn.Linear(20, 12)))
    W0 = model.to_k.weight.detach().clone()
    A.attach(model, "xs", "lora_xs", A.make_config("lora_xs", {"rank": 4, "alpha": 2.0}), ["to_k"])
    x, target = torch.randn(7, 20), torch.randn(7, 12)
    y = model(x)
    ((y - target) ** 2).sum().backward()
    G = 2 * (y - target).detach()  # dL/dy (7, 12)
    (R,) = A.trainable_parameters(model, "xs")
    U, S, Vh = frame(W0, 4)
    want = (0.5 * U.T @ G.double().T @ x.double() @ Vh.T @ torch.diag(S)).float()
    assert R.grad.abs().max() > 1e-3 and _rel(R.grad, want) < 1e-5


def test_frame_does_not_depend_on_the_signs_the_svd_returns(monkeypatch):
    """Another LAPACK (a GPU's) may flip singular pairs; the canonical signs give the same delta from one saved R."""
    torch.manual_seed(2)
    W0 = torch.randn(16, 24)
    site = A.contract.Site("to_k", 16, 24)
    cfg = A.make_config("lora_xs", {"rank": 5})
    saved = {"R": torch.randn(5, 5), "basis_hash": common.hash_to_tensor(common.weight_hash(W0))}
    down, up = lora_xs.factors(cfg, lora_xs.from_saved(cfg, W0, saved, site))
    want = up @ down
    flips = torch.tensor([1.0, -1, -1, 1, -1] + [1] * 11)

    def flipped(W, h=None):
        U, S, Vh, h = common.cached_svd(W, h)
        return common.Basis(U * flips, S, Vh * flips[:, None], h)

    monkeypatch.setattr(lora_xs, "cached_svd", flipped)
    down, up = lora_xs.factors(cfg, lora_xs.from_saved(cfg, W0, saved, site))
    assert _rel(up @ down, want) < 1e-6
    with pytest.raises(StudioError, match="basis hash mismatch"):  # R means nothing on another weight
        lora_xs.from_saved(cfg, W0 + 1e-3, saved, site)


def test_only_r_squared_values_train_per_layer():
    unet = tiny_unet()
    cfg = A.make_config("lora_xs", {"rank": 4, "conv_rank": 2})
    paths = A.attach(unet, "xs", "lora_xs", cfg, "unet-full")
    convs = [p for p in paths if unet.get_submodule(p).site.is_conv]
    assert convs and len(convs) < len(paths)
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == 16 * (len(paths) - len(convs)) + 4 * len(convs)
    assert {tuple(p.shape) for p in trained} == {(4, 4), (2, 2)}
    assert sum(p.numel() for p in trained) == sum(p.numel() for p in A.trainable_parameters(unet, "xs"))


# -- the CLI on the mini base: train, the tiny file, exact plain-LoRA export -------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps of `studio train --method lora_xs --rank 4` on six stripes images, 3x3 convs too (conv rank 2)."""
    tmp = tmp_path_factory.mktemp("xs")
    data = tmp / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:6]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    out = tmp / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2", "--sample-every", "0",
                 "--save-every", "4", "--set", f"cache_dir={tmp / 'cache'}", "--set", "sample_steps=2",
                 "--method", "lora_xs", "--rank", "4", "--targets", "unet-full", "--conv-rank", "2"]) == 0
    return out


def _tensor_bytes(path: Path) -> int:
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, header, data


def test_training_moves_r_and_the_loss_stays_finite(run):
    losses = [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    af = SF.read(run / "stripes.safetensors")
    assert af.method == "lora_xs" and list(af.parts) == ["unet"]
    R = {k: v for k, v in af.parts["unet"].tensors.items() if k.endswith(".R")}
    assert R and all(v.abs().max() > 0 for v in R.values())  # every layer left its zero init


def test_native_file_holds_only_r_and_the_base_hash_and_is_tiny(run, tmp_path):
    from studio.models import load_diffusion_base

    path = run / "stripes.safetensors"
    part = SF.read(path).parts["unet"]
    modules = part.modules()
    assert all(set(t) == {"R", "basis_hash"} for t in modules.values())
    assert part.config["rank"] == 4 and part.config["conv_rank"] == 2  # with W0 this rebuilds U_r, S_r, V_r
    r2 = sum(t["R"].numel() for t in modules.values())
    assert _tensor_bytes(path) == 4 * r2 + common.HASH_BYTES * len(modules)
    # a LoRA of the same ranks on the same layers, saved the same way
    unet = load_diffusion_base().components["unet"]
    A.attach(unet, "lora", "lora", A.make_config("lora", {"rank": 4, "conv_rank": 2}), list(modules))
    SF.save(SF.from_models({"unet": unet}, "lora"), tmp_path / "lora.safetensors")
    lora_data, lora_file = _tensor_bytes(tmp_path / "lora.safetensors"), (tmp_path / "lora.safetensors").stat().st_size
    print(f"LoRA-XS {path.stat().st_size} B ({_tensor_bytes(path)} B of tensors), LoRA {lora_file} B ({lora_data} B)")
    assert 10 * _tensor_bytes(path) < lora_data and path.stat().st_size < lora_file / 2


def test_kohya_export_with_the_base_is_the_exact_rank_r_delta(run, tmp_path, capsys):
    from studio.models import load_diffusion_base

    native, kohya = run / "stripes.safetensors", tmp_path / "xs.kohya.safetensors"
    assert "--base" in one_error_line(capsys, ["export", str(native), "--format", "kohya", "-o", str(kohya)])
    assert not kohya.exists()
    assert main(["export", str(native), "--base", str(MINI), "--format", "kohya", "--dtype", "fp32",
                 "-o", str(kohya)]) == 0
    assert "rank 2, 4" in capsys.readouterr().out  # conv rank 2, rank 4: no rank is lost or added
    want_models = load_diffusion_base().components
    SF.attach_file(SF.read(native), want_models, "xs")
    got_models = load_diffusion_base().components
    SF.attach_file(SF.read(kohya), got_models, "k")
    want, got = A.delta_weights(want_models["unet"], "xs"), A.delta_weights(got_models["unet"], "k")
    assert sorted(got) == sorted(want)
    for path, dW in want.items():
        assert _rel(got[path], dW) < 1e-5, path


# -- a tiny LM and bad input ---------------------------------------------------------------------------
def test_lm_training_moves_r(tiny_lm, tmp_path):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    assert main(["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--save-every", "3", "--method", "lora_xs", "--rank", "4"]) == 0
    part = SF.read(out / "pirate.safetensors").parts["lm"]
    R = [t["R"] for t in part.modules().values()]
    assert len(R) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(v.shape == (4, 4) and v.abs().max() > 0 and torch.isfinite(v).all() for v in R)
    # the file reloads on its base (hashes match, frames rebuilt) and moves the response loss, finitely
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters
    from trainers import data_text

    base, tokenizer = load_causal_lm(str(tiny_lm))
    adapted, _ = load_with_adapters(str(tiny_lm), [(str(out / "pirate.safetensors"), 1.0)])
    batch = data_text.collate(data_text.load_examples(data, tokenizer, 64, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        before, after = base(**batch).loss.item(), adapted(**batch).loss.item()
    assert torch.isfinite(torch.tensor(after)) and abs(after - before) > 1e-4, (before, after)


def test_rank_above_the_layer_is_one_error_line_and_writes_nothing(tiny_lm, tmp_path, capsys):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    line = one_error_line(capsys, ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out),
                                   "--steps", "2", "--method", "lora_xs", "--rank", "20"])
    assert "rank 20 is larger than min(out, in) = 16" in line and "k_proj" in line and "--rank 16" in line
    assert not out.exists()
