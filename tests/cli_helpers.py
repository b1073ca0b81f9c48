"""The bad-input rule every command keeps, asserted one way for every test."""

from studio.cli import main


def one_error_line(capsys, argv) -> str:
    """Exit code 2, no traceback, exactly one `error:` line, and it is the last thing printed
    (a failure during training follows the progress bar, which is not part of the error)."""
    capsys.readouterr()  # forget what earlier commands printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0], err
    assert not any("Traceback" in line for line in err)
    return errors[0]


class Killed(Exception):
    """Stands in for SIGKILL after an optimizer step, in-process (tests/test_train_run.py kills a real process)."""


def crash_at_step(monkeypatch, argv, step: int) -> dict:
    """Run ``studio argv`` and let it die in optimizer step ``step`` (1-based), after the checkpoints before
    it. Returns the step counter, reset: it then counts the steps of the next run (the resume)."""
    import pytest

    from trainers import loop

    real, calls = loop.apply_step, {"steps": 0, "die_at": step}

    def dies(*a, **k):
        calls["steps"] += 1
        if calls["steps"] == calls["die_at"]:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(loop, "apply_step", dies)
    with pytest.raises(Killed):
        main(argv)
    calls.update(steps=0, die_at=None)
    return calls
