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
