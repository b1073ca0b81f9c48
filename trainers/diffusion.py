"""``studio train``: a style or character adapter on a Stable Diffusion base, top to bottom.

    data  -> buckets -> (cached) latents + (cached) text embeddings
    noise -> UNet with adapters -> epsilon / v loss (min-SNR, prior preservation) -> AdamW
    every N steps: atomic checkpoint, a sample grid from studio.pipeline, TensorBoard scalars

Everything random at step N comes from generators seeded by (seed, N, purpose) and the data
order is a function of (seed, epoch), so ``--resume`` continues bit-identically and P
processes (``accelerate launch``) split exactly the global batch one process would see.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

import studio.adapters as A
from studio import formats
from studio.adapters import training
from studio.config import to_toml
from studio.errors import StudioError
from studio.models import load_diffusion_base
from trainers import batches, blocks, data_images, loop, masks, memory, validation
from trainers import diffusion_outputs as outputs, extras, optimizers, relora
from trainers.caches import TensorCache, default_cache_dir, fingerprint
from trainers.diffusion_config import DiffusionTrainConfig
from trainers.output import prepare_output, write_text_atomic


def _pixels(images: list[np.ndarray], device) -> torch.Tensor:
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device)  # (n, 3, h, w) in [-1, 1]


def train(cfg: DiffusionTrainConfig, resume: bool = False, say=print) -> Path:
    from diffusers import DDPMScheduler
    from torch.utils.tensorboard import SummaryWriter

    # 1. everything that can fail on user input fails here, before anything is written
    items, val_items = validation.select(cfg, data_images.scan(cfg.data))
    reg_items = data_images.scan(cfg.reg_data) if cfg.reg_data else []
    every = items + reg_items + val_items  # one index space: training, regularisation, held-out images
    pictures = [data_images.load_image(i.path) for i in every]
    mask_arrays = masks.load_all(every, pictures)  # a mask of another size than its image fails here
    composed = composed_experts(cfg) if cfg.mixture_of else None  # --mixture-of: the experts' files, checked
    out = cfg.out_dir
    identity = cfg.identity
    start_checkpoint = prepare_output(out, resume, identity)
    # the UNet trains in its stored layout: channels-last saved it no time in a training step (SD1.5
    # at 256 px, mini base at 64 px) and cost ~200 MB of activations on SD1.5; the VAE keeps it
    base = load_diffusion_base(cfg.base, channels_last=("vae",))
    pipe, unet, vae = base.pipe, base.pipe.unet, base.pipe.vae

    accelerator = loop.make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    device, world, rank_index = accelerator.device, accelerator.num_processes, accelerator.process_index
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = cfg.prediction_type or noise_scheduler.config.prediction_type
    noise_scheduler.register_to_config(prediction_type=prediction)
    resolution = cfg.resolution or base.resolution
    multiple = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    bucket_list = (batches.make_buckets(resolution, multiple, max(multiple, resolution // 2), resolution * 2)
                   if cfg.buckets else [(resolution, resolution)])
    buckets_of = [batches.nearest_bucket(p.shape[1], p.shape[0], bucket_list) for p in pictures]
    fitted = [batches.fit_to_bucket(p, b) for p, b in zip(pictures, buckets_of)]
    latent_masks = masks.LatentMasks(mask_arrays, buckets_of, pipe.vae_scale_factor)
    del mask_arrays

    # 2. adapters on the UNet and / or the text encoders, on the CPU while the base is still fp32
    # (PiSSA's, MiLoRA's, SVF's, DoRA's ... inits read W0), then the frozen base cast to
    # --base-dtype, then everything to the device: a bf16 SDXL base never sits on a GPU in fp32
    torch.manual_seed(cfg.seed)
    ti = cfg.ti_module  # textual inversion's token rows: alone (--method ti, no layer adapter) or --with-ti
    name = cfg.adapter_name
    vae.requires_grad_(False)  # it only encodes
    groups = attach_adapters(cfg, base.components, base.family, name, composed)
    # the memory switches (trainers/memory.py): the adapters stay fp32 whatever the base's dtype
    base_dtype = memory.DTYPES[cfg.base_dtype]
    for model in [unet, vae, *base.text_encoders]:
        memory.cast_frozen(model, base_dtype)
    pipe.to(device, silence_dtype_warnings=True)  # keeps every parameter object: the groups stay the optimizer's
    rows = {}
    if ti:  # after the cast: the new rows stay fp32 whatever the base's dtype
        if cfg.with_ti:  # asked now, not at the save: the kohya file bundles the token under its name
            from studio.formats.embedding import check_bundle_token
            check_bundle_token(cfg.ti_token, "--with-ti")
        rows = ti.add_trainable(pipe, cfg.ti_token, cfg.init_word, cfg.vectors, "the train config",
                                "--with-ti" if cfg.with_ti else "--token")
        groups.append(([m.vectors for m in rows.values()], cfg.lr_ti))
    # the UNet is checkpointed whenever anything trains (a text-encoder adapter's gradient flows
    # back through the whole UNet), a text encoder only when it has adapters
    if cfg.gradient_checkpointing:
        for model in [unet] + (list(base.text_encoders) if cfg.train_te else []):
            memory.enable_checkpointing(model)
    trained_models = ([unet] if cfg.train_unet else []) + (list(base.text_encoders) if cfg.train_te else [])
    groups = optimizers.loraplus_groups(groups, trained_models, name, cfg.loraplus_ratio)  # LoRA+: B at ratio x lr
    optimizer = loop.make_optimizer(groups, cfg.optimizer, cfg.optimizer_args, cfg.warmup_steps)
    hooked = training.has_hooks(trained_models, name)  # methods with an aux loss / after-step hook

    # 3. the schedule of global batches, and the total number of steps
    per_step = cfg.batch_size * world * cfg.grad_accum
    n = len(items)
    order = batches.BatchOrder([bucket_list.index(b) for b in buckets_of[:n]], [i.repeats for i in items], per_step, cfg.seed)
    reg_buckets = [bucket_list.index(b) for b in buckets_of[n:n + len(reg_items)]]
    reg_order = batches.BatchOrder(reg_buckets, [1] * len(reg_items), per_step, cfg.seed + 1) if reg_items else None
    total = cfg.total_steps(order.steps_per_epoch)
    if cfg.relora_every:
        relora.check_steps(cfg.relora_every, total)  # a run given in epochs knows its length only here
    training.check_steps(trained_models, name, total)  # methods with a schedule of their own (AdaLoRA's budget)
    schedule = loop.make_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, total, cfg.optimizer,
                                  cfg.relora_every or 0, relora.rewarm_steps(cfg.relora_every or 0, cfg.relora_warmup))
    optimizer = accelerator.prepare(optimizer)  # gradients are averaged across processes by hand below
    params = [p for group, _ in groups for p in group]
    extra = extras.Extras(cfg, base.components, name, optimizer, params)  # ReLoRA, EMA, schedule-free's weights
    start = 0
    if start_checkpoint is not None:
        start, tensors, states, saved_identity = loop.load_checkpoint(start_checkpoint)
        loop.check_identity(saved_identity, identity, start_checkpoint)
        _restore(base, name, tensors)
        if ti:
            ti.restore_rows(pipe, {c.removesuffix(".ti.vectors"): t for c, t in tensors.items()
                                     if c.endswith(".ti.vectors")})
        optimizer.load_state_dict(states["optimizer"])
        schedule.load_state_dict(states["schedule"])
        extra.load_state_dict(states)
        say(f"resumed from {start_checkpoint} at step {start}")
    if accelerator.is_main_process:
        write_text_atomic(out / "config.toml", to_toml(cfg))

    # 4. caches (latents always cacheable; text only while the text encoders are frozen)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # the latents depend on the VAE's encoder half only: fingerprinting the decoder would read
    # (and keep resident) 200 MB of SD1.5 weights that training never uses
    encoder = torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv or torch.nn.Identity()})
    latent_cache = TensorCache(cache_root / "latents" / fingerprint(encoder, base.source) if cfg.cache_latents else None)
    text_cache = TensorCache(cache_root / "text" / fingerprint(base.text_encoders[0], base.source)
                             if cfg.cache_text and cfg.text_frozen else None)
    hashes = [data_images.file_hash(i.path) for i in every] if cfg.cache_latents else []

    def posteriors(indices: list[int], flips: list[bool]) -> torch.Tensor:
        """(G, 2C, h, w) VAE posterior mean and std; misses are encoded in one batch."""
        keys = [f"{hashes[i]}/{buckets_of[i]}/{f}" if cfg.cache_latents else None for i, f in zip(indices, flips)]
        found = [latent_cache.lookup(k) if k else None for k in keys]
        missing = [j for j, entry in enumerate(found) if entry is None]
        if missing:
            images = [np.ascontiguousarray(fitted[indices[j]][:, ::-1] if flips[j] else fitted[indices[j]])
                      for j in missing]
            with torch.no_grad():
                dist = vae.encode(_pixels(images, device).to(base_dtype)).latent_dist
            for row, j in enumerate(missing):
                entry = {"mean": dist.mean[row], "std": dist.std[row]}
                found[j] = latent_cache.store(keys[j], entry) if keys[j] else entry
        return torch.stack([torch.cat([e["mean"], e["std"]]) for e in found]).to(device)

    def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if base.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds, pooled
        return pipe.encode_prompt(captions, device, 1, False)[0], None

    def text(captions: list[str]):
        if not (cfg.cache_text and cfg.text_frozen):
            return encode_text(captions)
        rows = [text_cache.get(c, lambda c=c: _pack(encode_text([c]))) for c in captions]
        embeds = torch.stack([r["embeds"][0] for r in rows]).to(device)
        pooled = torch.stack([r["pooled"][0] for r in rows]).to(device) if "pooled" in rows[0] else None
        return embeds, pooled

    def denoise(latents, noise, timesteps, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted UNet's prediction on noised ``latents`` and its training target."""
        embeds, pooled = text(captions)
        embeds, pooled = embeds.to(base_dtype), None if pooled is None else pooled.to(base_dtype)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        extra = {}
        if base.family == "sdxl":
            h, w = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(latents), dtype=embeds.dtype, device=device)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        pred = unet(noisy.to(base_dtype), timesteps, encoder_hidden_states=embeds, **extra).sample
        return pred, target

    sampler = cfg.timestep_sampler

    def micro_loss(step: int, micro: int, indices: list[int], offset: int, weight: float) -> torch.Tensor:
        """Loss of this process's share of one micro-batch; randomness keyed by global position."""
        purpose = f"{micro}/{offset}"
        g = loop.step_generator(cfg.seed, step, purpose)
        size = len(indices) // world
        mine = slice(rank_index * size, (rank_index + 1) * size)
        captions, flips = [], []
        for position, index in enumerate(indices):
            rng = random.Random(f"{cfg.seed}/{step}/{purpose}/{position}")
            item = every[index]
            caption = data_images.with_trigger(item.caption, cfg.trigger if index < n else None)
            captions.append(data_images.augment_caption(caption, rng, cfg.shuffle_captions, cfg.keep_tokens,
                                                        cfg.caption_dropout))
            flips.append(cfg.flip and rng.random() < 0.5)
        stats = posteriors(indices, flips).cpu().float()  # (G, 2C, h, w); a half VAE gives half
        mean, std = stats.chunk(2, dim=1)
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
        timesteps = sampler.draw(len(indices), noise_scheduler.config.num_train_timesteps, g)
        latents, noise, timesteps = latents[mine].to(device), noise[mine].to(device), timesteps[mine].to(device)
        pred, target = denoise(latents, noise, timesteps, captions[mine])
        weights = latent_masks.batch(indices[mine], flips[mine], tuple(latents.shape[-2:]))  # None: no masks
        per_sample = masks.weighted_mse(pred, target, weights)
        if cfg.min_snr_gamma:
            alphas = noise_scheduler.alphas_cumprod.to(device)[timesteps]
            snr = alphas / (1 - alphas)
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            per_sample = per_sample * (clipped / snr if prediction == "epsilon" else clipped / (snr + 1))
        loss = weight * per_sample.mean()
        extra_loss = training.aux_loss(trained_models, name) if hooked else None
        return loss if extra_loss is None else loss + extra_loss

    # 5. the loop
    writer = SummaryWriter(str(out / "logs")) if accelerator.is_main_process else None
    samples = outputs.sample_settings(cfg, items)
    log = validation.LossLog(out, start) if accelerator.is_main_process else None
    validator = (validation.Validator(list(range(len(every) - len(val_items), len(every))),
                                      [data_images.with_trigger(i.caption, cfg.trigger) for i in val_items],
                                      buckets_of[len(every) - len(val_items):], cfg.batch_size, cfg.seed,
                                      noise_scheduler.config.num_train_timesteps) if val_items else None)

    def validate(done: int) -> float | None:
        """The validation loss at step ``done`` when one is due (main process only), else None."""
        if validator is None or not ((cfg.val_every and done % cfg.val_every == 0) or done == total):
            return None
        # the weights a file would hold: schedule-free's average (ReLoRA's accumulated delta is live already)
        with extra.evaluation(), validation.evaluating([unet, *base.text_encoders, vae]), accelerator.autocast():
            value = validator.loss(posteriors, denoise, latent_masks, vae.config.scaling_factor, device)
        writer.add_scalar("val_loss", value, done)
        if cfg.keep_best and log.improved(value):
            with extra.for_file():  # ReLoRA: restarted factors + the accumulated delta, folded as the final file
                outputs.save_adapter(cfg, base, name, out / f"{name}-best.safetensors", items, done,
                              time.perf_counter() - began, say=None)
        return value

    last_checkpoint = start_checkpoint
    from tqdm.auto import tqdm

    bar = tqdm(range(start, total), initial=start, total=total, disable=not accelerator.is_main_process,
               desc=f"{name} ({cfg.method})", unit="step")
    began = time.perf_counter()
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step * 97 + rank_index)  # adapter dropout only
        for module in rows.values() if cfg.ti_steps is not None and step >= cfg.ti_steps else ():
            module.vectors.requires_grad_(False)  # pivotal tuning's early stop: no gradient, AdamW skips it
        global_batch = order.batch(step)
        reg_batch = reg_order.batch(step) if reg_order else None
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            share = slice(micro * cfg.batch_size * world, (micro + 1) * cfg.batch_size * world)
            with accelerator.autocast():
                loss = micro_loss(step, micro, global_batch[share], 0, 1.0)
                if reg_batch is not None:
                    loss = loss + micro_loss(step, micro, [n + i for i in reg_batch[share]], 1, cfg.prior_loss_weight)
            loop.guard_finite(loss.detach(), step, last_checkpoint)
            accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
        loop.apply_step(accelerator, params, optimizer, schedule, cfg.max_grad_norm, world,
                        after=[(lambda: training.after_step(trained_models, name, step, total)) if hooked else None,
                               *extra.hooks(step, total)])
        done = step + 1
        loop.report_step(bar, writer, step_loss, schedule.get_last_lr()[0], done)
        if accelerator.is_main_process:  # before the checkpoint: a checkpoint of step N has its record
            log.write(done, step_loss, schedule.get_last_lr()[0], validate(done))
        if done % cfg.save_every == 0 or done == total:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_checkpoint = loop.save_checkpoint(out / "checkpoints", done, _adapter_tensors(base, name, ti),
                                                       optimizer, schedule, identity, extra.state_dict())
        if accelerator.is_main_process and cfg.save_adapter_every and done % cfg.save_adapter_every == 0 and done < total:
            with extra.for_file():
                outputs.save_adapter(cfg, base, name, out / f"{name}-step{done:07d}.safetensors", items, done,
                              time.perf_counter() - began, say=None)
        if accelerator.is_main_process and ((cfg.sample_every and done % cfg.sample_every == 0) or done == total):
            with extra.for_samples():  # the EMA when on
                outputs.render_samples(pipe, samples, out / "samples" / f"step-{done:07d}.png",
                                preview=out / f"{name}.preview.png" if done == total else None)
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    path = out / f"{name}.safetensors"
    if accelerator.is_main_process:
        with extra.for_file():
            outputs.save_adapter(cfg, base, name, path, items, total, time.perf_counter() - began, say)
        if extra.ema is not None:
            with extra.for_file(ema=True):
                outputs.save_adapter(cfg, base, name, out / f"{name}-ema.safetensors", items, total,
                              time.perf_counter() - began, say=None)
    return path


def attach_adapters(cfg: DiffusionTrainConfig, components: dict, family: str, name: str, composed=None) -> list:
    """The run's adapters on ``components`` ({"unet", "te" | "te1", "te2"}), every base tensor
    frozen; returns the optimizer's (parameters, lr) groups. The --check estimate attaches the
    same on its meta-device proxy (trainers/memory.py) and counts what this leaves trainable."""
    unet = components["unet"]
    text_encoders = [m for k, m in components.items() if k != "unet"]
    for model in components.values():
        model.requires_grad_(False)
    groups = []
    # a model with adapters to train is in training mode (adapter dropout; the SD bases have no
    # dropout of their own), the others stay in eval: new adapter layers take their model's mode
    if composed is not None:  # a router over frozen LoRA experts: only R and c train
        unet.train()
        formats.attach_file(composed, components, name)
        routers = [p for n, p in unet.named_parameters() if n.endswith((f"{name}.R", f"{name}.c"))]
        for p in set(A.trainable_parameters(unet, name)) - set(routers):
            p.requires_grad_(False)
        groups.append((routers, cfg.lr_unet))
    elif cfg.train_unet:
        unet.train()
        A.attach(unet, name, cfg.method, blocks.unet_config(cfg, family), cfg.unet_targets)
        groups += blocks.lr_groups(unet, name, family, cfg.lr_unet, blocks.parse(cfg.block_lrs, "--block-lrs", family))
    if cfg.train_te:  # (a layer method: a prompt-side run trains no text-encoder adapter)
        for te in text_encoders:
            te.train()
            A.attach(te, name, cfg.method, cfg.method_config(), "te-attn")
            groups.append((A.trainable_parameters(te, name), cfg.lr_te))
    return groups


def composed_experts(cfg: DiffusionTrainConfig):
    """The --mixture-of files as one MoLoRA file over their LoRA experts (studio/adapters/compose.py)."""
    from studio.adapters import compose

    files = [formats.read(path) for path in cfg.mixture_of]
    for path, af in zip(cfg.mixture_of, files):
        if af.base != files[0].base:
            raise StudioError(f"{path} is for a {af.base} base but {cfg.mixture_of[0]} for {files[0].base}: "
                              f"--mixture-of needs experts of one base")
        if set(af.parts) != {"unet"} or af.prompt:
            raise StudioError(f"{path} adapts {', '.join(sorted(af.parts)) or 'the prompt'}: --mixture-of routes UNet "
                              f"experts only: give adapters trained on the UNet alone (the default --targets)")
    experts = [(Path(p).stem, af.parts["unet"].method, af.parts["unet"].config, af.parts["unet"].modules())
               for p, af in zip(cfg.mixture_of, files)]
    config, tensors = compose.lora_experts(experts, cfg.method_args)
    return formats.AdapterFile(files[0].base, {"unet": formats.Part(compose.ROUTED, config, tensors)},
                               source={"path": ", ".join(cfg.mixture_of)})


def _pack(result) -> dict[str, torch.Tensor]:
    embeds, pooled = result
    return {"embeds": embeds} if pooled is None else {"embeds": embeds, "pooled": pooled}


def _adapter_tensors(base, name: str, kind=None) -> dict[str, torch.Tensor]:
    rows = {f"{c}.ti.vectors": v for c, v in kind.trained_rows(base.pipe).items()} if kind else {}
    return rows | {f"{c}.{k}": v for c, m in base.components.items() if name in A.adapter_names(m)
                   for k, v in A.adapter_state_dict(m, name).items()}


def _restore(base, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for component, model in base.components.items():
        if name not in A.adapter_names(model):
            continue
        for path, layer in A.targets.adapted_layers(model).items():
            adapter = layer.adapters[name]
            with torch.no_grad():
                for key in adapter.method.SAVED:
                    getattr(adapter, key).copy_(tensors[f"{component}.{path}.{key}"])
