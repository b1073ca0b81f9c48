"""What an image training run writes besides its checkpoints: the sample grids (and the library's
preview image), the adapter files (native, and kohya for every other tool) and textual-inversion
embeddings, with the kohya ``ss_*`` training metadata."""

from __future__ import annotations

from pathlib import Path

from studio import formats
from studio.adapters import registry
from studio.errors import StudioError
from studio.formats.export import default_energy
from studio.pipeline import Settings, generate, grid, save_png
from trainers import blocks, data_images, extras
from trainers.diffusion_config import DiffusionTrainConfig


def sample_settings(cfg: DiffusionTrainConfig, items) -> list[Settings]:
    prompts = list(cfg.sample_prompts)
    if not prompts:
        seen = []
        for item in items:
            caption = data_images.with_trigger(item.caption, cfg.trigger)
            if caption and caption not in seen:
                seen.append(caption)
        prompts = seen[:4] or [cfg.trigger or ""]
    return [Settings(prompt=p, seed=seed, steps=cfg.sample_steps, cfg=cfg.sample_cfg) for p in prompts for seed in (0, 1)]


def render_samples(pipe, settings: list[Settings], path: Path, preview: Path | None = None) -> None:
    """Render the grid in eval mode, then give every module back its own mode: ``train(mode)`` on
    a parent would set all its children alike, and an adapter may train inside a frozen eval
    model (or the reverse). SDXL's second text encoder and the VAE are included."""
    pipe.set_progress_bar_config(disable=True)
    models = [m for m in (getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2", "vae"))
              if m is not None]
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        images = generate(pipe, settings)
    finally:
        for module, mode in modes:
            module.training = mode
    text = "\n\n".join(f"{s.prompt}\nSeed: {s.seed}, Steps: {s.steps}, CFG scale: {s.cfg:g}" for s in settings)
    save_png(grid(images, cols=2), path, text)
    if preview is not None:  # the library's card image (A1111's NAME.preview.png): the first sample alone
        save_png(images[0], preview, text.split("\n\n")[0])


def save_adapter(cfg, base, name: str, path: Path, items, steps: int, seconds: float, say) -> None:
    """The adapter in the studio's exact layout at ``path``; with ``say``, also the kohya file beside it.
    Textual inversion writes its embedding in A1111's layout instead (the one file every tool loads)."""
    if cfg.prompt_kind:
        save_embedding(cfg, base, path, steps, say)
        return
    bundle = {}  # pivotal tuning: the kohya file also carries the token (A1111's bundle_emb keys, formats.kohya)
    if cfg.with_ti:  # pivotal tuning: the token's file beside the LoRA ('kbot-step0000100' beside 'NAME-step0000100')
        stem = cfg.ti_file_stem + path.stem[len(name):]
        emb = save_embedding(cfg, base, path.with_name(f"{stem}{'-emb' if stem == path.stem else ''}.safetensors"),
                              steps, say)
        bundle = {"embeddings": [emb]}
    tags: dict[str, int] = {}
    for item in items:
        for tag in (t.strip() for t in data_images.with_trigger(item.caption, cfg.trigger).split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    metadata = formats.training_metadata(
        title=name, output_name=name, trigger_phrase=cfg.trigger, steps=steps, seed=cfg.seed,
        unet_lr=cfg.lr_unet, text_encoder_lr=cfg.lr_te if cfg.train_te else None,
        num_train_images=len(items), base_model_name=cfg.base or "mini-sd", resolution=cfg.resolution or base.resolution,
        tag_frequency={cfg.dataset_name: tags}, training_comment=f"studio train, {seconds:.0f} s",
        network_args=extras.network_args(cfg, blocks.network_args(cfg, base.family)),  # kohya's ss_network_args
        **extras.metadata(cfg))  # optimizer, ReLoRA, EMA
    af = formats.from_models(base.components, name, metadata=metadata)
    formats.save(af, path, "native", overwrite=True)
    if say is None:
        return
    if registry.get(cfg.method).TRAITS.export == "none":  # routed experts: no fixed delta, no plain LoRA
        say(f"adapter: {path} (native, for the studio; a {cfg.method} adapter has no kohya form)")
        return
    kohya = path.with_name(f"{name}.kohya.safetensors")
    # LyCORIS-layout methods (DoRA) stay exact; truncated plain-LoRA exports keep their declared energy
    energy = default_energy(af, "kohya")
    af = af.replace(source={**af.source, **bundle})
    try:
        report = formats.save(af, kohya, "kohya", dtype="fp16", energy=energy, models=base.components, overwrite=True)
    except StudioError as err:
        fallback = registry.get(cfg.method).TRAITS.default_energy
        if energy is not None or fallback is None:
            raise
        say(f"note: {err}; writing a plain LoRA keeping {fallback:.0%} of the energy instead")
        report = formats.save(af, kohya, "kohya", dtype="fp16", energy=fallback, models=base.components,
                              overwrite=True)
    say(f"adapter: {path} (exact, for the studio)\n"
        f"A1111 / ComfyUI / Forge / kohya: {kohya} (retained energy {report.energy:.4f})"
        + (f"\n  with {cfg.ti_token} bundled (bundle_emb keys: A1111 and the studio install it from this one file; "
           f"ComfyUI and diffusers need the embedding file, and diffusers' LoRA loader refuses bundled keys)"
           if bundle else ""))


def save_embedding(cfg, base, path: Path, steps: int, say):
    from studio.formats import embedding

    emb = embedding.Embedding(cfg.ti_token, cfg.ti_module.trained_rows(base.pipe), where=str(path))
    embedding.write(emb, path, overwrite=True, extra=embedding.training_metadata(
        path, init_word=cfg.init_word, steps=steps, seed=cfg.seed, base_name=cfg.base or cfg.BASE_NAME))
    if say is not None:
        say(embedding.usage(emb, path))
    return emb
