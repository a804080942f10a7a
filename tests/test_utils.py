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


# ----------------------------------------------------------------------------- bounded reading, memory
def test_read_bounded_refuses_by_size_before_reading_and_stops_past_the_limit(tmp_path):
    from qcourse.utils import InputFileError, load_json, read_bounded

    small = tmp_path / "a.json"
    small.write_text('{"a": [1, 2]}')
    assert read_bounded(small, 13, "a test file", "pass a smaller one") == b'{"a": [1, 2]}'
    assert load_json(small, 1 << 10, "a test file", "pass a smaller one") == {"a": [1, 2]}
    with pytest.raises(InputFileError) as e:
        read_bounded(small, 12, "a test file (5 bytes)", "pass a smaller one")
    assert str(e.value) == f"{small} is 13 bytes, more than the 12 bytes qcourse reads of a test file (5 bytes); " \
                           "pass a smaller one"
    assert (e.value.path, e.value.fix) == (small, "pass a smaller one") and isinstance(e.value, ValueError)
    # a device whose size stat does not know (0): the read stops one byte past the limit
    with pytest.raises(InputFileError, match=r"/dev/zero holds more than the 1.0 MiB qcourse reads of a test file"):
        read_bounded("/dev/zero", 1 << 20, "a test file", "pass a smaller one")


@pytest.mark.parametrize("data,words", [
    (b'{"a": [1,', ["is not valid JSON", "line 1, column 10"]),
    (b"\xff\xfe\xff", ["is not a text (JSON) file"]),
    (b"[" * 100_000 + b"]" * 100_000, ["nests its JSON lists or objects deeper"]),
])
def test_load_json_names_the_file_and_the_problem(tmp_path, data, words):
    from qcourse.utils import InputFileError, load_json

    path = tmp_path / "x.json"
    path.write_bytes(data)
    with pytest.raises(InputFileError) as e:
        load_json(path, 1 << 20, "a test file", "pass another file")
    msg = str(e.value)
    assert msg.startswith(f"{path} ") and msg.endswith("; pass another file")
    for w in words:
        assert w in msg


def test_check_memory_refuses_more_than_its_share_of_the_available_memory(monkeypatch):
    import qcourse.utils as u

    avail = u.available_memory()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(u, "available_memory", lambda: 8 << 30)
    u.check_memory(2 << 30, "two gigs", "use less")  # exactly the share: accepted
    with pytest.raises(u.NotEnoughMemoryError) as e:
        u.check_memory((2 << 30) + 1, "a batch of 8 images", "pass a smaller batch")
    assert str(e.value).startswith("a batch of 8 images takes 2.0 GiB, more than 25% of the 8.0 GiB of memory")
    assert str(e.value).endswith("; pass a smaller batch") and isinstance(e.value, ValueError)
    monkeypatch.setattr(u, "available_memory", lambda: None)  # unknown: nothing refused
    u.check_memory(1 << 60, "anything", "nothing")
