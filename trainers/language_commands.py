"""``studio train --task lm``: what runs once trainers/commands.py has built the LMTrainConfig.

trainers/commands.py owns the parser and the config layers (one ``studio train`` for both
tasks) and hands over here when the task is ``lm``.
"""

from __future__ import annotations


def run(cfg, check: bool, resume: bool) -> int:
    if check:
        from studio.models import load_causal_lm
        from trainers import data_text
        from trainers.language import text_room

        model, tokenizer = load_causal_lm(cfg.base)
        context = text_room(cfg, model)  # the context less a prefix's positions
        examples = data_text.load_examples(cfg.data, tokenizer, cfg.block_size or context, context)
        tokens = sum(len(e.input_ids) for e in examples)
        targets = sum(sum(1 for t in e.labels if t != data_text.IGNORE) for e in examples)
        kind = "instruction records" if data_text.is_instruction_file(cfg.data) else "packed blocks"
        print(f"{cfg.data}: {len(examples)} {kind}, {tokens} tokens ({targets} with loss), longest "
              f"{max(len(e.input_ids) for e in examples)} of the model's {context}"
              + (f" (after the prefix's {cfg.prefix_tokens})" if cfg.prefix_tokens else ""))
        return 0
    from trainers.language import train

    train(cfg, resume=resume)
    return 0
