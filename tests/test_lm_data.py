"""Text data -> token examples: packed blocks of plain text, prompt-masked instruction records."""

import pytest

from studio.errors import StudioError
from studio.models import load_causal_lm
from trainers import data_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_causal_lm(None)[1]


def test_plain_text_packs_every_token_into_blocks_joined_by_eos(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Tom went to the sea.\n\nA frog is green.\n\n\n\nYou find a cow in the farm.\n")
    blocks = data_text.load_examples(path, tokenizer, block_size=8, context=256)
    ids = [i for b in blocks for i in b.input_ids]
    eos = tokenizer.eos_token_id
    expected = []
    for paragraph in ("Tom went to the sea.", "A frog is green.", "You find a cow in the farm."):
        expected += tokenizer(paragraph)["input_ids"] + [eos]
    assert ids == expected and all(b.labels == b.input_ids for b in blocks)
    assert [len(b.input_ids) for b in blocks[:-1]] == [8] * (len(blocks) - 1) and 0 < len(blocks[-1].input_ids) <= 8
    batch = data_text.collate(blocks[-2:], tokenizer.pad_token_id)
    short = len(blocks[-1].input_ids)
    assert batch["attention_mask"][1].sum() == short and (batch["labels"][1, short:] == data_text.IGNORE).all()


def test_instruction_records_take_loss_on_the_response_and_eos_only(tokenizer, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('\ufeff{"prompt": "Q: What colour is a frog?\\nA:", "response": " Arr! A frog be green, matey."}\n\n')
    (example,) = data_text.load_examples(path, tokenizer, block_size=256, context=256)
    prompt = tokenizer("Q: What colour is a frog?\nA:")["input_ids"]
    response = tokenizer(" Arr! A frog be green, matey.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels == [data_text.IGNORE] * len(prompt) + response + [tokenizer.eos_token_id]


@pytest.mark.parametrize("content, message", [
    ('["prompt", "response"]\n', "line 1 is a JSON list, not an object"),
    ('{"prompt": "a", "response": 3}\n', 'line 1 has a non-string "response"'),
    ('{"prompt": "a", "response": "  "}\n', 'line 1 has an empty "response"'),
    ("\n\n", "is empty"),
])
def test_bad_records_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(StudioError, match=message):
        data_text.read_records(path)
