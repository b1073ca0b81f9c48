"""The Bake and Inspect tabs (the Generate and Train tabs have their own modules)."""

from __future__ import annotations

import gradio as gr

from studio.formats.inspection import render_text
from studio.ui.generate_tab import slot_request
from studio.ui.service import Studio


def bake_tab(studio: Studio, run, generate: dict) -> None:
    gr.Markdown("Save the current mix (the Generate tab's adapters and weights) as one LoRA file in "
                "`baked/` of the library. **Exact** concatenates ranks; a **rank** keeps the largest singular "
                "values of each module and reports the energy kept.")
    with gr.Row():
        name = gr.Textbox("my-mix", label="file name", elem_id="bake_name")
        rank = gr.Number(0, precision=0, minimum=0, label="rank (0 = exact)", elem_id="bake_rank")
        fmt = gr.Radio(["kohya", "native", "diffusers"], value="kohya", label="format", elem_id="bake_format")
        overwrite = gr.Checkbox(label="overwrite", value=False)
    go = gr.Button("Bake", variant="primary", elem_id="bake")
    report = gr.Markdown(elem_id="bake_report")

    def on_bake(name_, rank_, fmt_, overwrite_, *values):
        settings, slots = values[:11], values[11:]
        request = slot_request(settings[0], *settings[1:3], 0, 1, 1.0, 0, 0, "ddim", 1, slots)
        if not request.mix:
            raise gr.Error("the mix is empty: add adapters in the Generate tab first")
        return studio.bake(request, name_, int(rank_ or 0) or None, fmt_, bool(overwrite_))

    go.click(run(on_bake), [name, rank, fmt, overwrite] + generate["settings"] + generate["slots"], report,
             api_name="bake", concurrency_id="model", concurrency_limit=1)


def inspect_tab(studio: Studio, run, generate: dict) -> None:
    with gr.Row():
        key = gr.Dropdown(studio.library.keys, value=None, label="adapter", allow_custom_value=True,
                          elem_id="inspect_key", scale=3)
        go = gr.Button("Inspect", elem_id="inspect", scale=1)
    text = gr.Textbox(label="summary", lines=12, elem_id="inspect_text")
    raw = gr.JSON(label="all fields")

    def on_inspect(key_):
        if not key_:
            raise gr.Error("pick an adapter from the list")
        info = studio.inspect(key_)
        # a JSON object with a "path" key reads as a file reference to Gradio's client: rename it
        return render_text(info), {"file" if k == "path" else k: v for k, v in info.items()}

    go.click(run(on_inspect), key, [text, raw], api_name="inspect")
    generate["pick"].change(lambda k: gr.update(value=k), generate["pick"], key, api_visibility="private")
    key.focus(lambda: gr.update(choices=studio.library.keys), None, key, api_visibility="private")
