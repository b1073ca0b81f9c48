"""``studio train --check``'s memory report and ``--vram-budget``'s advice, from a ``memory.Estimate``:
what a run needs as configured, and the cheapest switches (checkpointing, a half base, batch 1 with
gradient accumulation) that bring it under a budget."""

from __future__ import annotations

import torch

from studio.errors import StudioError
from trainers.memory import ADAMW_BYTES, DTYPES, Estimate, gb


def settings(cfg) -> list[tuple[str, dict]]:
    """What a run can switch on to need less, cheapest change first: (flags, config changes)."""
    half = "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    options = [("", {})]
    if not cfg.gradient_checkpointing:
        options.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if cfg.base_dtype == "fp32":
        options.append((f"--base-dtype {half}", {"base_dtype": half}))
        if not cfg.gradient_checkpointing:
            options.append((f"--gradient-checkpointing --base-dtype {half}",
                            {"gradient_checkpointing": True, "base_dtype": half}))
    if cfg.batch_size > 1:
        options += [(f"{flags} --batch-size 1 --grad-accum {cfg.batch_size * cfg.grad_accum}".strip(),
                     {**changes, "batch_size": 1, "grad_accum": cfg.batch_size * cfg.grad_accum})
                    for flags, changes in list(options)]
    return options


def total_of(estimate: Estimate, cfg, changes: dict) -> int:
    """The estimate's total with ``changes`` applied (weights and activations scale with the dtype)."""
    size = DTYPES[changes.get("base_dtype", cfg.base_dtype)].itemsize / DTYPES[cfg.base_dtype].itemsize
    checkpointing = changes.get("gradient_checkpointing", cfg.gradient_checkpointing)
    batch = changes.get("batch_size", cfg.batch_size)
    working = estimate.working_bytes(checkpointing, batch)
    return int(estimate.runtime + size * (sum(estimate.weights.values()) + working) + estimate.adapter_bytes)


def report(estimate: Estimate, cfg) -> str:
    e = estimate
    weights = ", ".join(f"{k} {gb(v)}" for k, v in e.weights.items())
    per_plain = sum(a.plain for a in e.activations.values())
    per_ckpt = sum(a.checkpointed for a in e.activations.values())
    on = "with" if cfg.gradient_checkpointing else "without"
    return "\n".join([
        f"memory estimate: {e.resolution} px, batch {cfg.batch_size}, base {e.base_dtype}, "
        f"{on} gradient checkpointing",
        f"  weights      {weights} ({e.base_dtype}, frozen)",
        f"  adapters     {_count(e.adapter_params)} parameters: {gb(e.adapter_params * ADAMW_BYTES)} with their "
        f"gradients and AdamW state (fp32)" + (f", {gb(e.adapter_fixed)} of fixed tensors (bases, frozen experts)"
                                               if e.adapter_fixed else ""),
        f"  activations  per image {gb(per_plain)}, {gb(per_ckpt)} with --gradient-checkpointing; "
        f"{gb(e.activation_bytes(cfg.gradient_checkpointing))} at batch {cfg.batch_size}",
        f"  vae encode   per image {gb(e.encode)} (a latent not cached yet, before the forward: the step needs the "
        f"larger, {gb(e.working_bytes(cfg.gradient_checkpointing))})",
        f"  runtime      {gb(e.runtime)} ({e.runtime_note})",
        f"  total        {gb(e.total(cfg.gradient_checkpointing))}"])


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 10 ** 5 else f"{n:,}"  # SVF on the mini base trains 4,224


def advise(estimate: Estimate, cfg, budget: int) -> str:
    """The cheapest settings that fit ``budget``, or a StudioError naming the smallest estimate."""
    options = [(flags, total_of(estimate, cfg, changes)) for flags, changes in settings(cfg)]
    if options[0][1] <= budget:
        return f"fits --vram-budget {gb(budget)}: {gb(options[0][1])} as configured"
    for flags, total in options[1:]:
        if total <= budget:
            return f"to fit --vram-budget {gb(budget)} ({gb(options[0][1])} as configured) turn on: {flags} ({gb(total)})"
    flags, smallest = min(options, key=lambda o: o[1])
    raise StudioError(f"no memory setting fits --vram-budget {gb(budget)}: the smallest estimate is {gb(smallest)} "
                      f"({flags or 'as configured'}): lower --resolution, train fewer --targets, or use a larger GPU")
