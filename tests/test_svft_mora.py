"""SVFT (arXiv 2405.19597) and MoRA (arXiv 2405.12130) against their definitions.

SVFT: dW = U M V^T on the full (canonically signed) singular bases of W0, M trained only on its pattern
(plain: the diagonal; banded: |i - j| <= d). MoRA: dW is the matrix of x -> f_decomp(M f_comp(x)) with the
paper's sharing and rotation operators, M square with LoRA rank r's parameter count. Both: native files
reload exactly, plain-LoRA exports report the error they make, training runs on the mini base and a tiny LM.
"""

import json
import math
import shutil
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
from studio.adapters import common, mora, svft
from studio.cli import main
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "sample_data" / "mini-sd"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _layer_out(base, x, W):
    """The layer's output moved by a weight delta W (out, in * kh * kw)."""
    if isinstance(base, nn.Linear):
        return F.linear(x, W)
    return F.conv2d(x, W.reshape(base.weight.shape), stride=base.stride, padding=base.padding)


LAYERS = [  # (layer, input): a Linear, a 1x1 conv (out > in), a padded 3x3 conv (in * 9 > out)
    (lambda: nn.Linear(20, 12), (5, 20)),
    (lambda: nn.Conv2d(10, 14, 1), (2, 10, 4, 4)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 6)),
]
LAYER_IDS = ["linear", "conv1x1", "conv3x3"]


def _stripes(tmp: Path) -> Path:
    data = tmp / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:6]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    return data


def _train_mini(tmp: Path, *method: str) -> Path:
    """4 steps of `studio train` on six stripes images, UNet attention and 3x3 convs (unet-full)."""
    out = tmp / "run"
    assert main(["train", str(_stripes(tmp)), "--out", str(out), "--steps", "4", "--batch-size", "2",
                 "--sample-every", "0", "--save-every", "4", "--set", f"cache_dir={tmp / 'cache'}",
                 "--set", "sample_steps=2", "--targets", "unet-full", *method]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    return out


def _reload_is_exact(path: Path, tmp: Path, name: str):
    """The file attached to the mini base, saved again and re-attached: bit-identical deltas."""
    from studio.models import load_diffusion_base

    first = load_diffusion_base().components
    SF.attach_file(SF.read(path), first, name)
    again = tmp / "again.safetensors"
    SF.save(SF.from_models({"unet": first["unet"]}, name), again)
    second = load_diffusion_base().components
    SF.attach_file(SF.read(again), second, name)
    want, got = A.delta_weights(first["unet"], name), A.delta_weights(second["unet"], name)
    assert sorted(got) == sorted(want) and want
    for path_, dW in want.items():
        assert torch.equal(got[path_], dW), path_
    return first, want


def _export_error_is_the_measured_one(af, tmp: Path, rank: int, models: dict | None, want: dict):
    """A kohya export at ``rank`` reports ||dW - dW_file|| / ||dW|| as measured on the reloaded file."""
    from studio.models import load_diffusion_base

    path = tmp / "plain.kohya.safetensors"
    report = SF.save(af, path, "kohya", rank=rank, dtype="fp32", models=models)
    assert report.ranks == [rank] and 0 < report.relative_error < 1
    got_models = load_diffusion_base().components
    SF.attach_file(SF.read(path), got_models, "k")
    got = A.delta_weights(got_models["unet"], "k")
    err2 = sum((got[p].double() - dW.double()).square().sum() for p, dW in want.items())
    norm2 = sum(dW.double().square().sum() for dW in want.values())
    measured = math.sqrt(err2 / norm2)
    assert abs(report.relative_error - measured) <= 1e-4 * measured, (report.relative_error, measured)
    return report


def _lm_run(tiny_lm, tmp_path, *method: str):
    """3 steps on the pirate task; the file reloads on its base and moves the response loss, finitely."""
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters
    from trainers import data_text

    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    assert main(["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--save-every", "3", *method]) == 0
    part = SF.read(out / "pirate.safetensors").parts["lm"]
    base, tokenizer = load_causal_lm(str(tiny_lm))
    adapted, _ = load_with_adapters(str(tiny_lm), [(str(out / "pirate.safetensors"), 1.0)])
    batch = data_text.collate(data_text.load_examples(data, tokenizer, 64, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        before, after = base(**batch).loss.item(), adapted(**batch).loss.item()
    assert math.isfinite(after) and abs(after - before) > 1e-4, (before, after)
    return part


# == SVFT ==================================================================================================
def canonical_frame(W0: torch.Tensor):
    """The full thin SVD of W0 by torch.linalg.svd (double), each u_i's largest-magnitude entry positive."""
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    signs = torch.sign(U[U.abs().argmax(0), torch.arange(U.shape[1])])
    return U * signs, S, Vh * signs[:, None]


def band_offsets(d: int):
    """The documented order of m: diagonal 0, then +1, -1, +2, -2, ..."""
    return [0] + [o for k in range(1, d + 1) for o in (k, -k)]


def hand_core(m: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """M (n, n) from m by hand: diagonal o holds M[i, i + o] for every row i it crosses, top row first."""
    M, k = torch.zeros(n, n, dtype=torch.float64), 0
    for o in band_offsets(min(d, n - 1)):
        for i in range(n):
            if 0 <= i + o < n:
                M[i, i + o] = m[k]
                k += 1
    assert k == m.numel()
    return M


PATTERNS = [({"pattern": "plain"}, 0), ({"pattern": "banded", "bands": 2}, 2), ({"pattern": "banded", "bands": 3}, 3)]


@pytest.mark.parametrize("options,d", PATTERNS, ids=["plain", "banded2", "banded3"])
@pytest.mark.parametrize("build,shape", LAYERS, ids=LAYER_IDS)
def test_svft_delta_is_u_m_vt_by_hand_and_m_has_exactly_the_patterns_entries(build, shape, options, d):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(to_k=build()))
    W0 = model.to_k.weight.detach().flatten(1).clone()
    n = min(W0.shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
        A.attach(model, "s", "svft", A.make_config("svft", options), ["to_k"])
        (m,) = A.trainable_parameters(model, "s")
        # the pattern's size: n for plain, n (2d + 1) - d (d + 1) banded (paper section 3)
        mask = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= d
        assert m.numel() == int(mask.sum()) == n * (2 * d + 1) - d * (d + 1)
        assert torch.equal(m, torch.zeros_like(m)) and torch.equal(model(x), before)  # m = 0: a no-op at init
        m.copy_(torch.randn(m.shape))
        U, S, Vh = canonical_frame(W0)
        M = hand_core(m, n, d)
        want = U @ M @ Vh
        got = A.delta_weights(model, "s")["to_k"]
        assert _rel(got, want) < 1e-5
        assert _rel(model(x) - before, _layer_out(model.to_k.base, x, want.float())) < 1e-4
        # back in the singular frame the delta is M: non-zero exactly on the pattern
        core = U.T @ got.double() @ Vh.T
        assert core[~mask].abs().max() < 1e-5 * core.abs().max()
        assert core[mask].abs().min() > 1e-4 and _rel(core, M) < 1e-5
        assert torch.equal(svft.core(svft.Config(**options), model.to_k.adapters["s"].state()) != 0, mask)


def test_svft_banded_delta_does_not_depend_on_the_signs_the_svd_returns(monkeypatch):
    """A banded M couples pairs i != j: another LAPACK's sign flips must not change a saved m's delta."""
    torch.manual_seed(2)
    W0 = torch.randn(16, 24)
    site = A.contract.Site("to_k", 16, 24)
    cfg = A.make_config("svft", {"pattern": "banded", "bands": 2})
    saved = {"m": torch.randn(svft.count(cfg, 16)), "basis_hash": common.hash_to_tensor(common.weight_hash(W0))}
    down, up = svft.factors(cfg, svft.from_saved(cfg, W0, saved, site))
    want = up @ down
    flips = torch.tensor([1.0, -1, -1, 1, -1] + [1] * 11)

    def flipped(W, h=None):
        U, S, Vh, h = common.cached_svd(W, h)
        return common.Basis(U * flips, S, Vh * flips[:, None], h)

    monkeypatch.setattr(svft, "cached_svd", flipped)
    down, up = svft.factors(cfg, svft.from_saved(cfg, W0, saved, site))
    assert _rel(up @ down, want) < 1e-6
    with pytest.raises(StudioError, match="basis hash mismatch"):
        svft.from_saved(cfg, W0 + 1e-3, saved, site)


def test_svft_own_svd_is_the_svd_of_its_delta():
    """The export's SVD (U P, sigma, Q^T Vh from M's n x n SVD) equals torch.linalg.svd of the dense delta."""
    torch.manual_seed(3)
    W0 = torch.randn(14, 9)
    site = A.contract.Site("to_k", 14, 9)
    for options in ({"pattern": "plain"}, {"pattern": "banded", "bands": 3}):
        cfg = A.make_config("svft", options)
        state = svft.init(cfg, W0, site)
        state["m"] = torch.randn(state["m"].shape)
        down, up = svft.factors(cfg, state)
        U, g, Vh = svft.svd(cfg, state)
        dW = (up @ down).double()
        assert _rel(U @ torch.diag(g) @ Vh, dW) < 1e-5
        assert torch.allclose(g.abs().sort(descending=True).values.double(), torch.linalg.svdvals(dW), atol=1e-5)


def test_svft_trained_values_per_layer_on_the_tiny_unet():
    for options, d in PATTERNS[:2]:
        unet = tiny_unet()
        paths = A.attach(unet, "s", "svft", A.make_config("svft", options), "unet-full")
        sizes = [min(unet.get_submodule(p).pristine_weight.shape) for p in paths]
        assert any(unet.get_submodule(p).site.is_conv for p in paths)
        trained = [p for p in unet.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trained) == sum(n * (2 * d + 1) - d * (d + 1) for n in sizes)


@pytest.fixture(scope="module")
def svft_run(tmp_path_factory):
    return _train_mini(tmp_path_factory.mktemp("svft"), "--method", "svft", "--method-args", "pattern=banded",
                       "bands=2")


def test_svft_mini_base_training_file_reload_and_export(svft_run, tmp_path, capsys):
    path = svft_run / "stripes.safetensors"
    af = SF.read(path)
    assert af.method == "svft"
    assert af.parts["unet"].config == {"pattern": "banded", "bands": 2, "k": None, "seed": None}
    modules = af.parts["unet"].modules()
    assert modules and all(set(t) == {"m", "basis_hash"} for t in modules.values())
    assert all(t["m"].abs().max() > 0 for t in modules.values())  # every layer left its zero init
    models, want = _reload_is_exact(path, tmp_path, "s")
    # a plain LoRA needs the base (U, V come from W0), and reports the error of the truncation
    kohya = tmp_path / "no-base.safetensors"
    assert "--base" in one_error_line(capsys, ["export", str(path), "--format", "kohya", "--rank", "4",
                                               "-o", str(kohya)])
    assert not kohya.exists()
    report = _export_error_is_the_measured_one(af, tmp_path, 4, models, want)
    print(f"SVFT banded d=2 -> kohya rank 4: retained energy {report.energy:.4f}, "
          f"relative error {report.relative_error:.4f}")


def test_svft_tiny_lm_training(tiny_lm, tmp_path):
    part = _lm_run(tiny_lm, tmp_path, "--method", "svft")
    m = [t["m"] for t in part.modules().values()]
    assert len(m) == 2 * 7 and all(v.abs().max() > 0 and torch.isfinite(v).all() for v in m)
    assert {v.numel() for v in m} == {16, 32}  # min(out, in) per projection of the width-32, 2-KV-head Llama


def test_svft_bad_options_are_one_error_line_and_write_nothing(tiny_lm, tmp_path, capsys):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    args = ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "2",
            "--method", "svft", "--method-args"]
    line = one_error_line(capsys, args + ["pattern=diagonal"])
    assert "unknown SVFT pattern 'diagonal'" in line and "pattern=banded" in line
    assert "bands=3 does not apply to pattern=plain" in one_error_line(capsys, args + ["bands=3"])
    assert "at least 1" in one_error_line(capsys, args + ["pattern=banded", "bands=0"])
    assert not out.exists()


# == MoRA ==================================================================================================
def loop_delta(M: torch.Tensor, out: int, inp: int, kind: str) -> torch.Tensor:
    """dW column by column: dW e_i = f_decomp(M f_comp(e_i)), the operators written out element by element.

    The input is padded to c = ceil(in / r^) chunks of r^ by wrapping around (padded p = x[p mod in]).
    sharing: f_comp sums the chunks, f_decomp repeats the r^ outputs; rotation: each chunk j is rotated by
    angles j / 10000^(2t / r^) in the rotate-half layout (pair t with t + r^/2), multiplied by M on its own,
    the chunk outputs are concatenated and repeated / cut to out."""
    M = M.double()
    r = M.shape[0]
    chunks = -(-inp // r)
    h = r // 2
    dW = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(inp):
        x = [1.0 if p % inp == i else 0.0 for p in range(chunks * r)]
        if kind == "sharing":
            z = M @ torch.tensor([sum(x[c * r + j] for c in range(chunks)) for j in range(r)], dtype=torch.float64)
            y = [z[k % r] for k in range(out)]
        else:
            flat = []
            for c in range(chunks):
                v = x[c * r:(c + 1) * r]
                rotated = []
                for t in range(r):
                    angle = c / 10000 ** (2 * (t % h) / r)
                    partner = -v[t + h] if t < h else v[t - h]
                    rotated.append(v[t] * math.cos(angle) + partner * math.sin(angle))
                flat += (M @ torch.tensor(rotated, dtype=torch.float64)).tolist()
            y = [flat[k % len(flat)] for k in range(out)]
        dW[:, i] = torch.tensor([float(v) for v in y], dtype=torch.float64)
    return dW


SHAPES = [(12, 20, 2), (20, 12, 2), (9, 30, 1), (30, 9, 1), (16, 16, 3), (7, 5, 1)]
"""(out, in, rank): wider and taller, chunks that do and do not divide in, r^ above min(out, in)."""


@pytest.mark.parametrize("kind", mora.TYPES)
@pytest.mark.parametrize("out,inp,rank", SHAPES)
def test_mora_delta_weight_equals_the_operators_written_as_loops(out, inp, rank, kind):
    torch.manual_seed(out * inp)
    cfg = A.make_config("mora", {"rank": rank, "type": kind})
    site = A.contract.Site("to_k", out, inp)
    state = mora.init(cfg, torch.zeros(out, inp), site)
    r_hat = state["M"].shape[0]
    floor = math.isqrt((out + inp) * rank)
    assert r_hat == (floor - floor % 2 if kind == "rotation" else floor)
    state["M"] = torch.randn(r_hat, r_hat)
    want = loop_delta(state["M"], out, inp, kind)
    assert _rel(mora.delta_weight(cfg, state, torch.zeros(out, inp)), want) < 1e-6
    assert _rel(mora.delta_weight(cfg, state, None), want) < 1e-6  # the stored shape serves without W0


@pytest.mark.parametrize("kind", mora.TYPES)
@pytest.mark.parametrize("build,shape", LAYERS, ids=LAYER_IDS)
def test_mora_output_is_base_plus_x_dw_t_and_zero_init_is_the_base(build, shape, kind):
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(to_k=build()))
    x = torch.randn(*shape)
    W0 = model.to_k.weight.detach().flatten(1)
    with torch.no_grad():
        before = model(x)
        A.attach(model, "m", "mora", A.make_config("mora", {"rank": 2, "type": kind}), ["to_k"])
        (M,) = A.trainable_parameters(model, "m")
        assert torch.equal(M, torch.zeros_like(M)) and torch.equal(model(x), before)
        M.copy_(torch.randn(M.shape))
        dW = loop_delta(M, *W0.shape, kind).float()
        assert _rel(model(x), before + _layer_out(model.to_k.base, x, dW)) < 1e-5


def test_mora_has_loras_parameter_count_and_reaches_rank_above_r():
    unet = tiny_unet()
    A.attach(unet, "lora", "lora", A.make_config("lora", {"rank": 4}), "unet-full")
    lora_counts = {p: sum(t.numel() for t in layer.adapters["lora"].parameters())
                   for p, layer in A.targets.adapted_layers(unet).items()}
    A.detach(unet, "lora")
    for kind, step in (("sharing", 1), ("rotation", 2)):
        A.attach(unet, kind, "mora", A.make_config("mora", {"rank": 4, "type": kind}), "unet-full")
        for path, layer in A.targets.adapted_layers(unet).items():
            r_hat = layer.adapters[kind].M.shape[0]
            # r^ = floor(sqrt((in + out) r)) (even for rotation): r^2 <= LoRA's count < (r^ + step)^2
            assert r_hat ** 2 <= lora_counts[path] < (r_hat + step) ** 2, (path, r_hat)
        A.detach(unet, kind)
    # MoRA's point: the same budget updates at a rank above r (sharing reaches r^, rotation min(out, in))
    torch.manual_seed(0)
    for kind, want in (("sharing", 16), ("rotation", 64)):
        cfg = A.make_config("mora", {"rank": 2, "type": kind})
        state = mora.init(cfg, torch.zeros(64, 64), A.contract.Site("x", 64, 64))
        state["M"] = torch.randn(state["M"].shape)
        assert state["M"].shape == (16, 16)  # sqrt(128 * 2)
        assert torch.linalg.matrix_rank(mora.delta_weight(cfg, state, torch.zeros(64, 64)).double()) == want


@pytest.fixture(scope="module")
def mora_run(tmp_path_factory):
    return _train_mini(tmp_path_factory.mktemp("mora"), "--method", "mora", "--rank", "4")


def test_mora_mini_base_training_file_reload_and_export_without_base(mora_run, tmp_path):
    path = mora_run / "stripes.safetensors"
    af = SF.read(path)
    assert af.method == "mora" and af.parts["unet"].config["type"] == "rotation"
    modules = af.parts["unet"].modules()
    assert modules and all(set(t) == {"M", "shape"} for t in modules.values())
    assert all(t["M"].abs().max() > 0 and torch.isfinite(t["M"]).all() for t in modules.values())
    _, want = _reload_is_exact(path, tmp_path, "m")
    report = _export_error_is_the_measured_one(af, tmp_path, 4, None, want)  # no base: the file has the shapes
    print(f"MoRA rank 4 (rotation) -> kohya rank 4: retained energy {report.energy:.4f}, "
          f"relative error {report.relative_error:.4f}")


def test_mora_tiny_lm_training(tiny_lm, tmp_path):
    part = _lm_run(tiny_lm, tmp_path, "--method", "mora", "--rank", "2", "--method-args", "type=sharing")
    M = [t["M"] for t in part.modules().values()]
    assert len(M) == 2 * 7 and all(v.abs().max() > 0 and torch.isfinite(v).all() for v in M)
    # q (32 x 32): sqrt(64 * 2) -> 11; k (16 x 32): sqrt(48 * 2) -> 9; gate (64 x 32): sqrt(96 * 2) -> 13
    assert {v.shape[0] for v in M} == {11, 9, 13}


def test_mora_bad_input_is_one_error_line_and_writes_nothing(tiny_lm, tmp_path, capsys):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    args = ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "2",
            "--method", "mora"]
    line = one_error_line(capsys, args + ["--method-args", "type=rope"])
    assert "unknown MoRA type 'rope'" in line and "type=sharing" in line
    line = one_error_line(capsys, args + ["--rank", "40"])
    assert "MoRA rank 40 gives r^ = " in line and "outside 2..max(out, in) = " in line and "--rank " in line
    suggested = int(line.split("--rank ")[1].split()[0])
    assert main(args[:-2] + ["--out", str(tmp_path / "ok"), "--steps", "1", "--save-every", "1", "--method", "mora",
                             "--rank", str(suggested)]) == 0  # the suggested rank fits every layer
    assert not out.exists()
