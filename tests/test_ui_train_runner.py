"""The UI's training runner: a background process whose progress, loss and samples are polled.

A stand-in for ``python -m studio train`` prints the trainer's real tqdm lines (captured from a
run) and writes what the trainer writes, so the runner is tested in a second instead of minutes.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from ui_helpers import ui_library  # noqa: F401  (fixture)

from studio.errors import StudioError
from studio.ui.library import Library
from studio.ui.train_runner import TrainRun

FAKE = textwrap.dedent('''\
    #!{python}
    import json, shutil, sys, time, tomllib
    from pathlib import Path
    args = sys.argv[sys.argv.index("train") + 1:]
    config = tomllib.loads(Path(args[args.index("--config") + 1]).read_text())
    out, steps = Path(config["out"]), config["steps"]
    mode = "{mode}"
    (out / "samples").mkdir(parents=True)
    (out / "logs").mkdir()
    if mode == "fail":
        print("error: dataset folder x has no images: add images", file=sys.stderr)
        sys.exit(2)
    for step in range(1, steps + 1):
        loss = 0.5 / step
        sys.stderr.write(f"\\rstripes (lora):  50%|#####     | {{step}}/{{steps}} [00:48<00:09,  9.85s/step, "
                         f"loss={{loss:.4f}}, lr=1.00e-03]")
        sys.stderr.flush()
        (out / "samples" / f"step-{{step:07d}}.png").write_bytes(b"png")
        if step % 2 == 0:  # the validation record: JSON lines, one partly written line at the end
            with open(out / "logs" / "validation.jsonl", "a") as f:
                f.write(json.dumps({{"step": step, "val_loss": 0.25 / step}}) + "\\n")
        time.sleep(0.05 if mode == "ok" else 1.0)
    shutil.copyfile("{adapter}", out / "stripes.safetensors")
    shutil.copyfile("{adapter}", out / "stripes.kohya.safetensors")
    print(f"adapter: {{out}}/stripes.safetensors (exact, for the studio)")
''')


def _runner(tmp_path: Path, adapter: Path, mode: str) -> TrainRun:
    script = tmp_path / f"fake-{mode}"
    script.write_text(FAKE.format(python=sys.executable, mode=mode, adapter=adapter))
    script.chmod(0o755)
    return TrainRun(tmp_path / "adapters", python=str(script))


STRIPES = str(Path("sample_data/styles/stripes").resolve())


def _layer(method="lora", steps=5, **more):
    return {"data": STRIPES, "method": method, "rank": 4, "steps": steps, **more}


def _wait(runner: TrainRun, until: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = runner.poll()
        if status.state == until or status.state not in ("running", until):
            return status
        time.sleep(0.1)
    return runner.poll()


def test_progress_loss_samples_and_the_finished_adapter_in_the_library(tmp_path, ui_library):
    runner = _runner(tmp_path, ui_library["lora"], "ok")
    out = runner.start(_layer(trigger="stripy", flip=True))
    assert out == tmp_path / "adapters" / "stripes-lora"
    status = _wait(runner, "finished")
    assert status.state == "finished", status.message
    assert (status.step, status.total) == (5, 5)
    assert status.losses == [(s, round(0.5 / s, 4)) for s in range(1, 6)]
    assert status.val_losses == [(2, 0.125), (4, 0.0625)]
    # the run is `studio train --config` of the file beside the adapter, read by the CLI's parser
    from studio.cli import train_config_class
    from studio.config import build, read_toml

    cfg = build(train_config_class(), (read_toml(out / "train-tab.toml"), "train-tab.toml"))
    assert (cfg.trigger, cfg.flip, cfg.rank, cfg.steps, cfg.out) == ("stripy", True, 4, 5, str(out))
    assert status.sample == out / "samples" / "step-0000005.png"
    assert status.message == "finished: stripes-lora/stripes.safetensors is in the library"
    keys = [c.key for c in Library(tmp_path / "adapters").scan()]
    assert "stripes-lora/stripes" in keys
    assert runner.start(_layer(steps=1)).name == "stripes-lora-2"  # never overwrites
    _wait(runner, "finished")


def test_stop_ends_the_process_and_one_run_at_a_time(tmp_path, ui_library):
    runner = _runner(tmp_path, ui_library["lora"], "slow")
    runner.start(_layer("svf", 100))
    with pytest.raises(StudioError, match="a training run is already going"):
        runner.start(_layer("lora", 100))
    deadline = time.monotonic() + 20
    while runner.poll().step < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    status = runner.stop()
    assert status.state == "stopped" and status.message.startswith("stopped at step ")
    assert runner.process.poll() is not None


def test_a_failing_run_reports_its_error_line(tmp_path, ui_library):
    runner = _runner(tmp_path, ui_library["lora"], "fail")
    runner.start(_layer())
    status = _wait(runner, "failed")
    assert status.state == "failed"
    assert status.message == "error: dataset folder x has no images: add images"


def test_bad_requests_are_refused_before_a_folder_exists(tmp_path):
    (tmp_path / "adapters").mkdir()
    runner = TrainRun(tmp_path / "adapters")
    with pytest.raises(StudioError, match="unknown adapter method 'nope'"):
        runner.start(_layer("nope"))
    with pytest.raises(StudioError, match="--steps must be positive, got 0"):  # the CLI's own check
        runner.start(_layer(steps=0))
    with pytest.raises(StudioError, match="steps 30000 is more than this UI runs"):
        runner.start(_layer(steps=30000))
    with pytest.raises(StudioError, match="--resolution 0 .* is not a size"):
        runner.start(_layer(resolution=0))
    assert list((tmp_path / "adapters").iterdir()) == []
