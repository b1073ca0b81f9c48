"""The Bake, Train and Inspect tabs (the Generate tab has its own module)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.adapters import registry
from studio.formats.inspection import render_text
from studio.ui.generate_tab import slot_request
from studio.ui.service import Studio
from studio.ui.train_runner import TrainRun


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


def _loss_frame(losses):
    import pandas as pd

    return pd.DataFrame(losses or [(0, float("nan"))], columns=["step", "loss"])


def train_tab(studio: Studio, runner: TrainRun, datasets: dict[str, Path], run, generate: dict) -> None:
    gr.Markdown("Train an adapter on a dataset folder in a background process; the UI stays usable, and the "
                "finished adapter appears in the library.")
    with gr.Row():
        data = gr.Dropdown(list(datasets), value=next(iter(datasets), None), label="dataset", elem_id="train_data")
        methods = list(registry.METHODS)
        method = gr.Radio(methods, value=methods[0], label="method", info=registry.help_text(), elem_id="train_method")
        rank = gr.Number(8, precision=0, minimum=1, maximum=256, label="rank", elem_id="train_rank")
        steps = gr.Number(200, precision=0, minimum=1, label="steps", elem_id="train_steps")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train_start")
        stop = gr.Button("Stop", variant="stop", elem_id="train_stop")
    status = gr.Markdown("idle: pick a dataset, a method and press Start", elem_id="train_status")
    with gr.Row():
        plot = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="training loss", elem_id="train_loss",
                           height=260)
        sample = gr.Image(label="latest samples", format="png", type="filepath", elem_id="train_sample", height=260)
    timer = gr.Timer(1.0)
    last = gr.State(None)  # per browser: what it shows, so an unchanged tick sends nothing

    def on_start(data_, method_, rank_, steps_):
        if data_ not in datasets:
            raise gr.Error(f"unknown dataset {data_!r}: pick one from the list")
        out = runner.start(datasets[data_], method_, int(rank_ or 8), int(steps_ or 1))
        return f"started: {out.name} ({method_}, rank {int(rank_ or 8)}, {int(steps_ or 1)} steps)"

    def describe(s) -> str:
        if s.state == "idle":
            return "idle: pick a dataset, a method and press Start"
        share = f" ({100 * s.step / s.total:.0f} %)" if s.total else ""
        loss = f" · loss {s.losses[-1][1]:.4f}" if s.losses else ""
        return f"**{s.state}** · step {s.step}/{s.total}{share}{loss}" + (f"  \n{s.message}" if s.message else "")

    def on_tick(shown):
        s = runner.poll()
        now = (s.state, s.step, len(s.losses), str(s.sample), s.message)
        if now == shown:
            return [gr.skip()] * (4 + len(generate["refresh_outputs"]))
        library = [gr.skip()] * len(generate["refresh_outputs"])
        if shown is not None and shown[0] == "running" and s.state != "running":
            library = generate["refresh"]()  # the finished adapter shows up in the library
        return [now, describe(s), _loss_frame(s.losses), str(s.sample) if s.sample else None] + library

    start.click(run(on_start), [data, method, rank, steps], status, api_name="train_start")
    stop.click(run(lambda: describe(runner.stop())), None, status, api_name="train_stop")
    timer.tick(run(on_tick), last, [last, status, plot, sample] + generate["refresh_outputs"],
               api_visibility="private", show_progress="hidden")


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
