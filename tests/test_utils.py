"""qcourse.utils: the checks and the one atomic writer every layer uses."""
import os
import stat

import pytest

from qcourse.utils import atomic_write


def test_atomic_write_replaces_the_file_whole_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, error):
    path = tmp_path / "last.pt"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise error
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
