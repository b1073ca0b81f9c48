"""Training from the UI: ``python -m studio train --config FILE`` in a background process.

The Train tab's form is built into the trainer's config (``train_form.build_config``, the CLI's
parser), written as ``OUT/train-tab.toml`` and handed to ``studio train --config``: the run is
exactly the command a user could type, and the file stays beside the adapter as its recipe.

The UI stays responsive because the training runs in another process (its own interpreter,
one torch thread); the app only polls. Progress and loss come from the trainer's tqdm line on
stderr (``12/40 [...] loss=0.0312, lr=...``), samples from ``OUT/samples/step-*.png``; the
finished adapter is ``OUT/<name>.safetensors`` inside the adapters folder, so the next library
scan shows it. Validation loss is read where the trainer reports it: a ``val_loss=`` field on
that line, or JSON lines ``{"step": N, "val_loss": X}`` in ``OUT/*.jsonl`` / ``OUT/logs/*.jsonl``.
Stop terminates the process (then kills it if it does not exit in 10 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

MAX_STEPS = 20_000
PROGRESS = re.compile(r"(\d+)/(\d+) \[[^\]]*?loss=([-+0-9.eEnaif]+)")
STEPS_ONLY = re.compile(r"(\d+)/(\d+) \[")
VAL_LOSS = re.compile(r"val_loss=([-+0-9.eEnaif]+)")
REQUEST = "train-tab.toml"
"""The run's config as the tab built it, in the run's folder."""


@dataclass
class Status:
    state: str = "idle"           # idle | running | finished | failed | stopped
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    sample: Path | None = None
    adapter: Path | None = None
    message: str = ""


class TrainRun:
    """At most one training process at a time (the CPU has no room for two)."""

    def __init__(self, adapters: Path, python: str = sys.executable):
        self.adapters = Path(adapters).resolve()
        self.python = python
        self.process: subprocess.Popen | None = None
        self.out: Path | None = None
        self.status = Status()
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def start(self, layer: dict) -> Path:
        """Start a run of the config the form's ``layer`` builds (``data`` and ``method`` in it or
        defaulted); its folder is a new one in the library, named after the dataset and method."""
        from studio.ui import train_form

        if self.running:
            raise StudioError("a training run is already going: stop it first (one run at a time on this machine)")
        cfg = train_form.build_config(layer)  # every mistake is refused here, before a folder exists
        if cfg.steps is not None and cfg.steps > MAX_STEPS:
            raise StudioError(f"steps {cfg.steps} is more than this UI runs ({MAX_STEPS}): give fewer steps, or "
                              "use studio train for long runs")
        out = self._free_folder(f"{cfg.dataset_name}-{cfg.method}")
        text = train_form.toml_text(cfg) + f"out = {json.dumps(str(out))}\n"
        out.mkdir(parents=True)
        (out / REQUEST).write_text(text, encoding="utf-8")
        command = [self.python, "-m", "studio", "train", "--config", str(out / REQUEST)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0.5")
        self.out, self.status, self._lines = out, Status("running", total=cfg.steps or 0), []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(Path(__file__).resolve().parents[2]))
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return out

    def _free_folder(self, stem: str) -> Path:
        for i in range(1000):
            out = self.adapters / (stem if i == 0 else f"{stem}-{i + 1}")
            if not out.exists():
                return out
        raise StudioError(f"too many runs named {stem} in {self.adapters}: remove old ones")

    def _read(self, process: subprocess.Popen) -> None:
        """Reader thread: tqdm redraws with carriage returns, so split on both line ends."""
        buffer = b""
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            with self._lock:
                for raw in done:
                    self._parse(raw.decode("utf-8", "replace").strip())
        with self._lock:
            self._parse(buffer.decode("utf-8", "replace").strip())

    def _parse(self, line: str) -> None:
        if not line:
            return
        self._lines = (self._lines + [line])[-50:]
        match = PROGRESS.search(line) or STEPS_ONLY.search(line)
        if match:
            self.status.step, self.status.total = int(match.group(1)), int(match.group(2))
            if match.re is PROGRESS:
                _record(self.status.losses, self.status.step, float(match.group(3)))
            val = VAL_LOSS.search(line)
            if val:
                _record(self.status.val_losses, self.status.step, float(val.group(1)))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll(self) -> Status:
        with self._lock:
            status = self.status
            if self.out is not None:
                samples = sorted((self.out / "samples").glob("step-*.png"))
                status.sample = samples[-1] if samples else None
                for step, loss in _val_records(self.out):
                    _record(status.val_losses, step, loss)
            if self.process is not None and status.state == "running" and self.process.poll() is not None:
                code = self.process.returncode
                adapters = sorted(p for p in self.out.glob("*.safetensors")
                                  if not p.name.endswith(".kohya.safetensors"))
                if code == 0 and adapters:
                    status.state, status.adapter = "finished", adapters[0]
                    status.message = f"finished: {adapters[0].relative_to(self.adapters)} is in the library"
                else:
                    errors = [line for line in self._lines if line.startswith("error:")]
                    status.state = "failed"
                    status.message = errors[-1] if errors else f"training exited with code {code}: " + (
                        self._lines[-1] if self._lines else "no output")
            return status

    def stop(self) -> Status:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            with self._lock:
                self.status.state = "stopped"
                self.status.message = f"stopped at step {self.status.step}/{self.status.total}"
        return self.poll()


def _record(series: list[tuple[int, float]], step: int, value: float) -> None:
    """Add (step, value) once per step, in step order (tqdm redraws a line many times)."""
    if not series or series[-1][0] < step:
        series.append((step, value))


def _val_records(out: Path) -> list[tuple[int, float]]:
    """(step, val_loss) from the JSON-lines records of a run (lines of other records are skipped)."""
    found = []
    for path in sorted([*out.glob("*.jsonl"), *(out / "logs").glob("*.jsonl")]):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the line being written
            if isinstance(row, dict) and "val_loss" in row and "step" in row:
                found.append((int(row["step"]), float(row["val_loss"])))
    return sorted(found)
