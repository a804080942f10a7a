"""Running the ``qcourse`` command in-process and reading its one-line errors (the CLI tests share these)."""
import pytest

from qcourse.course import cli


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``qcourse ARGV`` run in-process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped qcourse.course.cli.main")
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a user error prints, checked: no traceback, exactly one line."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def error_line(err: str) -> str:
    """:func:`one_line`, which must also be a ``qcourse: error:`` line."""
    line = one_line(err)
    assert line.startswith("qcourse: error: "), err
    return line
