"""qcourse.sensitivity.load_results on a file to resume that is far larger or deeper than a real one.

A sensitivity file is one row per layer (about 20 KiB for YOLOv7): a 10 GiB one is refused by its
size before it is read (a spy on ``open``; the file is sparse and takes no disk), and JSON nested
100000 deep is reported like any damaged file instead of a RecursionError. Either way the file is
left as it is.
"""
import os

import pytest

from qcourse import sensitivity as sens


def test_a_huge_sensitivity_file_is_refused_before_it_is_read(tmp_path, opened):
    path = tmp_path / "sensitivity.json"
    with open(path, "wb") as f:
        f.truncate(10 << 30)
    opened.clear()
    with pytest.raises(sens.SensitivityFileError) as e:
        sens.load_results(path)
    msg = str(e.value)
    assert f"{path} is not a sensitivity results file that can be resumed: it is 10.0 GiB" in msg
    assert "8.0 MiB" in msg and "left as it is" in msg and "--out" in msg
    assert os.path.realpath(path) not in opened
    assert path.stat().st_size == 10 << 30


def test_a_deeply_nested_sensitivity_file_is_reported_not_a_recursion_error(tmp_path):
    path = tmp_path / "sensitivity.json"
    path.write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    before = path.read_bytes()
    with pytest.raises(sens.SensitivityFileError) as e:
        sens.load_results(path)
    msg = str(e.value)
    assert f"{path} is not a sensitivity results file that can be resumed: it nests" in msg
    assert "deeper" in msg and "left as it is" in msg
    assert path.read_bytes() == before
