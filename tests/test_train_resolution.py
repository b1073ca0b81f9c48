"""``studio train --resolution 0`` is refused: it used to mean "the base's native size" (0 is falsy)."""

import pytest
from cli_helpers import one_error_line


@pytest.mark.parametrize("value", ["0", "-64"])
def test_a_resolution_that_is_not_a_size_is_one_error_line(tmp_path, capsys, value):
    out = tmp_path / "run"
    line = one_error_line(capsys, ["train", "sample_data/styles/stripes", "--resolution", value, "--steps", "1",
                                   "--out", str(out)])
    assert line == (f"error: --resolution {value} in the train config is not a size: give the training size in "
                    "pixels (e.g. --resolution 512), or leave it out for the base's native size")
    assert not out.exists()


def test_the_same_check_reads_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('data = "sample_data/styles/stripes"\nresolution = 0\n')
    line = one_error_line(capsys, ["train", "--config", str(config), "--check"])
    assert line.startswith("error: --resolution 0 in the train config is not a size")
