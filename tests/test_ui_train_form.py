"""The Train tab's form is the trainer's config: same fields, same defaults, same parser as ``studio train``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from studio.errors import StudioError
from studio.ui import train_form as T
from trainers.commands import add_arguments, build_config
from trainers.diffusion_config import DiffusionTrainConfig

STRIPES = Path("sample_data/styles/stripes").resolve()
PICKS = T.Picks(datasets={"stripes": STRIPES, "dots": Path("sample_data/styles/dots").resolve()},
                bases={"mini-sd (embedded)": None, "sd15": "/models/sd15"})


def _defaults(form):
    return [c.default for c in form]


def test_every_field_is_a_control_with_the_cli_default_and_help():
    form = T.controls()
    names = [c.name for c in form]
    fields = [f.name for f in dataclasses.fields(DiffusionTrainConfig)]
    assert sorted(names) == sorted(set(fields) - set(T.OWN))
    assert names[:3] == ["base", "method", "targets"] and form[0].group == "Basics"
    by_name = {c.name: c for c in form}
    assert by_name["flip"].kind == "checkbox" and by_name["flip"].default is False
    assert by_name["buckets"].default is True
    assert by_name["lr_schedule"].kind == "dropdown" and by_name["lr_schedule"].choices == ("constant", "cosine", "linear")
    assert by_name["rank"].kind == "number" and by_name["rank"].integer and by_name["rank"].default == 8
    assert by_name["steps"].default is None and "1200" in by_name["steps"].info  # the CLI's default, not 200
    assert by_name["sample_prompts"].kind == "lines" and by_name["method_args"].kind == "pairs"
    assert by_name["reg_data"].lookup == "datasets" and by_name["base"].lookup == "bases"
    assert by_name["unet_lr"].info == "UNet adapter learning rate; None = the method's default. [--unet-lr]"
    # the defaults shown are the config's: a form left as it is builds the config of `studio train DATA`
    cfg = T.build_config({**T.to_layer(form, _defaults(form), PICKS), "data": str(STRIPES)})
    assert cfg == DiffusionTrainConfig(data=str(STRIPES))
    assert T.from_config(form, cfg, PICKS, "x") == [
        "mini-sd (embedded)" if c.lookup == "bases" else ("" if c.lookup else c.default) for c in form]


def test_a_field_added_to_the_config_appears_in_advanced():
    @dataclasses.dataclass(frozen=True)
    class Later(DiffusionTrainConfig):
        warp_factor: float = 0.5
        """How much to warp; 0 = none. More text for readers."""

    control = T.controls(Later)[-1]
    assert (control.name, control.kind, control.group, control.default) == ("warp_factor", "number", T.ADVANCED, 0.5)
    assert control.info == "How much to warp; 0 = none. [--warp-factor]"


def test_saved_toml_is_what_studio_train_reads_and_loads_back(tmp_path):
    form = T.controls()
    shown = T.from_config(form, DiffusionTrainConfig(data=str(STRIPES)), PICKS, "the defaults")  # as the tab opens
    values = dict(zip([c.name for c in form], shown))
    values |= {"method": "pissa", "method_args": "svd=exact", "rank": 4, "unet_lr": 2e-3, "trigger": "stripy",
               "flip": True, "reg_data": "dots", "sample_prompts": "stripy, a red circle\nstripy, a star",
               "base": "sd15", "steps": 300}
    cfg = T.build_config({**T.to_layer(form, list(values.values()), PICKS), "data": str(STRIPES)})
    assert (cfg.method_args, cfg.reg_data, cfg.base, cfg.sample_prompts) == (
        {"svd": "exact"}, str(PICKS.datasets["dots"]), "/models/sd15", ["stripy, a red circle", "stripy, a star"])
    path = tmp_path / "run.toml"
    path.write_text(T.toml_text(cfg))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_config(parser.parse_args(["--config", str(path)])) == cfg  # the CLI reads the same config
    # loading over a different form gives the file's values back, control by control
    loaded = T.load_toml(path, {"data": str(STRIPES), "rank": 16, "flip": False})
    assert loaded == cfg
    shown = dict(zip([c.name for c in form], T.from_config(form, loaded, PICKS, "run.toml")))
    assert shown == values


def test_bad_files_and_values_are_one_line_errors(tmp_path):
    form = T.controls()
    layer = {"data": str(STRIPES)}
    bad = tmp_path / "bad.toml"
    bad.write_text("rnak = 4\n")
    with pytest.raises(StudioError, match="unknown config key 'rnak' in bad.toml: did you mean 'rank'"):
        T.load_toml(bad, layer)
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(f'data = "{tmp_path}"\n')
    cfg = T.load_toml(elsewhere, layer)
    with pytest.raises(StudioError, match="is not one of this UI's dataset folders"):
        PICKS.name_of("datasets", cfg.data, "data", "elsewhere.toml")
    values = _defaults(form)
    values[[c.name for c in form].index("base")] = "/etc"  # a path typed into the picker is not looked up
    with pytest.raises(StudioError, match="unknown base '/etc': pick one from the list"):
        T.to_layer(form, values, PICKS)
    with pytest.raises(StudioError, match="--resolution 0 in the train config is not a size"):
        T.build_config({**layer, "resolution": 0})


def test_method_options_come_from_the_registry():
    assert T.method_help("pissa").startswith("pissa options, one name=value a line:")
    assert "svd=fast" in T.method_help("pissa") and "niter=4" in T.method_help("pissa")
    assert "rank=" not in T.method_help("pissa")  # generic options have their own controls


def test_optional_numbers_are_text_boxes_empty_meaning_the_default():
    """gr.Number shows an empty value as 0 and sends 0 back (`--steps must be positive, got 0` on Start
    with the defaults): optional numbers are text boxes, parsed here."""
    import gradio as gr

    from studio.ui.train_tab import _widget

    form = {c.name: c for c in T.controls()}
    assert isinstance(_widget(form["steps"], PICKS), gr.Textbox) and isinstance(_widget(form["rank"], PICKS), gr.Number)
    assert T.to_layer([form["steps"], form["unet_lr"], form["alpha"]], ["", " ", None], PICKS) == {}
    assert T.to_layer([form["steps"], form["unet_lr"]], ["300", "2e-3"], PICKS) == {"steps": 300, "unet_lr": 2e-3}
    with pytest.raises(StudioError, match="steps 'lots' is not a number: type one, or leave the field empty"):
        T.to_layer([form["steps"]], ["lots"], PICKS)
    with pytest.raises(StudioError, match="steps 2.5 is not a whole number"):
        T.to_layer([form["steps"]], ["2.5"], PICKS)


def test_the_loss_plot_knows_both_series_from_its_first_frame():
    """The browser's plot fixes its colours from the first frame: a validation series that appears
    later would never be drawn (seen in Chromium), so the empty frame already names it."""
    from studio.ui.train_tab import loss_frame

    empty = loss_frame([])
    assert list(empty.series) == ["training", "validation"] and empty.loss.isna().all()
    frame = loss_frame([(1, 0.5), (2, 0.4)], [(2, 0.45)])
    assert frame.values.tolist() == [[1, 0.5, "training"], [2, 0.4, "training"], [2, 0.45, "validation"]]
    assert loss_frame([(1, 0.5)]).values.tolist()[0] == [1, 0.5, "training"]
