"""One adapter spec for both trainers (issue 14): shipped configs, flags from fields, method options.

Every file in sample_data/configs is loaded and ``--check``ed (litgpt's rule: a shipped config
that no test loads is a broken config). The flags of ``studio train`` are the fields of the two
configs, so these tests walk the fields instead of listing flags.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from studio import prompt
from studio.adapters import registry
from cli_helpers import one_error_line
from studio.cli import build_parser, main
from studio.config import build, read_toml, to_toml
from trainers import commands
from trainers.diffusion_config import DiffusionTrainConfig
from trainers.language_config import LMTrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "sample_data" / "configs").glob("*.toml"))
STRIPES = "sample_data/styles/stripes"


_error = one_error_line


def _config(*argv):
    return commands.build_config(build_parser().parse_args(["train", *argv]))


def test_the_shipped_configs_are_the_promised_ones():
    assert {p.stem for p in CONFIGS} >= {"style", "character", "lm", "dora", "ia3", "locon"}
    methods = {read_toml(p).get("method", "lora") for p in CONFIGS}
    assert methods <= set(registry.METHODS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_checks(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository root
    cfg = _config("--config", str(path))
    cfg.method_config()  # the method accepts every option the file gives
    assert main(["train", "--config", str(path), "--check"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert cfg.data in out and "problem(s)" not in out


def test_every_field_of_both_configs_is_a_flag_with_its_docstring_as_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    for cls in (DiffusionTrainConfig, LMTrainConfig):
        for f in (f for f in dataclasses.fields(cls) if f.name not in commands.POSITIONAL):
            action = by_dest[f.name]
            assert action.help and action.option_strings, f.name
            assert f"--{f.name.replace('_', '-')}" in action.option_strings
    for flag in ("--unet-lr", "--te-lr", "--lr", "--block-size", "--flip", "--shuffle-captions", "--no-cache",
                 "--reg-data", "--prior-loss-weight", "--save-adapter-every", "--conv-rank", "--conv-alpha",
                 "--method-args", "-o"):
        assert flag in train._option_string_actions, flag
    method = by_dest["method"]
    assert list(method.choices) == [*registry.METHODS, *prompt.METHODS]  # layer methods, then prompt-side ones
    assert all(m.TRAITS.summary in method.help for m in registry.METHODS.values())
    assert all(m.summary in method.help for m in prompt.METHODS.values())
    assert "Adapter input dropout while training" in by_dest["dropout"].help
    assert by_dest["data"].help and by_dest["task"].choices == ["image", "lm"]


def test_short_o_is_out(tmp_path):
    assert _config(STRIPES, "-o", str(tmp_path / "run")).out == str(tmp_path / "run")
    assert _config("--task", "lm", "-o", "x").out_dir == Path("x")


def test_method_args_from_flags_set_and_toml_reach_the_method_config(tmp_path):
    cfg = _config(STRIPES, "--method", "pissa", "--method-args", "svd=exact", "niter=6")
    assert cfg.method_args == {"svd": "exact", "niter": 6}
    assert (cfg.method_config().svd, cfg.method_config().niter) == ("exact", 6)
    assert _config(STRIPES, "--method", "pissa", "--set", "method_args.niter=5").method_args == {"niter": 5}
    saved = tmp_path / "config.toml"
    saved.write_text(to_toml(cfg))
    assert 'method_args = {svd = "exact", niter = 6}' in saved.read_text()
    again = _config("--config", str(saved), "--method-args", "niter=8")  # merged key by key, later wins
    assert again.method_args == {"svd": "exact", "niter": 8} and again.method == "pissa"
    assert build(DiffusionTrainConfig, (read_toml(saved), "f")) == cfg  # the saved file is the config


def test_a_config_file_selects_its_task(tmp_path):
    lm = _config("--config", str(ROOT / "sample_data" / "configs" / "lm.toml"))
    assert isinstance(lm, LMTrainConfig) and lm.task == "lm" and lm.lr_schedule == "cosine"
    assert isinstance(_config(STRIPES), DiffusionTrainConfig)
    saved = tmp_path / "config.toml"
    saved.write_text(to_toml(lm))
    assert isinstance(_config("--config", str(saved)), LMTrainConfig)


def test_config_files_written_before_method_args_still_load(tmp_path):
    """Every earlier run stored `svd = "fast"` (a PiSSA option) whatever its method."""
    old = tmp_path / "config.toml"
    old.write_text('method = "lora"\nrank = 4\nsvd = "fast"\ndata = "sample_data/styles/stripes"\n')
    assert _config("--config", str(old)).method_args == {}
    old.write_text('method = "pissa"\nrank = 4\nsvd = "exact"\ndata = "sample_data/styles/stripes"\n')
    assert _config("--config", str(old)).method_config().svd == "exact"


def test_default_learning_rates_and_steps_come_from_the_registry():
    for method in registry.METHODS:
        assert _config(STRIPES, "--method", method).lr_unet == registry.default_lr(method, "image")
        assert _config("--task", "lm", "--method", method).learning_rate == registry.default_lr(method, "lm")
    assert _config(STRIPES, "--unet-lr", "0.5").lr_te == 0.25
    assert _config(STRIPES).total_steps(10) == 1200 and _config("--task", "lm").total_steps(10) == 200
    assert _config(STRIPES, "--epochs", "3").total_steps(10) == 30


def test_method_options_and_conv_flags_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    line = _error(capsys, ["train", STRIPES, "--method", "dora", "--method-args", "foo=1", "-o", str(out)])
    assert "foo" in line and "dora" in line
    line = _error(capsys, ["train", STRIPES, "--conv-rank", "4", "-o", str(out)])
    assert "--conv-rank" in line and "unet-full" in line
    line = _error(capsys, ["train", "--task", "lm", "--conv-rank", "4", "-o", str(out)])
    assert "--conv-rank" in line
    line = _error(capsys, ["train", STRIPES, "--method-args", "svd", "-o", str(out)])
    assert "not name=value" in line
    line = _error(capsys, ["train", STRIPES, "--targets", "unet-full,unet-attn", "-o", str(out)])
    assert "one UNet set" in line
    assert not out.exists()
    locon = _config(STRIPES, "--targets", "unet-full,te-attn", "--conv-rank", "4", "--conv-alpha", "2")
    assert (locon.unet_targets, locon.train_te) == ("unet-full", True)
    assert (locon.method_config().conv_rank, locon.method_config().conv_alpha) == (4, 2.0)


def test_an_unknown_method_is_refused_by_the_parser_and_by_the_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", STRIPES, "--method", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert "unknown adapter method 'nope'" in _error(capsys, ["train", STRIPES, "--set", "method=nope"])


def test_resume_identity_includes_the_adapter_shape_options():
    cfg = _config(STRIPES, "--method", "pissa", "--conv-rank", "2", "--targets", "unet-full",
                  "--method-args", "svd=exact")
    assert json.loads(json.dumps(cfg.identity)) == cfg.identity  # it goes into meta.json
    assert {"method", "base", "targets", "rank", "conv_rank", "method_args"} <= set(cfg.identity)
