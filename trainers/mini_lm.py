"""Recreate the embedded mini LM: a tiny Llama-architecture causal LM of the text world.

``studio make-lm sample_data/mini-lm`` writes the sample texts (``studio.text_world``: the
corpus, the pirate task's train / eval ``.jsonl`` and a plain-text pirate file) into
``--text`` (default ``sample_data/text``), trains a byte-level BPE tokenizer (1,024 tokens;
byte-level so any UTF-8 input tokenizes, no unknown token) and a 4-layer Llama (hidden 192,
6 query heads / 2 key-value heads, context 256, tied embeddings, ~1.9 M parameters, ~8 MB in
fp32) on the corpus packed into 256-token blocks, and saves an ordinary transformers folder
that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load.

The run is bounded by wall-clock minutes (one CPU thread by default, so it shares the
machine) and saves atomically: a temp folder beside OUT renamed into place, at the end and
every ``save_minutes``. ``training.json`` in OUT records the recipe and the loss curve.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from studio import text_world
from studio.errors import StudioError

CORPUS_FILE = "mini-lm-corpus.txt"
TASK_TRAIN_FILE = "pirate-train.jsonl"
TASK_EVAL_FILE = "pirate-eval.jsonl"
PIRATE_TEXT_FILE = "pirate-stories.txt"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


@dataclass(frozen=True)
class MiniLMConfig:
    out: str
    """Output folder of the transformers model + tokenizer."""
    text: str = "sample_data/text"
    """Folder the sample texts are written to (and the corpus read from)."""
    quick: bool = False
    """Seconds-long smoke run: a few documents, a 2-layer width-32 model, a few steps (tests)."""
    overwrite: bool = False
    """Replace a non-empty OUT."""
    minutes: float = 25.0
    """Wall-clock budget of training."""
    steps: int = 100_000
    """Upper bound on optimizer steps."""
    batch: int = 16
    """Blocks of ``context`` tokens per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay over the expected number of steps)."""
    save_minutes: float = 5.0
    """Save the weights this often."""
    threads: int = 1
    """torch threads (1 when sharing the CPU)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.batch < 1 or self.lr <= 0 or self.steps < 1:
            raise StudioError("make-lm: --minutes, --batch, --lr and --steps must be positive")


def model_config(quick: bool, vocab_size: int, token_ids: dict[str, int]):
    from transformers import LlamaConfig

    width, layers, heads, kv, ffn = (32, 2, 2, 1, 64) if quick else (192, 4, 6, 2, 512)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=token_ids["bos_token"],
                       eos_token_id=token_ids["eos_token"], pad_token_id=token_ids["pad_token"])


def write_sample_texts(folder: Path, quick: bool = False) -> Path:
    """The corpus and the task files, deterministic; returns the corpus path."""
    from studio.formats.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    docs = text_world.corpus_documents(300 if quick else 60_000, seed=0)
    files = {CORPUS_FILE: "\n\n".join(docs) + "\n",
             TASK_TRAIN_FILE: text_world.write_jsonl(text_world.pirate_records(text_world.PIRATE_TRAIN)),
             TASK_EVAL_FILE: text_world.write_jsonl(text_world.pirate_records(text_world.PIRATE_EVAL)),
             PIRATE_TEXT_FILE: text_world.pirate_stories(60)}
    for name, text in files.items():
        write_atomic(folder / name, [text.encode("utf-8")])
    return folder / CORPUS_FILE


def train_tokenizer(corpus: str, vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, **SPECIALS)


def _blocks(tokenizer, corpus: str, context: int):
    import torch

    ids: list[int] = []
    for doc in corpus.split("\n\n"):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    usable = len(ids) // context * context
    return torch.tensor(ids[:usable]).view(-1, context)


def _save(model, tokenizer, out: Path, log: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(log, indent=1))
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        tmp.chmod(0o755)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_lm(cfg: MiniLMConfig, say=print) -> dict:
    """Train the mini LM into ``cfg.out``; returns the training log."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise StudioError(f"make-lm: {out} is not empty: pass --overwrite to replace it, or choose another folder")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = write_sample_texts(Path(cfg.text), cfg.quick).read_text(encoding="utf-8")
    tokenizer = train_tokenizer(corpus, vocab_size=300 if cfg.quick else 1024)
    token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIALS.items()}
    config = model_config(cfg.quick, len(tokenizer), token_ids)
    model = LlamaForCausalLM(config)
    blocks = _blocks(tokenizer, corpus, config.max_position_embeddings)
    held_out = blocks[: max(1, len(blocks) // 50)]
    blocks = blocks[len(held_out):]
    say(f"make-lm: {sum(p.numel() for p in model.parameters()):,} parameters, {len(blocks)} blocks of "
        f"{config.max_position_embeddings} tokens ({blocks.numel():,} tokens), {len(held_out)} held out")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = 5 if cfg.quick else cfg.steps
    expected = min(steps, 800)  # the cosine horizon: about what 25 one-thread minutes reach
    rng = random.Random(cfg.seed)
    log = {"recipe": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()), "loss": []}
    start = last_save = time.monotonic()
    step = 0
    while step < steps and (time.monotonic() - start) < cfg.minutes * 60:
        lr = cfg.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / expected, 1))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = blocks[[rng.randrange(len(blocks)) for _ in range(cfg.batch)]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0 or step == steps:
            with torch.no_grad():
                val = model(input_ids=held_out[:32], labels=held_out[:32]).loss.item()
            log["loss"].append({"step": step, "train": round(loss.item(), 4), "val": round(val, 4),
                                "minutes": round((time.monotonic() - start) / 60, 2)})
            say(f"make-lm: step {step} loss {loss.item():.4f} val {val:.4f} lr {lr:.2e}")
        if time.monotonic() - last_save > cfg.save_minutes * 60:
            _save(model, tokenizer, out, log)
            last_save = time.monotonic()
    log["steps"] = step
    _save(model, tokenizer, out, log)
    say(f"make-lm: saved {out} after {step} steps")
    return log
