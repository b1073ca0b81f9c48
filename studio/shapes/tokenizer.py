"""A CLIP-compatible byte-level BPE tokenizer built locally from the shapes-world vocabulary.

``CLIPTokenizer`` needs ``vocab.json`` + ``merges.txt`` in CLIP's layout: the 256 byte
characters, the same 256 with the end-of-word marker ``</w>``, the merged tokens, then
``<|startoftext|>`` and ``<|endoftext|>``. For every word of our vocabulary we add the merges
that join it into one token. Any other word (a trigger word such as ``zxq``) falls back to
byte pieces, so it still tokenizes and round-trips.

Merges are added word by word: for each word we first segment it with the merges so far and
then append merges joining those segments left to right. New merges have a higher rank than
all old ones, so they never change how an earlier word is split.
(transformers 5 pitfall: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently yields a
2-token tokenizer; ``CLIPTokenizer.from_pretrained(folder)`` works.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from studio.shapes.world import COLOURS, SHAPES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EXTRA_WORDS = ("a", "an", "the", "on", "in", "of", "with", "and", "background", "style",
               "photo", "picture", "drawing", "image", "character", "shape", "outline",
               "stripes", "striped", "dots", "dotted", "polka", "robot", "pixel")


def caption_words() -> list[str]:
    return list(dict.fromkeys(["a", "on", "background", *COLOURS, *SHAPES, *EXTRA_WORDS]))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _segment(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair."""
    word = list(word)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word[i:i + 2] = [word[i] + word[i + 1]]
    return word


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    enc = bytes_to_unicode()
    for w in words:
        chars = [enc[b] for b in w.encode("utf-8")]
        pieces = _segment(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | os.PathLike, max_length: int, words: list[str] | None = None) -> Path:
    """Write a loadable CLIP tokenizer folder (vocab.json, merges.txt, configs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words or caption_words())
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None):
    """Load with the pitfall avoided: ``model_max_length`` is always set explicitly."""
    from transformers import CLIPTokenizer

    if max_length is None:
        cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        max_length = int(cfg["model_max_length"])
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
