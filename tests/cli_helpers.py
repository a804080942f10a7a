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


def torchrun(args, nproc: int = 2, timeout: int = 300):
    """``python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS`` on the CPU, finished.

    A native abort in torch's gloo teardown ("terminate called without an active exception", seen
    once in about a hundred runs, after the work is done) gets one more try; a second one, or any
    other failure, is returned as it is for the test to fail on.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *[str(a) for a in args]]
    for _ in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or "terminate called" not in done.stderr:
            break
    return done
