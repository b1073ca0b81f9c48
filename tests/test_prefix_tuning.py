"""Prefix tuning (studio/prompt/prefix.py) on a tiny Llama: PEFT parity, training, files, generate, errors.

The reference is PEFT's own ``PrefixTuningConfig`` on the same model with the same prefix tensors
(its ``prompt_encoder`` loaded with our encoder's weights): with and without the reparametrisation
MLP, the logits agree to 1e-5 -- and, since PEFT saves a folded prefix, so do its loaded folders.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import one_error_line
from lm_helpers import pirate_jsonl, tiny_gpt2_lm, tiny_lm  # noqa: F401  (fixtures)
from studio import formats
from studio.cli import main
from studio.errors import StudioError
from studio.prompt import prefix

ROOT = Path(__file__).resolve().parents[1]
P = 8  # the pirate records are up to ~50 tokens; the tiny models' context is 64


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 250, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a right-padded row: the prefix's mask columns go in front of the padding rule
    return ids, mask


def _peft(folder, encoder: prefix.PrefixEncoder):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=encoder.length,
                                prefix_projection=bool(encoder.projection), encoder_hidden_size=encoder.projection)
    model = get_peft_model(_model(folder), config)
    model.prompt_encoder["default"].load_state_dict(encoder.state_dict())  # the same tensors, MLP included
    return model.eval()


@pytest.mark.parametrize("arch,projection", [("llama", None), ("llama", 24), ("gpt2", None)])
def test_forward_equals_peft_prefix_tuning(tiny_lm, tiny_gpt2_lm, arch, projection):
    folder = tiny_lm if arch == "llama" else tiny_gpt2_lm
    ours = _model(folder)
    geo = prefix.geometry(ours.config)
    assert (arch != "llama") or (geo.heads, geo.head_dim) == (2, 8)  # GQA: the prefix has the 2 KV heads, not 4
    torch.manual_seed(0)
    encoder = prefix.PrefixEncoder(geo, 5, projection)
    ids, mask = _batch()
    with torch.no_grad():
        reference = _peft(folder, encoder)(input_ids=ids, attention_mask=mask).logits
        base = ours(input_ids=ids, attention_mask=mask).logits
        prefix.install_tensors(ours, encoder.fold(), "test")  # the MLP evaluated once: only prefixes remain
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert (reference - base).abs().max() > 1e-2  # the prefix matters, so the agreement below means something
    assert torch.allclose(got, reference, atol=1e-5, rtol=0), (got - reference).abs().max()


def test_generate_decodes_what_one_full_forward_predicts(tiny_lm):
    """Step-by-step decoding with the KV cache (left-padded batch) sees the prefix and the positions a
    single forward over the whole text sees."""
    model = _model(tiny_lm)
    torch.manual_seed(1)
    encoder = prefix.PrefixEncoder(prefix.geometry(model.config), 6, 16)
    prefix.install_tensors(model, encoder.fold(), "test")
    ids, mask = torch.randint(3, 250, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as studio.text.complete batches prompts
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    for row, start in ((0, 3), (1, 0)):
        with torch.no_grad():
            full = model(input_ids=out.sequences[row:row + 1, start:]).logits[0, -5:-1]
        steps = torch.stack([step[row] for step in out.logits])
        assert torch.allclose(steps, full, atol=1e-5, rtol=0), (steps - full).abs().max()


def _train(data, base, out, *extra):
    return ["train", "--task", "lm", str(data), "--base", str(base), "--out", str(out), "--save-every", "4",
            "--batch-size", "4", *extra]


def _loss(model, tokenizer, data) -> float:
    from trainers import data_text

    examples = data_text.load_examples(data, tokenizer, 64 - P, 64 - P)
    with torch.no_grad():
        return model(**data_text.collate(examples, tokenizer.pad_token_id)).loss.item()


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory):
    """Three short runs on 16 pirate records: a prefix trained directly, one through the MLP, LoRA + prefix
    (the prefixes at learning rates that move a random width-32 model in 24 steps, not the mini LM's)."""
    folder = tmp_path_factory.mktemp("prefix-runs")
    data = pirate_jsonl(folder, 16)
    done = {}
    for name, extra in {"direct": ["--method", "prefix", "--prefix-length", str(P), "--lr", "1e-1"],
                        "mlp": ["--method", "prefix", "--prefix-length", str(P), "--prefix-projection", "32", "--lr", "1e-2"],
                        "lora": ["--method", "lora", "--rank", "4", "--with-prefix", str(P)]}.items():
        assert main(_train(data, tiny_lm, folder / name, "--steps", "24", *extra)) == 0
        done[name] = folder / name / "pirate.safetensors"
    return data, done


def test_training_lowers_the_loss_and_the_file_keeps_only_the_prefixes(tiny_lm, runs):
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters

    data, files = runs
    base, tokenizer = load_causal_lm(str(tiny_lm))
    before = _loss(base, tokenizer, data)
    geo = prefix.geometry(base.config)
    for name, path in files.items():
        stored = load_file(str(path))
        prompt_keys = {k for k in stored if k.startswith("prompt.")}
        assert prompt_keys == {"prompt.prefix.key", "prompt.prefix.value"}, name  # no MLP, no table
        assert stored["prompt.prefix.key"].shape == (geo.layers, geo.heads, P, geo.head_dim)
        assert all(torch.isfinite(t).all() for t in stored.values() if t.is_floating_point())
        adapted, _ = load_with_adapters(str(tiny_lm), [(str(path), 1.0)])
        after = _loss(adapted, tokenizer, data)
        assert after < 0.95 * before, (name, before, after)
    assert {k.split(".")[0] for k in load_file(str(files["lora"]))} == {"lm", "prompt"}  # both sets in one file


def test_the_prefix_moves_from_its_start_and_the_mlp_folds_into_the_file(tiny_lm, runs):
    data, files = runs
    base = _model(tiny_lm)
    from studio.models import load_causal_lm
    from trainers import data_text

    _, tokenizer = load_causal_lm(str(tiny_lm))
    first = torch.tensor(data_text.load_examples(data, tokenizer, 64 - P, 64 - P)[0].input_ids)
    start_key, _ = prefix.real_word_init(base, first, P)  # what the direct run and LoRA + prefix start from
    for name in ("direct", "lora"):
        trained = load_file(str(files[name]))["prompt.prefix.key"]
        assert (trained - start_key).abs().max() > 1e-3, name
    lora = formats.read(files["lora"]).parts["lm"].tensors
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith(".B"))  # LoRA's B (zero-init) trained too
    # the MLP run: its last checkpoint holds table + MLP; evaluated, they are the file's prefixes exactly
    checkpoint = sorted((files["mlp"].parent / "checkpoints").iterdir())[-1]
    state = load_file(str(checkpoint / "adapter.safetensors"))
    mine = {k[len("prompt.train."):]: v for k, v in state.items() if k.startswith("prompt.train.")}
    assert {"embedding.weight", "transform.0.weight", "transform.2.bias"} <= set(mine)
    encoder = prefix.PrefixEncoder(prefix.geometry(base.config), P, 32)
    encoder.load_state_dict(mine)
    assert torch.equal(encoder.fold()["prefix.key"], load_file(str(files["mlp"]))["prompt.prefix.key"])


def test_native_file_round_trips_exactly_and_inspect_shows_the_prefix(runs, tmp_path, capsys):
    _, files = runs
    af = formats.read(files["lora"])
    again = tmp_path / "again.safetensors"
    formats.save(af, again, "native")
    a, b = load_file(str(files["lora"])), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["inspect", str(files["direct"])]) == 0
    text = capsys.readouterr().out
    assert f"prefix  {P} virtual tokens x 2 layers (2 key/value heads x 8)" in text
    assert main(["inspect", str(files["lora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompt"]["prefix"] == {"length": P, "layers": 2, "kv_heads": 2, "head_dim": 8}
    assert info["methods"] == {"lm": "lora"}


def test_peft_export_loads_in_peft_with_the_same_logits(tiny_lm, runs, tmp_path):
    from peft import PeftModel

    from studio.text import load_with_adapters

    _, files = runs
    ids, mask = _batch()
    for name in ("mlp", "lora"):
        out = tmp_path / f"peft-{name}"
        assert main(["export", str(files[name]), "--format", "peft", "-o", str(out)]) == 0
        ours, _ = load_with_adapters(str(tiny_lm), [(str(files[name]), 1.0)])
        if name == "mlp":
            assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
            theirs = PeftModel.from_pretrained(_model(tiny_lm), str(out))
        else:  # two PEFT adapters: merge the LoRA, then the prefix on the merged model
            assert sorted(p.name for p in out.iterdir()) == ["lora", "prefix"]
            merged = PeftModel.from_pretrained(_model(tiny_lm), str(out / "lora")).merge_and_unload()
            theirs = PeftModel.from_pretrained(merged, str(out / "prefix"))
        with torch.no_grad():
            expected = ours(input_ids=ids, attention_mask=mask).logits
            got = theirs.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (name, (got - expected).abs().max())


def test_generate_uses_the_prefix(tiny_lm, runs, capsys):
    from studio.text import complete, load_with_adapters

    _, files = runs
    prompt = "Q: What colour is a frog?\nA:"
    argv = ["generate", "--task", "lm", "--base", str(tiny_lm), "--prompt", prompt.replace("\n", "\\n"),
            "--max-new-tokens", "12"]
    assert main([*argv, "--adapter", str(files["direct"])]) == 0
    with_prefix = capsys.readouterr().out
    assert main(argv) == 0
    without = capsys.readouterr().out
    model, tokenizer = load_with_adapters(str(tiny_lm), [(str(files["direct"]), 1.0)])
    assert with_prefix.strip() == (prompt + complete(model, tokenizer, [prompt], 12, stop=None)[0]).strip()
    assert with_prefix != without


def test_a_prefix_file_attaches_and_detaches_like_any_adapter(tiny_lm, runs):
    """The UI's mixing session goes through attach_file / set_file_weight / detach_file, as generate does."""
    _, files = runs
    model = _model(tiny_lm)
    ids, mask = _batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        formats.attach_file(formats.read(files["lora"]), {"lm": model}, "mix")
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(StudioError, match="no strength to scale"):
            formats.set_file_weight({"lm": model}, "mix", 0.5)
        with pytest.raises(StudioError, match="one prefix adapter at a time"):
            formats.attach_file(formats.read(files["direct"]), {"lm": model}, "second")
        formats.detach_file({"lm": model}, "mix")
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (adapted - base).abs().max() > 1e-2 and torch.equal(after, base)
    assert prefix.installed_length(model) == 0


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "studio", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lora_plus_prefix_resumes_bit_identically_after_sigkill(tiny_lm, tmp_path):
    """The checkpoint keeps the prefix's table and MLP and their optimizer state, not just the folded prefix."""
    data = pirate_jsonl(tmp_path, 16)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--steps", "16", "--method", "lora", "--rank", "4", "--with-prefix", str(P), "--prefix-projection", "16"]
    assert main(_train(data, tiny_lm, straight, *common)) == 0
    proc = _cli(*_train(data, tiny_lm, killed, *common))
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "pirate.safetensors").exists()
    assert main(["train", "--task", "lm", "--resume", str(killed)]) == 0
    a, b = load_file(str(straight / "pirate.safetensors")), load_file(str(killed / "pirate.safetensors"))
    assert "prompt.prefix.key" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_prefix_input_is_one_error_line_and_writes_nothing(tiny_lm, tmp_path, capsys, runs):
    data = pirate_jsonl(tmp_path, 4)
    out = tmp_path / "run"
    cases = {
        ("--method", "prefix", "--prefix-length", "0"): "--prefix-length must be positive",
        ("--method", "lora", "--with-prefix", "-2"): "--with-prefix must be positive",
        ("--method", "lora", "--prefix-length", "8"): "use --with-prefix 8",
        ("--method", "prefix", "--with-prefix", "8"): "--prefix-length 8",
        ("--method", "lora", "--prefix-projection", "16"): "no prefix trains",
        ("--method", "prefix", "--prefix-length", "64"): "does not fit the model's context of 64",
        ("--method", "prefix", "--prefix-length", "64", "--check"): "does not fit the model's context of 64",
        ("--method", "lora", "--with-prefix", "8", "--gradient-checkpointing"): "drop it when training a prefix",
    }
    for extra, says in cases.items():
        line = one_error_line(capsys, _train(data, tiny_lm, out, "--steps", "2", *extra))
        assert says in line, line
        assert not out.exists()
    images = tmp_path / "images"
    line = one_error_line(capsys, ["train", str(images), "--with-prefix", "8", "--out", str(out)])
    assert "with_prefix" in line or "with-prefix" in line, line
    _, files = runs
    line = one_error_line(capsys, ["generate", "--task", "lm", "--base", str(tiny_lm), "--prompt", "Q:",
                                   "--adapter", f"{files['direct']}:0.5"])
    assert "a prefix has no strength" in line, line
    baked = tmp_path / "bake.safetensors"
    line = one_error_line(capsys, ["bake", f"{files['lora']}:0.5", "--format", "native", "-o", str(baked)])
    assert "has a prefix (prefix tuning), which a bake into layer weights cannot keep" in line, line
    assert not baked.exists()
    assert not out.exists()
