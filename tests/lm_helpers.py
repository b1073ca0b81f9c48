"""A tiny causal-LM folder for the language-model tests: a byte-level BPE tokenizer of the text world
and a 2-layer Llama (or GPT-2) built from a config dict, saved like any transformers model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio import text_world
from trainers.mini_lm import SPECIALS, train_tokenizer


def tiny_lm_folder(folder: Path, arch: str = "llama", seed: int = 0, width: int = 32) -> Path:
    """``folder`` holding a tiny random ``arch`` (llama | gpt2) causal LM with the text-world tokenizer.

    Weights are drawn 10x wider than transformers' default (std 0.2): behind the final RMSNorm a width-32
    model with std-0.02 weights has logits below ~1 whatever its hidden state, so no adapter could lower
    its loss measurably."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer("\n\n".join(text_world.corpus_documents(200)), vocab_size=300)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items()}
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, initializer_range=0.2, bos_token_id=ids["bos_token"],
                                             eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"]))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=2, n_head=4, n_positions=64,
                                           initializer_range=0.2, bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """One tiny Llama folder per test session (import this fixture into a test module to use it)."""
    return tiny_lm_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_lm(tmp_path_factory) -> Path:
    return tiny_lm_folder(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


def pirate_jsonl(folder: Path, n: int | None = None) -> Path:
    """The sample task's training records (all, or the first ``n``) as a .jsonl file in ``folder``."""
    path = folder / "pirate.jsonl"
    records = text_world.pirate_records(text_world.PIRATE_TRAIN)
    path.write_text(text_world.write_jsonl(records[:n] if n else records))
    return path
