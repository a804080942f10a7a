"""qcourse.utils: the checks and the one atomic writer every layer uses."""
import os
import stat

import pytest

from qcourse.utils import OWNED_LIST, NotOwnedError, atomic_write, check_writable, is_owned, remove_owned


def test_atomic_write_replaces_the_file_whole_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == [OWNED_LIST, "results.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, error):
    path = tmp_path / "last.pt"
    with atomic_write(path) as tmp:
        tmp.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise error
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [OWNED_LIST, "last.pt"]
    assert is_owned(path)


def _write(path, text):
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def test_atomic_write_refuses_a_file_it_did_not_write_before_any_work(tmp_path):
    mine = tmp_path / "results.json"
    mine.write_text("the user's")
    ran = []
    with pytest.raises(NotOwnedError, match="results.json exists and was not written by qcourse"):
        with atomic_write(mine) as tmp:
            ran.append(tmp)
    assert ran == [] and mine.read_text() == "the user's"
    with pytest.raises(NotOwnedError):
        check_writable(tmp_path / "other.json", mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_file_changed_after_qcourse_wrote_it_is_no_longer_replaced_or_deleted(tmp_path):
    path = tmp_path / "best.pt"
    _write(path, "v1")
    _write(path, "v2")  # its own file: replaced
    assert path.read_text() == "v2" and is_owned(path)
    path.write_text("edited by hand")
    assert not is_owned(path)
    with pytest.raises(NotOwnedError):
        _write(path, "v3")
    assert not remove_owned(path) and path.read_text() == "edited by hand"


def test_remove_owned_deletes_only_qcourse_files(tmp_path):
    ours, theirs = tmp_path / "qat.onnx", tmp_path / "notes.md"
    _write(ours, "graph")
    theirs.write_text("notes")
    assert remove_owned(ours) and not ours.exists()
    assert not remove_owned(theirs) and theirs.read_text() == "notes"
    assert not (tmp_path / OWNED_LIST).exists()  # the list goes with the last file on it


def test_a_folder_or_a_link_at_the_path_is_refused(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(IsADirectoryError):
        _write(tmp_path / "out.onnx", "x")
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(NotOwnedError):
        _write(tmp_path / "link.json", "x")
    assert target.read_text() == "keep"


def test_a_damaged_or_huge_list_owns_nothing(tmp_path):
    path = tmp_path / "results.json"
    _write(path, "{}")
    (tmp_path / OWNED_LIST).write_text("[" * 100000)
    assert not is_owned(path)
