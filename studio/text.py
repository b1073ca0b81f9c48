"""Text from a causal LM with weighted adapter files, and the pirate metric (the CLI: studio/text_generate.py).

    model, tokenizer = load_with_adapters(base, [("pirate.safetensors", 1.0), ("other.safetensors", 0.5)])
    complete(model, tokenizer, ["Q: What colour is a frog?\\nA:"])  -> [" Arr! A frog be green, matey."]

Adapters stay unmerged (each layer runs base + sum_i w_i * delta_i), exactly the mixing rule of
the image path; any method mixes with any other. Decoding is greedy by default, so a prompt
always gives the same text -- what a metric and a test need.
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio import formats, text_world
from studio.errors import StudioError
from studio.models import load_causal_lm
from studio.prompt import prefix


def load_with_adapters(base: str | None, adapters: list[tuple[str, float]]):
    """(model, tokenizer) of the base (the mini LM when None) with every adapter file attached at its weight."""
    model, tokenizer = load_causal_lm(base)
    model.eval()
    attach_files(model, adapters)
    return model, tokenizer


def attach_files(model, adapters: list[tuple[str, float]]) -> list[tuple[str, object, str, float]]:
    """Each file read and attached at its weight (a file's prefix too, studio/prompt/prefix.py):
    [(attached name, AdapterFile, path, weight)]."""
    attached = []
    for index, (path, weight) in enumerate(adapters):
        af, name = formats.read(path), f"adapter{index}-{Path(path).stem}"
        formats.attach_file(af, {"lm": model}, name, weight)
        attached.append((name, af, str(path), float(weight)))
    return attached


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, stop: str | None = "\n",
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (the new text only), cut at the first ``stop`` string.
    Greedy at temperature 0; otherwise sampled with a generator seeded by ``seed``."""
    context = prefix.context(model.config) - prefix.installed_length(model)  # the prefix holds P positions
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched decoding continues every prompt from its last token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    length = batch["input_ids"].shape[1]
    if context and length + max_new_tokens > context:
        taken = f" (after the prefix's {prefix.installed_length(model)} tokens)" if prefix.installed_length(model) else ""
        raise StudioError(f"the prompt is {length} tokens and {max_new_tokens} new tokens were asked for, but the "
                          f"model's context is {context}{taken}: shorten the prompt or lower --max-new-tokens")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    if temperature > 0:
        torch.manual_seed(seed)  # transformers samples from the global generator
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    texts = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return [t.split(stop)[0] if stop else t for t in texts]


def pirate_metric(model, tokenizer, things=text_world.PIRATE_EVAL) -> dict[str, float]:
    """The sample task's metric on ``things``: format, fact and both rates (see ``studio.text_world``)."""
    questions = text_world.questions(things)
    answers = complete(model, tokenizer, [q.prompt for q in questions], max_new_tokens=24)
    return text_world.summarise([text_world.judge_answer(q, a) for q, a in zip(questions, answers)])
