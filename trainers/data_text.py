"""Text data for ``studio train --task lm``: a plain-text file or an instruction ``.jsonl`` -> token examples.

* ``*.jsonl``: one JSON object a line, ``{"prompt": ..., "response": ...}``. An example is
  ``prompt tokens + response tokens + EOS``; the loss is taken on the response and the EOS only
  (the labels of the prompt are -100), so the adapter learns to answer, not to ask.
* anything else: plain UTF-8 text. Paragraphs (blank-line separated) are tokenized, joined
  with EOS and cut into blocks of ``block_size`` tokens (the last block is shorter); every
  token is a target. Packing wastes no compute on padding and never cuts a file's text away.

Sequences longer than the model's context are an **error**, not a truncation: for instruction
data the cut would fall in the response -- the part that carries what the adapter should learn,
including the EOS that teaches it to stop -- and would silently train on broken answers. The
error names the line and its length, so the user can shorten that record. Packed text cannot
be too long: its blocks are at most the context by construction.

Every problem a user can cause (empty file, not UTF-8, a line that is not JSON or lacks a field)
raises one StudioError naming the file, the line and the fix, before anything is trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError

IGNORE = -100
"""Label of tokens without loss (prompts, padding): PyTorch's cross-entropy ignore index."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        """Tokens with a loss: the labels after the first position that are not IGNORE."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_text(path: str | Path) -> str:
    """The file's text, refusing missing, empty and non-UTF-8 files with one-line errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise StudioError(f"data file {path} does not exist: give a .txt file or a .jsonl file of "
                          f'{{"prompt": ..., "response": ...}} lines')
    if path.is_dir():
        raise StudioError(f"data {path} is a folder: language-model training takes one .txt or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise StudioError(f"{path} is not UTF-8 text (byte {err.start}, line {line}): convert it, e.g. "
                          f"iconv -f latin1 -t utf-8 {path.name} > fixed.txt") from None
    if not text.strip():
        raise StudioError(f"{path} is empty: put the training text (or prompt/response lines) in it")
    return text.removeprefix("\ufeff")


def read_records(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) of every instruction record of a ``.jsonl`` file; errors give the line number."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise StudioError(f"{path} line {number} is not JSON ({err.msg}): write one object a line, "
                              f'{{"prompt": "...", "response": "..."}}') from None
        if not isinstance(record, dict):
            raise StudioError(f"{path} line {number} is a JSON {type(record).__name__}, not an object: write "
                              f'{{"prompt": "...", "response": "..."}}')
        for field in ("prompt", "response"):
            if not isinstance(record.get(field), str):
                problem = "lacks" if field not in record else "has a non-string"
                raise StudioError(f'{path} line {number} {problem} "{field}": every line needs string fields '
                                  f'"prompt" and "response"')
        if not record["response"].strip():
            raise StudioError(f'{path} line {number} has an empty "response": there is nothing to learn from it; '
                              f"fill it in or remove the line")
        records.append((number, record))
    if not records:
        raise StudioError(f"{path} has no records: put one {{\"prompt\", \"response\"}} object a line in it")
    return records


def is_instruction_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def instruction_examples(path: str | Path, tokenizer, context: int) -> list[Example]:
    examples = []
    for number, record in read_records(path):
        prompt = tokenizer(record["prompt"])["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(response) > context:
            raise StudioError(f"{path} line {number} is {len(prompt) + len(response)} tokens long but the model's "
                              f"context is {context}: shorten that record (it is not truncated, see "
                              f"trainers/data_text.py for why)")
        examples.append(Example(prompt + response, [IGNORE] * len(prompt) + response))
    return examples


def packed_examples(path: str | Path, tokenizer, block_size: int) -> list[Example]:
    ids: list[int] = []
    for paragraph in read_text(path).split("\n\n"):
        if paragraph.strip():
            ids += tokenizer(paragraph.strip("\n"))["input_ids"] + [tokenizer.eos_token_id]
    blocks = [Example(ids[i:i + block_size], ids[i:i + block_size]) for i in range(0, len(ids), block_size)]
    return [b for b in blocks if b.targets > 0]  # a 1-token tail predicts nothing (and the file has >= 2 tokens)


def load_examples(path: str | Path, tokenizer, block_size: int, context: int) -> list[Example]:
    """Examples of a data file: instruction ``.jsonl`` or packed plain text."""
    if block_size > context:
        raise StudioError(f"block_size {block_size} is longer than the model's context ({context} tokens): "
                          f"use --block-size {context} or less")
    if is_instruction_file(path):
        return instruction_examples(path, tokenizer, context)
    return packed_examples(path, tokenizer, block_size)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels of one batch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
