"""The Generate tab: base picker, library cards, the mix (adapter slots with sliders), prompt and
settings, the output gallery with parameters, and the X/Y grid over adapter weights.

The mix is a fixed set of ``SLOTS`` rows (as Fooocus's LoRA slots): a row shows once an adapter
is added to it. Fixed rows keep the ``/generate`` API signature stable for scripts and tests.
Events that touch the model share the ``model`` concurrency slot (one at a time, queued).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import gradio as gr
from studio.ui import gate_map
from studio.ui.library import Card
from studio.ui.service import MixRow, Request, Studio

SLOTS = 4
SAMPLER_CHOICES = [("DPM++ 2M", "dpmpp_2m"), ("Euler", "euler"), ("Euler a", "euler_a"), ("DDIM", "ddim")]


def placeholder(card: Card, folder: Path) -> Path:
    """A card image for an adapter without a preview: a tile coloured by its method (red for errors),
    written once per kind. A fixed file (not an array Gradio re-encodes on every refresh) is never
    rewritten while a browser is still downloading it."""
    from PIL import Image, ImageDraw

    label = ("broken file", "see caption") if card.error else (card.method.upper(), card.family)
    path = folder / f"card-{hashlib.sha1('|'.join(label).encode()).hexdigest()[:12]}.png"
    if path.is_file():
        return path
    digest = hashlib.sha1(card.method.encode()).digest()
    colour = (190, 60, 60) if card.error else tuple(90 + b % 120 for b in digest[:3])
    tile = Image.new("RGB", (128, 128), colour)
    draw = ImageDraw.Draw(tile)
    draw.text((10, 52), label[0], fill="white")
    draw.text((10, 70), label[1], fill="white")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tile.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def gallery_items(studio: Studio) -> list:
    cards = studio.outputs / "cards"
    return [(str(c.preview if c.preview and not c.error else placeholder(c, cards)), c.caption)
            for c in studio.library.scan()]


def card_markdown(card: Card) -> str:
    if card.error:
        return f"**{card.key}** — ⚠ {card.error}"
    triggers = ", ".join(card.triggers) or "—"
    return (f"**{card.key}** · {card.method} · rank {card.ranks} · {card.family} · trigger words: {triggers} · "
            f"hash `{card.hash12}`")


def slot_rows(values) -> tuple[MixRow, ...]:
    """(key, weight, split, te_weight) x SLOTS -> the mix; the TE weight only counts when split."""
    rows = []
    for i in range(SLOTS):
        key, weight, split, te_weight = values[4 * i: 4 * i + 4]
        if key:
            rows.append(MixRow(str(key), float(weight), float(te_weight) if split else None))
    return tuple(rows)


def slot_request(base, prompt, negative, seed, steps, cfg, width, height, sampler, count, slots) -> Request:
    return Request(prompt=prompt or "", negative=negative or "", seed=int(seed or 0), steps=int(steps or 1),
                   cfg=float(cfg), width=int(width or 0) or None, height=int(height or 0) or None, sampler=sampler,
                   count=int(count or 1), mix=slot_rows(slots), base=base)


def show_gate_maps(image) -> dict:
    """The heat maps under the images (``gate_map.draw_all`` of a generation), hidden without a routed mixture."""
    return gr.update(value=image, visible=image is not None)


def build(studio: Studio, run) -> dict:
    """Lay out the tab inside the current Blocks context; returns the components other tabs use.
    ``run(fn)`` wraps a handler so a StudioError becomes a UI message (app.py)."""
    with gr.Row():
        with gr.Column(scale=5, min_width=420):
            base = gr.Dropdown(list(studio.bases), value=next(iter(studio.bases)), label="base model", elem_id="base")
            prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt",
                                placeholder="a red circle on a blue background")
            negative = gr.Textbox(label="negative prompt", lines=1, elem_id="negative")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", min_width=90)
                randomize = gr.Checkbox(label="random seed", value=False, elem_id="randomize", min_width=90)
                count = gr.Number(value=1, precision=0, label="images", minimum=1, elem_id="count", min_width=90)
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label="steps", elem_id="steps")
                cfg = gr.Slider(0, 30, value=4.0, step=0.5, label="CFG scale", elem_id="cfg")
            with gr.Row():
                width = gr.Number(value=0, precision=0, label="width (0 = native)", elem_id="width", min_width=90)
                height = gr.Number(value=0, precision=0, label="height (0 = native)", elem_id="height", min_width=90)
                sampler = gr.Dropdown(SAMPLER_CHOICES, value="dpmpp_2m", label="sampler", elem_id="sampler")
            gr.Markdown("**Mix** — weights move instantly: adapters stay unmerged, nothing reloads.")
            slots, groups = [], []
            for i in range(SLOTS):
                with gr.Group(visible=False, elem_id=f"slot{i}") as group:
                    with gr.Row(equal_height=True):
                        key = gr.Dropdown(studio.library.keys, value=None, label=f"adapter {i + 1}",
                                          allow_custom_value=True, elem_id=f"slot{i}_key", scale=3)
                        weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", elem_id=f"slot{i}_weight",
                                           scale=3)
                        remove = gr.Button("✕", size="sm", min_width=40, scale=0, elem_id=f"slot{i}_remove")
                    with gr.Row():
                        split = gr.Checkbox(label="separate text-encoder weight", value=False,
                                            elem_id=f"slot{i}_split")
                        te_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="text-encoder weight",
                                              elem_id=f"slot{i}_te", visible=False)
                split.change(lambda on: gr.update(visible=on), split, te_weight, api_visibility="private")
                remove.click(lambda: (None, gr.update(visible=False)), None, [key, group], api_visibility="private")
                slots += [key, weight, split, te_weight]
                groups.append(group)
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        with gr.Column(scale=4, min_width=360):
            gallery = gr.Gallery(label="images", format="png", columns=3, height="auto", elem_id="output_gallery",
                                 object_fit="contain", allow_preview=False)
            gate_maps = gr.Image(label="router: mean gate per expert and block (last image)", type="pil",
                                 format="png", interactive=False, visible=False, elem_id="gate_maps", height="auto",
                                 show_label=False)  # each map has its title: the label badge would cover it
            maps_state = gr.State(None)  # the generate event's maps, shown by a follow-up (/generate keeps its outputs)
            parameters = gr.Textbox(label="parameters (also in each PNG)", lines=4, elem_id="parameters",
                                    buttons=["copy"])
            with gr.Accordion("Library", open=True):
                cards = gr.Gallery(gallery_items(studio), label="adapters (click a card, then Add)", columns=4,
                                   height="auto", allow_preview=False, elem_id="library", format="png")
                with gr.Row():
                    pick = gr.Dropdown(studio.library.keys, value=None, label="adapter", allow_custom_value=True,
                                       elem_id="pick", scale=3)
                    add = gr.Button("Add to mix", elem_id="add", scale=1)
                    refresh = gr.Button("↻", size="sm", min_width=40, scale=0, elem_id="refresh")
                details = gr.Markdown("", elem_id="card_details")
            with gr.Accordion("Upload an adapter or a card preview", open=False):
                with gr.Row():
                    upload = gr.File(label="adapter (.safetensors)", file_types=[".safetensors"],
                                     elem_id="upload_adapter")
                    preview_upload = gr.File(label="preview for the picked adapter (.png/.jpg)",
                                             file_types=[".png", ".jpg", ".jpeg"], elem_id="upload_preview")
            with gr.Accordion("X/Y grid over adapter weights (fixed seed)", open=False):
                with gr.Row():
                    x_slot = gr.Dropdown([1, 2, 3, 4], value=1, label="X: slot", elem_id="x_slot")
                    x_values = gr.Textbox("0, 0.5, 1", label="X weights", elem_id="x_values")
                with gr.Row():
                    y_slot = gr.Dropdown([("none", 0), 1, 2, 3, 4], value=0, label="Y: slot", elem_id="y_slot")
                    y_values = gr.Textbox("0, 1", label="Y weights", elem_id="y_values")
                grid_go = gr.Button("Render grid", elem_id="grid")
                grid_image = gr.Image(label="X/Y grid", format="png", type="filepath", elem_id="grid_image")

    settings = [base, prompt, negative, seed, randomize, steps, cfg, width, height, sampler, count]

    def on_generate(base_, prompt_, negative_, seed_, randomize_, steps_, cfg_, width_, height_, sampler_, count_,
                    *slot_values, progress=gr.Progress()):
        if randomize_:
            seed_ = random.randrange(2**31)
        request = slot_request(base_, prompt_, negative_, seed_, steps_, cfg_, width_, height_, sampler_, count_,
                               slot_values)
        result = studio.generate(request, lambda i, n: progress((i, n), desc="rendering", unit="images"))
        for note in result.notes:
            gr.Warning(note)
        items = [(str(p), f"seed {request.seed + i}") for i, p in enumerate(result.paths)]
        return items, "\n\n".join(result.parameters), request.seed, gate_map.draw_all(result.gate_maps)

    outputs = [gallery, parameters, seed, maps_state]
    for event, visibility in ((go.click, {"api_name": "generate"}), (prompt.submit, {"api_visibility": "private"})):
        event(run(on_generate), settings + slots, outputs, concurrency_id="model", concurrency_limit=1,
              **visibility).success(show_gate_maps, maps_state, gate_maps,
                                    api_visibility="private")

    def on_grid(base_, prompt_, negative_, seed_, randomize_, steps_, cfg_, width_, height_, sampler_, count_,
                x_slot_, x_values_, y_slot_, y_values_, *slot_values, progress=gr.Progress()):
        request = slot_request(base_, prompt_, negative_, seed_, steps_, cfg_, width_, height_, sampler_, 1,
                               slot_values)
        # slot numbers are the visible rows; map them onto the filled rows of the mix
        filled = [i + 1 for i in range(SLOTS) if slot_values[4 * i]]
        index = {slot: n + 1 for n, slot in enumerate(filled)}
        result = studio.xy_grid(request, index.get(int(x_slot_), 0), x_values_,
                                index.get(int(y_slot_), 0) if int(y_slot_ or 0) else None, y_values_,
                                lambda i, n: progress((i, n), desc="grid", unit="images"))
        for note in result.notes:
            gr.Warning(note)
        return str(result.paths[0])

    grid_go.click(run(on_grid), settings + [x_slot, x_values, y_slot, y_values] + slots, grid_image,
                  api_name="xy_grid", concurrency_id="model", concurrency_limit=1)

    # -- library ------------------------------------------------------------------------------
    def on_select(evt: gr.SelectData):
        card = studio.library.cards[evt.index]
        return card.key, card_markdown(card)

    cards.select(run(on_select), None, [pick, details], api_visibility="private")

    def on_add(key, prompt_, *slot_values):
        card = studio.library.usable(key) if key else None
        if card is None:
            raise gr.Error("pick an adapter first: click a card in the library")
        keys = [slot_values[4 * i] for i in range(SLOTS)]
        if card.key in keys:
            raise gr.Error(f"{card.key} is already in the mix: move its slider instead")
        if all(keys):
            raise gr.Error(f"the mix has {SLOTS} adapters: remove one first")
        free = keys.index(None) if None in keys else next(i for i, k in enumerate(keys) if not k)
        words = [w for w in card.triggers if w.lower() not in (prompt_ or "").lower()]
        new_prompt = ", ".join(words + ([prompt_] if prompt_ else [])) if words else prompt_
        keys_out = [gr.update(value=card.key) if i == free else gr.update() for i in range(SLOTS)]
        visible = [gr.update(visible=True) if i == free else gr.update() for i in range(SLOTS)]
        return [new_prompt, *keys_out, *visible]

    add.click(run(on_add), [pick, prompt] + slots, [prompt] + slots[0::4] + groups, api_name="add_adapter")

    def on_refresh():
        items = gallery_items(studio)
        keys = studio.library.keys
        return [items, gr.update(choices=keys)] + [gr.update(choices=keys)] * SLOTS

    refresh_outputs = [cards, pick] + slots[0::4]
    refresh.click(run(on_refresh), None, refresh_outputs, api_name="refresh_library")

    def on_upload(file):
        if file is None:
            return [gr.skip()] * (len(refresh_outputs) + 1)
        key = studio.add_adapter(file)
        gr.Info(f"added {key} to the library")
        return on_refresh() + [None]

    upload.upload(run(on_upload), upload, refresh_outputs + [upload], api_name="upload_adapter")

    def on_preview(key, file):
        if file is None:
            return [gr.skip()] * (len(refresh_outputs) + 1)
        if not key:
            raise gr.Error("pick an adapter first: click a card in the library")
        studio.set_preview(key, file)
        return on_refresh() + [None]

    preview_upload.upload(run(on_preview), [pick, preview_upload], refresh_outputs + [preview_upload],
                          api_name="upload_preview")
    return {"settings": settings, "slots": slots, "cards": cards, "pick": pick, "refresh": on_refresh,
            "refresh_outputs": refresh_outputs}
