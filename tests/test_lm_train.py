"""`studio train --task lm` end to end on a tiny Llama: outputs, loss falls, exact resume, NaN guard."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_helpers import pirate_jsonl, tiny_gpt2_lm, tiny_lm  # noqa: F401  (fixtures)
from studio import formats, text_world
from studio.cli import main
from studio.errors import StudioError

ROOT = Path(__file__).resolve().parents[1]


def _args(data, base, out, *extra):
    return ["train", "--task", "lm", str(data), "--base", str(base), "--out", str(out), "--save-every", "4",
            "--batch-size", "4", *extra]


def _mean_loss(model, tokenizer, data: Path) -> float:
    from trainers import data_text

    examples = data_text.load_examples(data, tokenizer, 64, 64)
    with torch.no_grad():
        return model(**data_text.collate(examples, tokenizer.pad_token_id)).loss.item()


def test_instruction_training_lowers_the_response_loss_and_writes_everything(tiny_lm, tmp_path, capsys):
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters

    data = pirate_jsonl(tmp_path, 16)
    out = tmp_path / "run"
    assert main(_args(data, tiny_lm, out, "--check")) == 0 and not out.exists()
    assert "16 instruction records" in capsys.readouterr().out
    assert main(_args(data, tiny_lm, out, "--steps", "24", "--lr", "1e-2", "--rank", "4")) == 0
    assert {"pirate.safetensors", "config.toml", "checkpoints", "logs", "samples.txt"} <= {p.name for p in out.iterdir()}
    assert 'targets = "lm-attn,lm-mlp"' in (out / "config.toml").read_text()
    af = formats.read(out / "pirate.safetensors")
    assert af.base == "lm" and list(af.parts) == ["lm"] and af.method == "lora"
    assert af.metadata["studio.lm_architecture"] == "llama"
    base, tokenizer = load_causal_lm(str(tiny_lm))
    adapted, _ = load_with_adapters(str(tiny_lm), [(str(out / "pirate.safetensors"), 1.0)])
    before, after = _mean_loss(base, tokenizer, data), _mean_loss(adapted, tokenizer, data)
    assert after < 0.8 * before, (before, after)
    assert "== step 24" in (out / "samples.txt").read_text()


def test_plain_text_is_packed_into_blocks_and_trains(tiny_lm, tmp_path):
    data = tmp_path / "stories.txt"
    data.write_text(text_world.pirate_stories(12))
    out = tmp_path / "run"
    assert main(_args(data, tiny_lm, out, "--steps", "3", "--block-size", "32", "--method", "svf")) == 0
    z = [v for k, v in formats.read(out / "stories.safetensors").parts["lm"].tensors.items() if k.endswith(".z")]
    assert z and any((t - 1).abs().max() > 0 for t in z)


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "studio", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_is_bit_identical(tiny_lm, tmp_path):
    """Only the killed run is a subprocess (the kill is the point); the others run here, saving imports."""
    data = pirate_jsonl(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--steps", "40", "--method", "pissa", "--rank", "4"]
    assert main(_args(data, tiny_lm, straight, *common)) == 0
    proc = _cli(*_args(data, tiny_lm, killed, *common))
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "pirate.safetensors").exists()
    assert main(["train", "--task", "lm", "--resume", str(killed)]) == 0
    a, b = load_file(str(straight / "pirate.safetensors")), load_file(str(killed / "pirate.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tiny_lm, tmp_path, monkeypatch):
    from trainers import language
    from trainers.language_config import LMTrainConfig

    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):  # the 6th loss is NaN, as a diverging run's would be
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    cfg = LMTrainConfig(data=str(pirate_jsonl(tmp_path, 8)), base=str(tiny_lm), out=str(tmp_path / "run"), steps=10,
                        save_every=4, batch_size=2)
    with pytest.raises(StudioError, match=r"loss became nan at step 5 \(the last good checkpoint is .*step-0000004\)"):
        language.train(cfg, say=lambda _: None)
    assert not (tmp_path / "run" / "pirate.safetensors").exists()


def test_gpt2_trains_and_its_cli_peft_export_loads_in_peft(tiny_gpt2_lm, tmp_path):
    from peft import PeftModel

    from studio.models import load_causal_lm
    from studio.text import load_with_adapters

    out = tmp_path / "run"
    assert main(_args(pirate_jsonl(tmp_path, 8), tiny_gpt2_lm, out, "--steps", "4", "--lr", "1e-2")) == 0
    assert main(["export", str(out / "pirate.safetensors"), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    ours, tokenizer = load_with_adapters(str(tiny_gpt2_lm), [(str(out / "pirate.safetensors"), 1.0)])
    base, _ = load_causal_lm(str(tiny_gpt2_lm))
    ids = tokenizer(["Q: What colour is a frog?\nA:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, plain = ours(input_ids=ids).logits, base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base.eval(), str(tmp_path / "peft")).eval()(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
