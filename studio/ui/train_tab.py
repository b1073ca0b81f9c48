"""The Train tab: the trainer's whole config as a form (``train_form``), a run in the background
(``train_runner``), its training / validation loss and its latest samples.

Layout, as a kohya_ss user expects it: the dataset and the config file buttons on top, the basic
options open, the rest in collapsed accordions; the run's controls, status, loss curve and
samples beside the form, so they stay in view while the form is scrolled.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.formats.files import write_atomic
from studio.ui import train_form
from studio.ui.security import check_upload, safe_filename
from studio.ui.service import Studio
from studio.ui.train_runner import REQUEST, TrainRun

PER_ROW = 3
IDLE = "idle: pick a dataset, set the options and press Start"


SERIES_COLOURS = {"training": "#4f6bed", "validation": "#e8772e"}


def loss_frame(losses, val_losses=()):
    """Training and validation loss as one long table: one line per series in the plot. Every
    series has a row from the first frame on (NaN until it has values): the browser's plot fixes
    its colours from the series of the first frame it draws, and would never draw one added later."""
    import pandas as pd

    rows = []
    for series, values in (("training", losses), ("validation", val_losses)):
        rows += [(s, v, series) for s, v in values] or [(0, float("nan"), series)]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def _widget(control: train_form.Control, picks: train_form.Picks):
    common = dict(label=control.label, info=control.info, elem_id=f"train_{control.name}")
    if control.lookup == "bases":
        names = list(picks.bases)
        return gr.Dropdown(names, value=picks.name_of("bases", control.default, control.name, "the defaults"), **common)
    if control.lookup:
        return gr.Dropdown([("none", "")] + [(n, n) for n in picks.datasets], value="", **common)
    if control.kind == "checkbox":
        return gr.Checkbox(value=control.default, **common)
    if control.kind == "dropdown":
        return gr.Dropdown(list(control.choices), value=control.default, **common)
    if control.kind == "number" and control.default is None:  # optional: empty means the CLI's default
        return gr.Textbox(value="", placeholder="default", **common)
    if control.kind == "number":
        return gr.Number(value=control.default, precision=0 if control.integer else None, **common)
    if control.kind in ("lines", "pairs"):
        return gr.Textbox(value=control.default, lines=2, max_lines=8, **common)
    return gr.Textbox(value=control.default, **common)


def _form(form: list[train_form.Control], picks: train_form.Picks) -> dict:
    """The accordions, basics open; returns the widgets by field name, in form order."""
    widgets: dict = {}
    groups = list(dict.fromkeys(c.group for c in form))
    for group in groups:
        members = [c for c in form if c.group == group]
        with gr.Accordion(group, open=group in train_form.OPEN, elem_id=f"train_group_{len(widgets)}"):
            for i in range(0, len(members), PER_ROW):
                with gr.Row():
                    for control in members[i:i + PER_ROW]:
                        widgets[control.name] = _widget(control, picks)
    return widgets


def build(studio: Studio, runner: TrainRun, datasets: dict[str, Path], run, generate: dict) -> None:
    form = train_form.controls()
    picks = train_form.Picks(datasets=dict(datasets), bases=dict(studio.bases))
    gr.Markdown("Train an adapter on a dataset folder in a background process (`studio train` with these options; "
                "an empty field means the CLI's default). The UI stays usable, and the finished adapter appears in "
                "the library with its last sample as the card image.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                data = gr.Dropdown(list(datasets), value=next(iter(datasets), None), label="dataset", scale=3,
                                   info="a folder of images with same-name .txt captions", elem_id="train_data")
                load = gr.UploadButton("Load TOML", file_types=[".toml"], size="sm", scale=1, elem_id="train_load")
                save = gr.Button("Save TOML", size="sm", scale=1, elem_id="train_save")
            saved = gr.File(label="saved config", visible=False, elem_id="train_saved", height=60)
            widgets = _form(form, picks)
        with gr.Column(scale=2):
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train_start")
                stop = gr.Button("Stop", variant="stop", elem_id="train_stop")
            status = gr.Markdown(IDLE, elem_id="train_status")
            # both series named up front: the plot fixes its colour domain from the first frame it gets
            plot = gr.LinePlot(loss_frame([]), x="step", y="loss", color="series", title="loss (training, validation)",
                               color_map=SERIES_COLOURS, colors_in_legend=list(SERIES_COLOURS), elem_id="train_loss",
                               height=260)
            sample = gr.Image(label="latest samples", format="png", type="filepath", elem_id="train_sample",
                              height=260)
    controls = [widgets[c.name] for c in form]
    if "method" in widgets and "method_args" in widgets:  # the options of the method picked
        widgets["method"].change(lambda m: gr.update(info=train_form.method_help(m)), widgets["method"],
                                 widgets["method_args"], api_visibility="private")
    timer = gr.Timer(1.0)
    last = gr.State(None)  # per browser: what it shows, so an unchanged tick sends nothing

    def layer_of(data_, values) -> dict:
        if data_ not in datasets:
            raise gr.Error(f"unknown dataset {data_!r}: pick one from the list")
        return {**train_form.to_layer(form, list(values), picks), "data": str(datasets[data_])}

    def on_start(data_, *values):
        layer = layer_of(data_, values)
        out = runner.start(layer)
        cfg = train_form.build_config(layer)
        steps = f"{cfg.steps} steps" if cfg.steps else (f"{cfg.epochs} epochs" if cfg.epochs else "default steps")
        return f"started: {out.name} ({cfg.method}, {steps}); its config is {out.name}/{REQUEST}"

    def on_save(data_, *values):
        cfg = train_form.build_config(layer_of(data_, values))
        path = studio.outputs / "train-configs" / safe_filename(f"{cfg.adapter_name}-{cfg.method}", ".toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, [train_form.toml_text(cfg).encode("utf-8")])
        return gr.update(value=str(path), visible=True)

    def on_load(upload, data_, *values):
        path = check_upload(upload, (".toml",))
        current = train_form.to_layer(form, list(values), picks)
        if data_ in datasets:
            current["data"] = str(datasets[data_])
        cfg = train_form.load_toml(path, current)
        name = picks.name_of("datasets", cfg.data, "data", Path(path).name)
        return [name, *train_form.from_config(form, cfg, picks, Path(path).name), f"loaded {Path(path).name}"]

    def describe(s) -> str:
        if s.state == "idle":
            return IDLE
        share = f" ({100 * s.step / s.total:.0f} %)" if s.total else ""
        loss = f" · loss {s.losses[-1][1]:.4f}" if s.losses else ""
        val = f" · validation {s.val_losses[-1][1]:.4f}" if s.val_losses else ""
        return f"**{s.state}** · step {s.step}/{s.total}{share}{loss}{val}" + (f"  \n{s.message}" if s.message else "")

    def on_tick(shown):
        s = runner.poll()
        now = (s.state, s.step, len(s.losses), len(s.val_losses), str(s.sample), s.message)
        if now == shown:
            return [gr.skip()] * (4 + len(generate["refresh_outputs"]))
        library = [gr.skip()] * len(generate["refresh_outputs"])
        if shown is not None and shown[0] == "running" and s.state != "running":
            library = generate["refresh"]()  # the finished adapter shows up in the library
        return [now, describe(s), loss_frame(s.losses, s.val_losses), str(s.sample) if s.sample else None] + library

    start.click(run(on_start), [data] + controls, status, api_name="train_start")
    stop.click(run(lambda: describe(runner.stop())), None, status, api_name="train_stop")
    save.click(run(on_save), [data] + controls, saved, api_name="train_save_config")
    load.upload(run(on_load), [load, data] + controls, [data] + controls + [status], api_name="train_load_config")
    timer.tick(run(on_tick), last, [last, status, plot, sample] + generate["refresh_outputs"],
               api_visibility="private", show_progress="hidden")
