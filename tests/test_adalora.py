"""AdaLoRA (studio/adapters/adalora.py) against PEFT's AdaLoRA, its schedule and its exports.

The parity run: one tiny Llama, PEFT's AdaLoRA on one copy and ours on the other, our initial
A, E, B copied into PEFT's, the same batches, AdamW and linear-decay schedule; ours steps through
the trainers' ``loop.apply_step`` with the ``training`` hooks, PEFT's through ``update_and_allocate``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import studio.adapters as A
import studio.formats as SF
from cli_helpers import crash_at_step, one_error_line
from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from studio.adapters import adalora, training
from studio.cli import main
from studio.errors import StudioError
from trainers import loop

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ["q_proj", "v_proj", "down_proj"]


class NoAccel:
    def clip_grad_norm_(self, params, norm):
        torch.nn.utils.clip_grad_norm_(params, norm)


def _peft_twin(base, paths, cfg):
    """PEFT's AdaLoRA on a copy of ``base`` with the same schedule and the same scale.

    PEFT scales by lora_alpha / (ranknum + 1e-5); ours by alpha / r, so its lora_alpha carries the 1e-5."""
    from peft import AdaLoraConfig, get_peft_model

    pc = AdaLoraConfig(init_r=cfg.rank, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT,
                       total_step=cfg.total_step, lora_alpha=cfg.alpha * (cfg.rank + 1e-5) / cfg.rank,
                       target_modules=LEAVES, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), pc)


@pytest.mark.parametrize("alpha", [8.0, 7.0])  # scale alpha / r = 2 (a power of two) and 1.75
def test_adalora_matches_peft_rank_pattern_and_logits(tiny_lm, alpha):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    ours = copy.deepcopy(base)
    paths = [n for n, _ in ours.named_modules() if n.rpartition(".")[2] in LEAVES]
    cfg = adalora.Config(rank=4, alpha=alpha, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=14)
    A.attach(ours, "a", "adalora", cfg, paths)
    peft = _peft_twin(base, paths, cfg)
    inner = peft.base_model.model
    with torch.no_grad():
        for path in paths:
            mine, theirs = ours.get_submodule(path).adapters["a"], inner.get_submodule(path)
            for key, their in (("A", theirs.lora_A), ("E", theirs.lora_E), ("B", theirs.lora_B)):
                their["default"].copy_(getattr(mine, key))
    ours.train(), peft.train()
    params = A.trainable_parameters(ours, "a")
    assert len(params) == len([p for p in peft.parameters() if p.requires_grad]) == 3 * len(paths)
    runs = []
    for model, trained in ((ours, params), (peft, [p for p in peft.parameters() if p.requires_grad])):
        opt = torch.optim.AdamW(trained, lr=1e-2)
        runs.append((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.total_step)))
    data = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    for step in range(cfg.total_step):
        ids = torch.randint(3, vocab, (4, 16), generator=data)
        (_, opt, sched), (_, popt, psched) = runs
        loss = ours(input_ids=ids, labels=ids).loss + training.aux_loss([ours], "a")
        peft_loss = peft(input_ids=ids, labels=ids).loss  # PEFT adds its orthogonality term itself
        assert abs(loss.item() - peft_loss.item()) <= 1e-5 * abs(peft_loss.item()), step
        loss.backward()
        loop.apply_step(NoAccel(), params, opt, sched, 0.0, 1,
                        after=lambda: training.after_step([ours], "a", step, cfg.total_step))
        peft_loss.backward()
        popt.step()
        peft.base_model.update_and_allocate(step)
        popt.zero_grad()
        psched.step()
    # the rank pattern of the final allocation: the same triplets kept, the budget met, rank moved
    theirs = {k.replace(".lora_E.default", ""): v for k, v in peft.peft_config["default"].rank_pattern.items()}
    mine = {p: [bool(x) for x in ours.get_submodule(p).adapters["a"].mask.tolist()] for p in paths}
    assert mine == theirs
    assert sum(map(sum, mine.values())) == cfg.target_r * len(paths)
    assert {sum(v) for v in mine.values()} != {cfg.target_r}  # layers ended with different ranks
    for p in paths:
        assert torch.equal(ours.get_submodule(p).adapters["a"].E.detach().view(-1) != 0, torch.tensor(mine[p]))
    ours.eval(), peft.eval()
    ids = torch.randint(3, vocab, (2, 16), generator=data)
    with torch.no_grad():
        got, want, before = ours(input_ids=ids).logits, peft(input_ids=ids).logits, base(input_ids=ids).logits
    # Measured: alpha 8, 0.0 (bit-identical): the same fp32 ops run in the same order on both sides (A * E,
    # the two matmuls, the budget's kthvalue) and the scale 2 folded into B is a power of two, so it commutes
    # with rounding. alpha 7: ~1e-6 (scale 1.75 folded into B once vs PEFT's * lora_alpha / (ranknum + 1e-5)
    # on every output rounds differently by an ulp, which 14 Adam steps carry along). The bound, 1e-5 of
    # the logits' size, is ten times that; the adapters' own effect is four orders of magnitude above it.
    diff = (got - want).abs().max().item()
    print(f"AdaLoRA vs PEFT (alpha {alpha}) after {cfg.total_step} steps: logits max |diff| {diff:.2e}, adapter effect "
          f"{(want - before).abs().max().item():.3f}")
    assert diff <= 1e-5 * want.abs().max().item()
    assert (want - before).abs().max().item() > 0.01


def test_budget_follows_peft_cubic_schedule():
    from peft.tuners.adalora.layer import RankAllocator

    cfg = adalora.Config(rank=6, target_r=2, tinit=3, tfinal=4, deltaT=2)
    peft = RankAllocator.__new__(RankAllocator)
    peft.peft_config = SimpleNamespace(tinit=3, tfinal=4, total_step=20, deltaT=2)
    peft.init_bgt, peft.target_bgt = 60, 20
    for step in range(20 - 4):
        assert adalora.budget_at(step, cfg, 60, 20, 20) == peft.budget_schedule(step), step
    # by hand: step 7 is 4 of the 13 budget steps in, 20 + 40 (1 - 4/13)^3 = 33.25..., floored
    assert adalora.budget_at(7, cfg, 60, 20, 20) == (int(20 + 40 * (9 / 13) ** 3), False)
    assert adalora.budget_at(8, cfg, 60, 20, 20)[1] and not adalora.budget_at(3, cfg, 60, 20, 20)[1]


def test_orthogonality_term_by_hand_and_zero_on_orthonormal_factors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 6))
    A.attach(model, "a", "adalora", adalora.Config(rank=3, target_r=2), ["0", "1"])
    layers = [model[0].adapters["a"], model[1].adapters["a"]]
    norms = [torch.linalg.matrix_norm(M.double() - torch.eye(3, dtype=torch.float64))
             for a in layers for M in (a.A @ a.A.T, a.B.T @ a.B)]
    term = training.aux_loss([model], "a")
    assert abs(term.item() - 0.5 * sum(norms).item() / 4) <= 1e-6
    term.backward()
    assert all(a.A.grad is not None and a.B.grad.abs().sum() > 0 for a in layers)
    with torch.no_grad():
        for a in layers:
            a.A.copy_(torch.linalg.qr(torch.randn(a.A.shape[1], 3))[0].T)
            a.B.copy_(torch.linalg.qr(torch.randn(a.B.shape[0], 3))[0])
    assert training.aux_loss([model], "a").item() <= 1e-5
    off = torch.nn.Sequential(torch.nn.Linear(10, 8))
    A.attach(off, "a", "adalora", adalora.Config(rank=3, target_r=2, orth_reg_weight=0.0), ["0"])
    assert training.aux_loss([off], "a") is None


def test_allocation_masks_the_globally_lowest_triplets():
    """Scores set by hand on two layers: the budget keeps the top triplets of the whole model, not per layer."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 6))
    A.attach(model, "a", "adalora", adalora.Config(rank=3, target_r=1, tinit=0, tfinal=0, total_step=5), ["0", "1"])
    layers = [model[0].adapters["a"], model[1].adapters["a"]]
    with torch.no_grad():
        for a, scores in zip(layers, ([5.0, 1.0, 4.0], [0.5, 3.0, 0.2])):
            a.E.fill_(1.0)
            for key in adalora.SCORED:  # s = I_bar * U_bar: only lambda's score is non-zero here
                getattr(a, f"sens_{key}").zero_(), getattr(a, f"unc_{key}").zero_()
            a.sens_E.copy_(torch.tensor(scores)[:, None]), a.unc_E.fill_(1.0)
        adalora._mask_to_budget(layers, 3)
    assert [a.mask.tolist() for a in layers] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert [a.E.view(-1).tolist() for a in layers] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert torch.allclose(adalora.triplet_scores(layers[1]), torch.tensor([0.5, 3.0, 0.2]))
    full = torch.nn.Sequential(torch.nn.Linear(10, 8))  # target_r = rank: the final allocation prunes nothing
    A.attach(full, "a", "adalora", adalora.Config(rank=3, target_r=3, tfinal=1, total_step=2), ["0"])
    full[0].adapters["a"].E.grad = torch.ones(3, 1)
    training.after_step([full], "a", 1, 2)
    assert full[0].adapters["a"].mask.tolist() == [1.0, 1.0, 1.0]


def _stripes(tmp: Path) -> Path:
    data = tmp / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:6]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    return data


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """4 steps of `studio train --method adalora` on the mini base (UNet attention and 3x3 convs): a budget
    phase of 3 steps, the final allocation at the last one."""
    tmp = tmp_path_factory.mktemp("adalora")
    out = tmp / "run"
    assert main(["train", str(_stripes(tmp)), "--out", str(out), "--steps", "4", "--batch-size", "2",
                 "--sample-every", "0", "--save-every", "4", "--set", f"cache_dir={tmp / 'cache'}",
                 "--set", "sample_steps=2", "--targets", "unet-full", "--method", "adalora", "--rank", "4",
                 "--method-args", "target_r=2", "tfinal=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    return out / "stripes.safetensors"


def test_mini_base_file_has_the_budget_reloads_exactly_and_exports_kohya_at_kept_ranks(mini_run, tmp_path):
    from studio.models import load_diffusion_base

    af = SF.read(mini_run)
    assert af.method == "adalora" and af.parts["unet"].config["target_r"] == 2
    modules = af.parts["unet"].modules()
    assert modules and all(set(t) == {"A", "E", "B", "mask"} for t in modules.values())
    kept = {p: adalora.kept_ranks(t) for p, t in modules.items()}
    assert all(torch.equal(t["E"].view(-1) != 0, t["mask"] != 0) for t in modules.values())  # masked = zero
    assert sum(kept.values()) == 2 * len(modules)  # the total rank after the schedule is the budget
    print(f"AdaLoRA on the mini base: {len(modules)} layers, kept ranks {sorted(collections.Counter(kept.values()).items())}")
    # native round trip: bit-identical deltas
    first = load_diffusion_base().components
    SF.attach_file(af, first, "n")
    again = tmp_path / "again.safetensors"
    SF.save(SF.from_models({"unet": first["unet"]}, "n"), again)
    second = load_diffusion_base().components
    SF.attach_file(SF.read(again), second, "n")
    want, got = A.delta_weights(first["unet"], "n"), A.delta_weights(second["unet"], "n")
    assert sorted(want) == sorted(got) and all(torch.equal(got[p], w) for p, w in want.items())
    # kohya: one rank per module, the kept one (masked triplets dropped), and the same deltas; a layer whose
    # every triplet was pruned is written as a zero rank-1 pair (an export keeps one rank per module)
    assert 0 in kept.values()
    path = tmp_path / "plain.safetensors"
    report = SF.save(af, path, "kohya", dtype="fp32")
    assert sorted(report.ranks) == sorted({max(1, k) for k in kept.values()})
    models = load_diffusion_base().components
    SF.attach_file(SF.read(path), models, "k")
    plain = A.delta_weights(models["unet"], "k")
    tensors, _ = SF.files.read(path)
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")]
    assert sorted(ranks) == sorted(max(1, k) for k in kept.values())
    for p, w in want.items():
        assert (plain[p] - w).norm() <= 1e-5 * w.norm() if kept[p] else plain[p].abs().max() == 0, p


def _lm_run(tiny_lm, tmp_path, *extra: str) -> Path:
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    assert main(["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "6",
                 "--batch-size", "4", "--save-every", "6", "--method", "adalora", "--rank", "4", *extra]) == 0
    return out / "pirate.safetensors"


def test_tiny_lm_training_and_peft_export_load_with_rank_pattern(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.text import load_with_adapters

    path = _lm_run(tiny_lm, tmp_path, "--method-args", "target_r=2", "tinit=1", "tfinal=2")
    modules = SF.read(path).parts["lm"].modules()
    kept = {p: adalora.kept_ranks(t) for p, t in modules.items()}
    assert len(kept) == 14 and sum(kept.values()) == 2 * 14 and set(kept.values()) != {2}
    folder = tmp_path / "peft"
    assert main(["export", str(path), "--format", "peft", "-o", str(folder)]) == 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {p: config["rank_pattern"].get(p, config["r"]) for p in kept} == {p: max(1, k) for p, k in kept.items()}
    ours, _ = load_with_adapters(str(tiny_lm), [(str(path), 1.0)])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(folder)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = peft(input_ids=ids).logits, ours(input_ids=ids).logits, base(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (want - before).abs().max() > 1e-4  # the adapter does something


def test_bad_options_are_one_error_line_and_write_nothing(tiny_lm, tmp_path, capsys):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    args = ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "4",
            "--method", "adalora", "--rank", "4", "--method-args"]
    line = one_error_line(capsys, args + ["target_r=5"])
    assert "target rank 5" in line and "initial rank --rank 4" in line
    assert "beta1 and beta2" in one_error_line(capsys, args + ["beta1=1.5"])
    assert "no steps to move rank" in one_error_line(capsys, args + ["tinit=3", "tfinal=2", "total_step=4"])
    assert "whole number" in one_error_line(capsys, args + ["deltaT=often"])
    assert not out.exists()
    with pytest.raises(StudioError, match="no steps to move rank"):  # a run too short for the schedule
        adalora.Config(rank=4, tinit=3, tfinal=2).check_total(4)
    with pytest.raises(StudioError, match="initial rank --conv-rank 1"):  # LoCon layers start at conv_rank
        adalora.Config(rank=4, conv_rank=1, target_r=2)
    assert [adalora.Config(rank=r).target for r in (1, 4, 12)] == [1, 2, 8]  # PEFT's 12 -> 8, at least 1



SHORT = (8, ("target_r=2", "tinit=1", "tfinal=3"))
"""8 steps: budget phase steps 2-4 (0-based), final allocation at step 5, then 2 steps on the fixed pattern."""
LONG = (12, ("target_r=1", "tinit=1", "tfinal=2"))
"""12 steps: budget phase steps 2-9, final allocation at step 10 (ranked by the statistics), then step 11."""


def _args(tiny_lm, data, out, schedule):
    steps, method_args = schedule
    return ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--save-every", "2", "--method", "adalora", "--rank", "4", "--method-args",
            *method_args]


def _straight(tiny_lm, tmp_path, schedule) -> dict:
    from safetensors.torch import load_file

    out = tmp_path / "straight"
    assert main(_args(tiny_lm, pirate_jsonl(tmp_path, 16), out, schedule)) == 0
    return load_file(str(out / "pirate.safetensors"))


def _crash_and_resume(tiny_lm, tmp_path, monkeypatch, die_at: int, schedule=SHORT, inspect=None) -> dict:
    """The run saved every 2 steps dies in step ``die_at`` (1-based) and is resumed from its last checkpoint;
    ``inspect(checkpoint folder)`` runs in between. Returns the resumed run's file."""
    from safetensors.torch import load_file

    crashed = tmp_path / f"crashed-{die_at}"
    calls = crash_at_step(monkeypatch, _args(tiny_lm, pirate_jsonl(tmp_path, 16), crashed, schedule), die_at)
    if inspect is not None:
        inspect(loop.latest_checkpoint(crashed / "checkpoints"))
    assert main(["train", "--task", "lm", "--resume", str(crashed)]) == 0
    assert calls["steps"] == schedule[0] - 2 * ((die_at - 1) // 2)
    return load_file(str(crashed / "pirate.safetensors"))


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_the_budget_phase_is_bit_identical(tiny_lm, tmp_path, monkeypatch):
    want = _straight(tiny_lm, tmp_path, SHORT)
    assert _identical(_crash_and_resume(tiny_lm, tmp_path, monkeypatch, die_at=7), want)  # checkpoint 6: fixed


@pytest.fixture(scope="module")
def long_run(tiny_lm, tmp_path_factory):
    return _straight(tiny_lm, tmp_path_factory.mktemp("adalora-long"), LONG)


def test_resume_inside_the_budget_phase_is_bit_identical(tiny_lm, long_run, tmp_path, monkeypatch):
    """The checkpoints hold the RankAllocator's statistics (I_bar, U_bar of A, E, B on every layer), so a run
    resumed in the middle of the budget phase, or just before the final allocation, ranks the triplets as the
    uninterrupted run does."""
    def holds_the_statistics(checkpoint):
        methods = torch.load(checkpoint / "state.pt", weights_only=True)["methods"]
        paths = {k.rsplit(".", 1)[0] for k in long_run if k.endswith(".mask")}
        assert set(methods) == {f"{p}.{key}" for p in paths for key in adalora.CHECKPOINTED} and len(paths) == 14
        assert all(t.abs().max() > 0 for t in methods.values())  # mid-budget: the EMAs are running

    got = _crash_and_resume(tiny_lm, tmp_path, monkeypatch, die_at=7, schedule=LONG, inspect=holds_the_statistics)
    assert _identical(got, long_run)
    assert _identical(_crash_and_resume(tiny_lm, tmp_path, monkeypatch, die_at=11, schedule=LONG), long_run)


def test_a_resume_without_the_statistics_loses_the_budget(tiny_lm, long_run, tmp_path, monkeypatch):
    """What the checkpointed statistics are for: with them dropped on resume (the studio before), the final
    allocation right after the resume (which, as PEFT's, does not update the scores) ranks triplets that all
    score 0, and the ties prune every one of them: the budget of 14 ranks ends at 0."""
    from trainers import extras

    real = extras.Extras.load_state_dict
    monkeypatch.setattr(extras.Extras, "load_state_dict",
                        lambda self, states: real(self, {k: v for k, v in states.items() if k != "methods"}))
    got = _crash_and_resume(tiny_lm, tmp_path, monkeypatch, die_at=11, schedule=LONG)
    masks = [k for k in long_run if k.endswith(".mask")]
    assert sum(int(long_run[k].sum()) for k in masks) == 14 == len(masks)  # target_r = 1 per layer
    assert sum(int(got[k].sum()) for k in masks) == 0


def test_diffusion_resume_inside_the_budget_phase_is_bit_identical(tmp_path, monkeypatch):
    """The diffusion trainer checkpoints the statistics the same way (UNet attention and 3x3 convs): 6 steps,
    budget phase steps 2-4, final allocation at step 5; killed in step 5, resumed from checkpoint 4."""
    from safetensors.torch import load_file

    data = _stripes(tmp_path)

    def args(out):
        return ["train", str(data), "--out", str(out), "--steps", "6", "--batch-size", "2", "--sample-every", "0",
                "--save-every", "2", "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_steps=2",
                "--targets", "unet-full", "--method", "adalora", "--rank", "4", "--method-args", "target_r=2",
                "tinit=1", "tfinal=1"]

    assert main(args(tmp_path / "straight")) == 0
    calls = crash_at_step(monkeypatch, args(tmp_path / "crashed"), 5)
    checkpoint = loop.latest_checkpoint(tmp_path / "crashed" / "checkpoints")
    methods = torch.load(checkpoint / "state.pt", weights_only=True)["methods"]
    assert methods and all(k.startswith("unet.") for k in methods) and any(t.abs().max() > 0 for t in methods.values())
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    assert calls["steps"] == 2
    a, b = (load_file(str(tmp_path / run / "stripes.safetensors")) for run in ("straight", "crashed"))
    assert _identical(a, b)


def test_a_run_in_epochs_too_short_for_the_budget_schedule_writes_nothing(tmp_path, capsys):
    """Given in epochs, the run's length is known only once the data is counted: the trainers ask the
    methods then (training.check_steps), before the run folder holds anything."""
    style = Path(__file__).resolve().parents[1] / "sample_data" / "styles" / "stripes"
    out = tmp_path / "run"
    line = one_error_line(capsys, ["train", str(style), "--method", "adalora", "--method-args", "tinit=500",
                                   "--epochs", "1", "--out", str(out), "--sample-every", "0"])
    assert "tinit=500 must be below total steps" in line
    assert not out.exists() or not any(out.iterdir())
