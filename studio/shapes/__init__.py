"""The procedural shapes world: generator, tokenizer builder, evaluator (imports nothing of ours but errors)."""
