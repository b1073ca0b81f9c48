"""``studio train --task lm``: an adapter on a causal language model, top to bottom.

    text file -> packed blocks | .jsonl -> prompt + response examples (loss on the response)
    causal LM with adapters (lm-attn / lm-mlp) -> cross-entropy -> AdamW
    every N steps: atomic checkpoint, TensorBoard scalars; at the end greedy text samples

The same adapter core, loop helpers and resume rule as the diffusion trainer: the data order is
a function of (seed, epoch) and the only other randomness (adapter / GPT-2 dropout) is seeded by
(seed, step), so ``--resume`` after a kill continues bit-identically, and P processes
(``accelerate launch``) each take their slice of the same global batch.

The result, ``DIR/<name>.safetensors``, is the studio's native file with base family ``lm``;
the formats refuse it on a diffusion base (and a diffusion adapter on a language model).
``studio export --format peft`` turns it into a PEFT adapter folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import studio.adapters as A
from studio.adapters import registry, training
from studio import formats
from studio.config import to_toml
from studio.models import load_causal_lm
from studio.prompt import prefix
from studio.text import complete
from trainers import batches, data_text, loop, memory
from trainers import extras, optimizers, relora
from trainers.language_config import LMTrainConfig
from trainers.output import prepare_output, write_text_atomic

COMPONENT = "lm"
"""The component name of a language model in adapter files (``lm.<module path>.<tensor>``)."""
PREFIX_STATE = "prompt.train."
"""Checkpoint keys of a prefix's trained parameters (the MLP's too, which the adapter file drops)."""


def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def text_room(cfg: LMTrainConfig, model) -> int:
    """Positions an example may take: the context less the run's prefix (refused when it leaves none)."""
    context = context_length(model)
    return context - prefix.check_length(cfg.prefix_tokens, context) if cfg.prefix_tokens else context


def train(cfg: LMTrainConfig, resume: bool = False, say=print) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    # 1. everything that can fail on user input fails here, before anything is written
    data_text.read_text(cfg.data)
    out = cfg.out_dir
    identity = cfg.identity
    start_checkpoint = prepare_output(out, resume, identity)
    model, tokenizer = load_causal_lm(cfg.base)
    room = text_room(cfg, model)
    examples = data_text.load_examples(cfg.data, tokenizer, cfg.block_size or room, room)

    accelerator = loop.make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    device, world, rank_index = accelerator.device, accelerator.num_processes, accelerator.process_index

    # 2. the adapter, on the CPU while the base is still fp32 (inits that read W0), then the frozen
    # base cast to --base-dtype, then everything to the device: the base never sits there in fp32
    torch.manual_seed(cfg.seed)
    name = cfg.adapter_name
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.layer_method is not None:
        A.attach(model, name, cfg.method, cfg.method_config(), cfg.target_list)
    params = A.trainable_parameters(model, name) if cfg.layer_method is not None else []
    encoder = None  # prefix tuning: its parameters live beside the model and train at their own lr
    if cfg.prefix_tokens:
        encoder = prefix.for_training(model, cfg.prefix_tokens, cfg.prefix_projection,
                                      torch.tensor(examples[0].input_ids))
    memory.cast_frozen(model, memory.DTYPES[cfg.base_dtype])  # the adapters stay fp32 (trainers/memory.py)
    model.to(device)  # keeps every parameter object: ``params`` stays the optimizer's
    if encoder is not None:  # beside the model, not a submodule
        encoder.to(device)
    if cfg.gradient_checkpointing:
        memory.enable_checkpointing(model)
    groups = optimizers.loraplus_groups([(params, cfg.learning_rate)] if params else [], [model], name,
                                        cfg.loraplus_ratio)  # LoRA+
    if encoder is not None:
        groups.append((list(encoder.parameters()), cfg.prefix_learning_rate))
    trained = params + (list(encoder.parameters()) if encoder is not None else [])  # averaged and clipped together
    optimizer = loop.make_optimizer(groups, cfg.optimizer, cfg.optimizer_args, cfg.warmup_steps)
    hooked = training.has_hooks([model], name)  # methods with an aux loss / after-step hook

    # 3. the schedule of global batches and the number of steps
    per_step = cfg.batch_size * world * cfg.grad_accum
    order = batches.BatchOrder([0] * len(examples), [1] * len(examples), per_step, cfg.seed)
    total = cfg.total_steps(order.steps_per_epoch)
    if cfg.relora_every:
        relora.check_steps(cfg.relora_every, total)  # a run given in epochs knows its length only here
    training.check_steps([model], name, total)  # methods with a schedule of their own (AdaLoRA's budget)
    schedule = loop.make_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, total, cfg.optimizer,
                                  cfg.relora_every or 0, relora.rewarm_steps(cfg.relora_every or 0, cfg.relora_warmup))
    optimizer = accelerator.prepare(optimizer)  # gradients are averaged across processes by hand below
    extra = extras.Extras(cfg, {COMPONENT: model}, name, optimizer, params)  # ReLoRA, EMA, schedule-free's weights
    start = 0
    if start_checkpoint is not None:
        start, tensors, states, saved_identity = loop.load_checkpoint(start_checkpoint)
        loop.check_identity(saved_identity, identity, start_checkpoint)
        _restore(model, name, tensors)
        if encoder is not None:
            encoder.load_state_dict({k[len(PREFIX_STATE):]: v for k, v in tensors.items() if k.startswith(PREFIX_STATE)})
        optimizer.load_state_dict(states["optimizer"])
        schedule.load_state_dict(states["schedule"])
        extra.load_state_dict(states)
        say(f"resumed from {start_checkpoint} at step {start}")
    if accelerator.is_main_process:
        write_text_atomic(out / "config.toml", to_toml(cfg))

    def micro_loss(indices: list[int]) -> torch.Tensor:
        """This process's share of the micro-batch's mean token loss (see ``token_loss``)."""
        size = len(indices) // world
        mine = indices[rank_index * size:(rank_index + 1) * size]
        batch = {k: v.to(device) for k, v in data_text.collate([examples[i] for i in mine], tokenizer.pad_token_id).items()}
        targets = max(1, sum(examples[i].targets for i in indices))  # the whole micro-batch, every process alike
        loss = token_loss(model, batch, targets / world)
        extra_loss = training.aux_loss([model], name) if hooked else None
        return loss if extra_loss is None else loss + extra_loss

    # 4. the loop
    writer = SummaryWriter(str(out / "logs")) if accelerator.is_main_process else None
    last_checkpoint = start_checkpoint
    model.train()
    bar = tqdm(range(start, total), initial=start, total=total, disable=not accelerator.is_main_process,
               desc=f"{name} ({cfg.method})", unit="step")
    began = time.perf_counter()
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step * 97 + rank_index)  # dropout only
        global_batch = order.batch(step)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            share = global_batch[micro * cfg.batch_size * world:(micro + 1) * cfg.batch_size * world]
            with accelerator.autocast():
                loss = micro_loss(share)
            loop.guard_finite(loss.detach(), step, last_checkpoint)
            accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
        loop.apply_step(accelerator, trained, optimizer, schedule, cfg.max_grad_norm, world,
                        after=[(lambda: training.after_step([model], name, step, total)) if hooked else None,
                               *extra.hooks(step, total)])
        done = step + 1
        loop.report_step(bar, writer, step_loss, schedule.get_last_lr()[0], done)
        if done % cfg.save_every == 0 or done == total:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_checkpoint = loop.save_checkpoint(out / "checkpoints", done, _adapter_tensors(model, name, encoder),
                                                       optimizer, schedule, identity, extra.state_dict())
        if accelerator.is_main_process and ((cfg.sample_every and done % cfg.sample_every == 0) or done == total):
            with extra.for_samples():  # the EMA when on
                _write_samples(model, tokenizer, cfg, writer, out / "samples.txt", done)
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    path = out / f"{name}.safetensors"
    if accelerator.is_main_process:
        with extra.for_file():
            _save_adapter(cfg, model, name, path, len(examples), total, time.perf_counter() - began, encoder)
        if extra.ema is not None:
            with extra.for_file(ema=True):
                _save_adapter(cfg, model, name, out / f"{name}-ema.safetensors", len(examples), total,
                              time.perf_counter() - began)
        routed = cfg.layer_method is not None and registry.get(cfg.method).TRAITS.export == "none"  # no PEFT form
        say(f"adapter: {path} (native" + ("; a routed mixture, no PEFT form)" if routed else
                                           f"; `studio export {path} --format peft -o DIR` for PEFT)"))
    return path


def token_loss(model, batch: dict[str, torch.Tensor], denominator: float) -> torch.Tensor:
    """Summed next-token cross-entropy of ``batch`` divided by ``denominator``.

    With ``denominator`` = (target tokens of the whole micro-batch) / (processes), the gradients
    averaged over P processes equal those of one process on the whole batch: the mean over *all*
    target tokens. A per-process mean (what ``model(labels=...).loss`` gives) would weight the
    tokens of a process with short responses more.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                              labels.reshape(-1), ignore_index=data_text.IGNORE, reduction="sum")
    return total / denominator


def _adapter_tensors(model, name: str, encoder=None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the layer adapter's, and a prefix's trained parameters (its MLP too)."""
    tensors = {f"{COMPONENT}.{k}": v for k, v in A.adapter_state_dict(model, name).items()} if name in A.adapter_names(model) \
        else {}
    if encoder is not None:
        tensors |= {f"{PREFIX_STATE}{k}": v.detach().clone() for k, v in encoder.state_dict().items()}
    return tensors


def _restore(model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for path, layer in A.targets.adapted_layers(model).items():
        adapter = layer.adapters[name]
        with torch.no_grad():
            for key in adapter.method.SAVED:
                getattr(adapter, key).copy_(tensors[f"{COMPONENT}.{path}.{key}"])


def sample_prompts(cfg: LMTrainConfig) -> list[str]:
    if cfg.sample_prompts:
        return list(cfg.sample_prompts)
    if data_text.is_instruction_file(cfg.data):
        return [r["prompt"] for _, r in data_text.read_records(cfg.data)[:2]]
    return [data_text.read_text(cfg.data).strip().splitlines()[0][:80]]


def _write_samples(model, tokenizer, cfg: LMTrainConfig, writer, path: Path, step: int) -> None:
    """Greedy answers to the sample prompts; prompts with no room left in the context are skipped
    (a sample must never stop a finished run from saving its adapter)."""
    room = context_length(model) - prefix.installed_length(model) - cfg.sample_tokens
    prompts = [p for p in sample_prompts(cfg) if len(tokenizer(p)["input_ids"]) <= room]
    if not prompts:
        return
    model.eval()
    try:
        texts = complete(model, tokenizer, prompts, max_new_tokens=cfg.sample_tokens, stop=None)
    finally:
        model.train()
    block = "\n\n".join(f"{p}{t}" for p, t in zip(prompts, texts))
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text_atomic(path, previous + f"== step {step}\n{block}\n\n")
    if writer:
        writer.add_text("samples", block.replace("\n", "  \n"), step)


def _save_adapter(cfg: LMTrainConfig, model, name: str, path: Path, examples: int, steps: int, seconds: float,
                  encoder=None) -> None:
    metadata = formats.training_metadata(
        title=name, output_name=name, steps=steps, seed=cfg.seed, learning_rate=cfg.learning_rate,
        base_model_name=cfg.base or "mini-lm", training_comment=f"studio train --task lm, "
        f"{seconds:.0f} s", lm_architecture=model.config.model_type, lm_examples=examples,
        lm_data=Path(cfg.data).name, network_args=extras.network_args(cfg, None), **extras.metadata(cfg))
    if encoder is not None:
        metadata["studio.prefix"] = f"{cfg.prefix_tokens} virtual tokens" + (
            f", trained through a {cfg.prefix_projection}-wide MLP (folded)" if cfg.prefix_projection else "")
    prompt_side = encoder.fold() if encoder is not None else {}  # the prefixes alone: the MLP is dropped
    af = (formats.from_models({COMPONENT: model}, name, base="lm", metadata=metadata).replace(prompt=prompt_side)
          if cfg.layer_method is not None else formats.AdapterFile("lm", {}, metadata=metadata, prompt=prompt_side))
    formats.save(af, path, "native", overwrite=True)
