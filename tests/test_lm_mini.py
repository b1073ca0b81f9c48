"""The embedded mini LM: its recipe runs (quick), it loads with the Auto classes, and it knows its world."""

import json
from pathlib import Path

import pytest

from studio import text_world
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
MINI_LM = ROOT / "sample_data" / "mini-lm"


def test_quick_recipe_writes_a_folder_the_auto_classes_load(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, text = tmp_path / "lm", tmp_path / "text"
    assert main(["make-lm", str(out), "--text", str(text), "--quick"]) == 0
    assert {"mini-lm-corpus.txt", "pirate-train.jsonl", "pirate-eval.jsonl", "pirate-stories.txt"} <= \
        {p.name for p in text.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    sample = "Q: What colour is a frog?\nA: Arr! Ye be \u00e9t\u00e9 \u65e5\u672c"  # any UTF-8 round-trips (byte-level)
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert model.config.model_type == "llama" and tokenizer.eos_token_id == model.config.eos_token_id
    assert json.loads((out / "training.json").read_text())["steps"] == 5
    capsys.readouterr()
    code = main(["make-lm", str(out), "--text", str(text), "--quick"])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err


def test_the_task_files_hold_disjoint_things_and_the_metric_judges_format_and_fact():
    train = [json.loads(line) for line in (ROOT / "sample_data/text/pirate-train.jsonl").read_text().splitlines()]
    evaluate = [json.loads(line) for line in (ROOT / "sample_data/text/pirate-eval.jsonl").read_text().splitlines()]
    assert train == text_world.pirate_records(text_world.PIRATE_TRAIN) and len(evaluate) == 26
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluate}
    q = text_world.Question("frog", "colour")
    assert text_world.judge_answer(q, " Arr! A frog be green, matey.") == text_world.Judgement(True, True)
    assert text_world.judge_answer(q, " A frog is green.") == text_world.Judgement(False, True)
    assert text_world.judge_answer(q, " Arr! A frog be blue, matey.") == text_world.Judgement(True, False)
    assert text_world.judge_answer(q, " Arr! A frog be green or blue, matey.").fact_ok is False


@pytest.mark.skipif(not (MINI_LM / "model.safetensors").is_file(), reason="the mini LM is not built")
def test_the_shipped_mini_lm_is_small_and_answers_its_world_plainly():
    from studio.models import load_causal_lm
    from studio.text import pirate_metric

    assert sum(p.stat().st_size for p in MINI_LM.iterdir()) < 20 * 2 ** 20
    model, tokenizer = load_causal_lm(None)
    score = pirate_metric(model.eval(), tokenizer, text_world.PIRATE_EVAL[:5])
    assert score == {"format": 0.0, "fact": 1.0, "both": 0.0}  # knows the facts, never talks like a pirate
