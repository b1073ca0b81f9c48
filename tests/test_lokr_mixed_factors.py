"""LoKr files whose modules are split by different rules (issue 16), imported exactly (lokr_shapes.py).

1. SimpleTuner's recommended LoKr config: LyCORIS's ``module_algo_map`` gives attention factor 16 and the
   feed-forward factor 8. On the tiny SD1.5 layout that splits a 32 x 32 attention weight as W1 (2, 2) x
   W2 (16, 16) and the feed-forward's 32 -> 256 as W1 (8, 4) x W2 (32, 8): no one factor gives both. The
   file (LyCORIS's generic wrapper, SimpleTuner's names and header) must give LyCORIS's outputs at weight
   1 and 0.5, mix, round-trip natively bit for bit, re-export with ``--format lycoris`` to a file LyCORIS
   loads to the same outputs, and convert to a plain LoRA exactly.
2. ai-toolkit writes the factor pair unsorted: W1 (8, 8), W2 (4, 4) on a 32 x 32 layer (W1 the larger half
   on both sides), which no LyCORIS factor gives; it applies as kron(W1, W2), by the closed form, and
   re-exports in LyCORIS's layout as W1 = [[1]], W2 = kron(W1, W2), the split LyCORIS's loader rebuilds.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from formats_helpers import tiny_sd, unet_sample
from studio.adapters import lokr
from studio.adapters.contract import Site
from studio.cli import main
from studio.errors import StudioError

PRESET = Path(__file__).parent / "data" / "lycoris_preset.toml"
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0."
Q, K, V = (BLOCK + f"attn1.to_{x}" for x in "qkv")          # Linear 32 -> 32
FF_IN, FF_OUT = BLOCK + "ff.net.0.proj", BLOCK + "ff.net.2"  # Linear 32 -> 256 (GEGLU), 128 -> 32
ALGO_MAP = {"target_module": ["Attention", "FeedForward"],
            "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}
SIMPLETUNER = {  # case -> lycoris_config: SimpleTuner's preset (full halves), and with W2 factored (rank 2)
    "full": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
             "apply_preset": ALGO_MAP},
    "factored": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 1, "factor": 16,
                 "apply_preset": ALGO_MAP},
}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


@pytest.fixture
def lycoris_presets(monkeypatch):
    """LyCORIS keeps its presets in class attributes (generic and kohya wrappers): restore them after each test."""
    from lycoris import LycorisNetwork
    from lycoris.kohya import LycorisNetworkKohya
    for cls in (LycorisNetwork, LycorisNetworkKohya):
        for attr, value in list(vars(cls).items()):
            if attr.isupper():
                monkeypatch.setattr(cls, attr, copy.copy(value))


def _close(got, want, rel=1e-4):
    error = (got - want).abs().max().item()
    assert error <= rel * want.abs().max().item(), f"max error {error:.3g}"


def _simpletuner(sd, path, config, seed=1):
    """As SimpleTuner: apply_preset, create_lycoris on the UNet, apply_to, save_weights with its header."""
    from lycoris import LycorisNetwork, create_lycoris
    ly = copy.deepcopy(sd)
    LycorisNetwork.apply_preset(config["apply_preset"])
    kwargs = {k: v for k, v in config.items() if k not in ("multiplier", "linear_dim", "linear_alpha", "apply_preset")}
    net = create_lycoris(ly["unet"], config["multiplier"], config["linear_dim"], config["linear_alpha"], **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the init (W2's last factor is zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})
    return ly, net


def _w1_shapes(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k.rsplit(".", 1)[0]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                if k.endswith((".lokr_w1", ".lokr_w1_a"))}


def _lycoris_loads(sd, path):
    """LyCORIS's kohya loader on a studio export (kohya names): the UNet it adapts."""
    import lycoris.kohya as lycoris_kohya
    from lycoris.utils.preset import read_preset
    lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(PRESET)))  # (its loader builds a network first)
    again = copy.deepcopy(sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, again["te"], again["unet"],
                                                       weights_sd=F.files.read(path)[0])
    net.apply_to(again["te"], again["unet"], apply_text_encoder=False, apply_unet=True)
    return again["unet"], net


# -- 1. SimpleTuner's per-module factors ---------------------------------------------------------
@pytest.mark.parametrize("case", list(SIMPLETUNER))
def test_a_module_algo_map_file_applies_as_lycoris_applies_it(sd, tmp_path, lycoris_presets, case):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ly, net = _simpletuner(sd, path, SIMPLETUNER[case])
    shapes = _w1_shapes(path)
    assert shapes[f"lycoris_{Q.replace('.', '_')}"] == (2, 2)  # factor 16 on 32: (2, 16)
    assert shapes[f"lycoris_{FF_IN.replace('.', '_')}"] == (8, 4)  # factor 8: 256 = 8 x 32, 32 = 4 x 8
    af = F.read(path)
    part = af.parts["unet"]
    assert part.method == "lokr" and part.config["factor"] == 16 and part.config["module_shapes"]
    assert len(part.modules()) == len(net.loras)
    ours = copy.deepcopy(sd)
    F.attach_file(af, ours, "ly")
    want = unet_sample(ly["unet"])
    assert (want - unet_sample(sd["unet"])).abs().max() > 1e-2  # the network does something
    _close(unet_sample(ours["unet"]), want)
    net.set_multiplier(0.5)
    F.set_file_weight(ours, "ly", 0.5)
    _close(unet_sample(ours["unet"]), unet_sample(ly["unet"]))
    A.merge(ours["unet"])  # as the mixer renders a settled mix
    _close(unet_sample(ours["unet"]), unet_sample(ly["unet"]))


def test_a_module_algo_map_file_round_trips_natively_and_through_lycoris_exactly(sd, tmp_path, lycoris_presets):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ly, _ = _simpletuner(sd, path, SIMPLETUNER["factored"])
    af = F.read(path)
    ours = copy.deepcopy(sd)
    F.attach_file(af, ours, "ly")
    want = unet_sample(ours["unet"])
    for fmt in ("native", "lycoris"):  # through the CLI, as a user converts it
        out = tmp_path / f"again-{fmt}.safetensors"
        assert main(["export", str(path), "--format", fmt, "--dtype", "fp32", "-o", str(out)]) == 0
        back = F.read(out)
        assert A.make_config("lokr", back.parts["unet"].config) == A.make_config("lokr", af.parts["unet"].config)
        got = back.parts["unet"].tensors
        assert sorted(got) == sorted(af.parts["unet"].tensors)
        for k, t in af.parts["unet"].tensors.items():
            assert torch.equal(got[k], t), k
        again = copy.deepcopy(sd)
        F.attach_file(back, again, "b")
        assert torch.equal(unet_sample(again["unet"]), want)
    # LyCORIS's own loader reads the --format lycoris file, every module in the file's own split
    assert _w1_shapes(tmp_path / "again-lycoris.safetensors")[f"lora_unet_{FF_IN.replace('.', '_')}"] == (8, 4)
    unet, net = _lycoris_loads(sd, tmp_path / "again-lycoris.safetensors")
    assert len(net.unet_loras) == len(af.parts["unet"].modules())
    _close(unet_sample(unet), unet_sample(ly["unet"]))


def test_a_module_algo_map_file_mixes_and_converts_to_a_plain_lora_exactly(sd, tmp_path, lycoris_presets):
    files = []
    for i, case in enumerate(SIMPLETUNER):
        path = tmp_path / f"{case}.safetensors"
        _simpletuner(sd, path, SIMPLETUNER[case], seed=i + 1)
        files.append(F.read(path))
    mixed = copy.deepcopy(sd)
    for i, (af, w) in enumerate(zip(files, (0.7, -0.4))):
        F.attach_file(af, mixed, f"m{i}", weight=w)
    want = unet_sample(mixed["unet"])
    baked, summary = F.bake([(files[0], 0.7, None), (files[1], -0.4, None)], models=sd)
    assert summary["energy"] == pytest.approx(1.0) and {p.method for p in baked.parts.values()} == {"lora"}
    one = copy.deepcopy(sd)
    F.attach_file(baked, one, "baked")
    _close(unet_sample(one["unet"]), want)
    # one file alone as a plain kohya LoRA: exact at full rank, its delta the LoKr's
    report = F.save(files[0], tmp_path / "plain.safetensors", "kohya", energy=1.0, dtype="fp32", models=sd)
    assert report.energy == pytest.approx(1.0, abs=1e-9) and report.relative_error < 1e-5
    plain, lokr_file = copy.deepcopy(sd), copy.deepcopy(sd)
    F.attach_file(F.read(tmp_path / "plain.safetensors"), plain, "p")
    F.attach_file(files[0], lokr_file, "k")
    want, got = A.delta_weights(lokr_file["unet"], "k"), A.delta_weights(plain["unet"], "p")
    assert sorted(got) == sorted(want)
    for module, dW in want.items():
        assert (got[module] - dW).norm() <= 1e-5 * dW.norm(), module


# -- 2. ai-toolkit's unsorted pairs ----------------------------------------------------------------
def _name(path):
    return "lora_unet_" + path.replace(".", "_")


def _ai_toolkit(tmp_path):
    """W1 the larger half on both sides (to_q, and to_v with W2 factored at rank 2, alpha 1), beside a
    LyCORIS-sorted pair (to_k: factor 4 gives W1 (4, 4), W2 (8, 8))."""
    g = torch.Generator().manual_seed(0)
    modules = {Q: {"lokr_w1": torch.randn(8, 8, generator=g), "lokr_w2": torch.randn(4, 4, generator=g)},
               K: {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(8, 8, generator=g)},
               V: {"lokr_w1": torch.randn(8, 8, generator=g), "lokr_w2_a": torch.randn(4, 2, generator=g),
                   "lokr_w2_b": torch.randn(2, 4, generator=g), "alpha": torch.tensor(1.0)}}
    path = tmp_path / "ai-toolkit.safetensors"
    save_file({f"{_name(p)}.{k}": v for p, t in modules.items() for k, v in t.items()}, str(path))
    deltas = {Q: torch.kron(modules[Q]["lokr_w1"], modules[Q]["lokr_w2"]),  # both halves full: s = 1
              K: torch.kron(modules[K]["lokr_w1"], modules[K]["lokr_w2"]),
              V: 0.5 * torch.kron(modules[V]["lokr_w1"], modules[V]["lokr_w2_a"] @ modules[V]["lokr_w2_b"])}
    return path, deltas


def test_an_unsorted_factor_pair_applies_as_the_kronecker_product(sd, tmp_path, lycoris_presets):
    path, deltas = _ai_toolkit(tmp_path)
    af = F.read(path)
    assert af.parts["unet"].config["module_shapes"]  # W1 (8, 8) on a 32 x 32 weight: no factor gives it
    ours = copy.deepcopy(sd)
    F.attach_file(af, ours, "ai")
    got = A.delta_weights(ours["unet"], "ai")
    for module, dW in deltas.items():
        assert (got[module] - dW).abs().max() <= 1e-6 * dW.abs().max(), module
    hand = copy.deepcopy(sd)  # the closed form merged by hand
    with torch.no_grad():
        for module, dW in deltas.items():
            hand["unet"].get_submodule(module).weight.add_(dW)
    want = unet_sample(hand["unet"])
    _close(unet_sample(ours["unet"]), want)
    F.set_file_weight(ours, "ai", 0.5)
    with torch.no_grad():
        for module, dW in deltas.items():
            hand["unet"].get_submodule(module).weight.sub_(0.5 * dW)
    _close(unet_sample(ours["unet"]), unet_sample(hand["unet"]))
    # re-exported in LyCORIS's layout an unsorted pair becomes W1 = [[1]], W2 = kron(W1, W2), exactly: LyCORIS's own
    # create_network_from_weights re-derives the split from a factor and cannot rebuild the pair itself
    # (tests/test_formats_community.py loads it there); the sorted to_k keeps its split
    out = tmp_path / "again.safetensors"
    assert main(["export", str(path), "--format", "lycoris", "--dtype", "fp32", "-o", str(out)]) == 0
    assert _w1_shapes(out)[_name(Q)] == (1, 1) and _w1_shapes(out)[_name(K)] == (4, 4)
    back = F.read(out)
    again = copy.deepcopy(sd)
    F.attach_file(back, again, "b")
    _close(unet_sample(again["unet"]), want, 1e-6)


# -- the per-module record itself --------------------------------------------------------------------
def test_a_module_shapes_record_sets_the_split_of_the_layers_it_names():
    cfg = lokr.Config(rank=1, module_shapes=[["(?:.+\\.)?to_q", [8, 8]]])  # (a file's JSON gives lists)
    assert cfg.module_shapes == (("(?:.+\\.)?to_q", (8, 8)),)
    assert lokr.expected_shapes(cfg, Site("attn.to_q", 32, 32))["w1"] == (8, 8)
    assert lokr.expected_shapes(cfg, Site("attn.to_q", 32, 32))["w2"] == (4, 1)    # W2 (4, 4) factored at rank 1
    assert lokr.expected_shapes(cfg, Site("attn.to_k", 32, 32))["w1"] == (4, 4)    # the factor rule: 32 = 4 x 8
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(StudioError, match=r"module '0'.*W1 \(3, 8\).*does not divide"):
        A.attach(model, "a", "lokr", lokr.Config(module_shapes=(("0", (3, 8)),)), ["0"])
    for bad in ((("x", (0, 2)),), (("(", (2, 2)),), (("x", 2),)):
        with pytest.raises(StudioError, match="module_shapes must be"):
            lokr.Config(module_shapes=bad)


def test_a_file_whose_record_does_not_fit_the_base_is_refused_before_any_layer_is_touched(sd, tmp_path):
    """A native file whose module_shapes gives a split the layer cannot hold: refused naming the module."""
    path, _ = _ai_toolkit(tmp_path)
    native = tmp_path / "native.safetensors"
    F.save(F.read(path), native, "native")
    tensors, meta = F.files.read(native)
    assert "[8, 8]" in meta["studio.adapter"]
    save_file(tensors, str(native), {**meta, "studio.adapter": meta["studio.adapter"].replace("[8, 8]", "[3, 8]")})
    ours = copy.deepcopy(sd)
    with pytest.raises(StudioError, match=r"native.safetensors does not fit this base .*module '.*attn1\.to_q' W1 \(3, 8\), which does not divide"):
        F.attach_file(F.read(native), ours, "bad")
    assert not A.adapter_names(ours["unet"])
