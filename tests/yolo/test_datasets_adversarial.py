"""Adversarial tests for qcourse.yolo.datasets: what the generator may delete, interruption and
concurrency of the dataset build, and broken COCO annotation files.

Oracles: files written by hand before the call and read back after it, the sha256 of a
dataset generated undisturbed, the exit of real subprocesses (Ctrl-C is a SIGINT to the
whole process group, as a terminal sends it), and hand-written COCO json files.
"""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcourse.yolo.datasets import (
    CocoDetection,
    CocoFormatError,
    CocoImageError,
    ensure_default_dataset,
    make_synthetic_coco,
    verify_synthetic_coco,
)
from qcourse.yolo.datasets import synthetic

SMALL = {"n_train": 6, "n_val": 3, "img_size": 64, "seed": 0}
_ORIGINAL_MAKE_ONE = synthetic._make_one


def _hashes(root: Path):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, root: Path):
    """Everything next to ``root`` except the lock file that ensure_default_dataset keeps."""
    return sorted(p.name for p in parent.iterdir() if p != root and p.name != f".{root.name}.lock")


@pytest.fixture()
def small_default(monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_PARAMS", dict(SMALL))
    return dict(SMALL)


# ----------------------------------------------------------------------------- 4: ownership
def _real_coco_folder(root: Path):
    (root / "val2017").mkdir(parents=True)
    (root / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8 a user's photo")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "info": {"description": "COCO 2017 Dataset"}, "images": [{"id": 139, "file_name":
        "000000000139.jpg", "width": 640, "height": 426}], "annotations": [], "categories": []}))


def _foreign_manifest_folder(root: Path):
    (root / "val2017").mkdir(parents=True)
    (root / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8 a user's photo")
    (root / "manifest.json").write_text(json.dumps({"tool": "someone else's", "files": {}}))


def _forged_manifest_folder(root: Path):
    """Our generator tag, but a file list that points outside images/ and annotations/."""
    (root / "val2017").mkdir(parents=True)
    (root / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8 a user's photo")
    (root / "manifest.json").write_text(json.dumps({
        "generator": "qcourse.datasets.synthetic", "version": 1,
        "files": {"../outside.txt": "0" * 64, "val2017/000000000139.jpg": "0" * 64}}))
    (root.parent / "outside.txt").write_text("not the generator's")


@pytest.mark.parametrize("make_folder", [_real_coco_folder, _foreign_manifest_folder,
                                         _forged_manifest_folder])
def test_ensure_default_dataset_refuses_a_folder_it_did_not_write(tmp_path, small_default, make_folder):
    root = tmp_path / "data" / "coco"
    make_folder(root)
    before = _hashes(tmp_path)
    with pytest.raises(FileExistsError) as e:
        ensure_default_dataset(root, progress=False)
    msg = str(e.value)
    assert str(root) in msg and "not a qcourse synthetic dataset" in msg
    assert "ensure_default_dataset(root=...)" in msg and "remove" in msg  # the two fixes
    assert _hashes(tmp_path) == before  # not one file deleted or changed
    assert (root / "val2017" / "000000000139.jpg").is_file()


def test_overwrite_refuses_a_dataset_it_did_not_write(tmp_path):
    _real_coco_folder(tmp_path / "coco")
    (tmp_path / "coco" / "images").mkdir()
    (tmp_path / "coco" / "images" / "keep.jpg").write_bytes(b"mine")
    before = _hashes(tmp_path)
    with pytest.raises(FileExistsError, match="no manifest.json written by") as e:
        make_synthetic_coco(tmp_path / "coco", **SMALL, overwrite=True, progress=False)
    assert str(tmp_path / "coco") in str(e.value)
    assert _hashes(tmp_path) == before


def test_overwrite_refuses_to_replace_a_file_its_manifest_does_not_list(tmp_path):
    root = make_synthetic_coco(tmp_path / "d", n_train=2, n_val=1, img_size=64, progress=False)
    (root / "images" / "train" / "000003.jpg").write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="000003.jpg"):
        make_synthetic_coco(root, n_train=5, n_val=1, img_size=64, overwrite=True, progress=False)
    assert (root / "images" / "train" / "000003.jpg").read_bytes() == b"a user's file"
    assert verify_synthetic_coco(root, {"n_train": 2})  # the earlier dataset is intact


def test_repair_replaces_only_the_generators_own_files(tmp_path, small_default):
    reference = _hashes(make_synthetic_coco(tmp_path / "ref", **SMALL, progress=False))
    root = ensure_default_dataset(tmp_path / "data", progress=False)
    extras = {"notes.txt": b"keep me", "images/train/my_photo.jpg": b"mine",
              "annotations/my_labels.json": b"{}"}
    for rel, data in extras.items():
        (root / rel).write_bytes(data)
    (root / "images" / "val" / "000001.jpg").write_bytes(b"damaged")
    (root / "annotations" / "instances_train.json").unlink()
    assert not verify_synthetic_coco(root)
    assert ensure_default_dataset(root, progress=False) == root
    assert verify_synthetic_coco(root, SMALL)
    after = _hashes(root)
    for rel, data in extras.items():
        assert (root / rel).read_bytes() == data
        del after[rel]
    assert after == reference  # the generated files are repaired byte for byte
    assert _leftovers(tmp_path, root) == ["ref"]


def test_overwrite_removes_listed_files_the_new_dataset_lacks(tmp_path):
    root = make_synthetic_coco(tmp_path / "d", n_train=4, n_val=1, img_size=64, progress=False)
    (root / "mine.txt").write_text("keep")
    make_synthetic_coco(root, n_train=2, n_val=1, img_size=64, overwrite=True, progress=False)
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert (root / "mine.txt").read_text() == "keep"
    assert verify_synthetic_coco(root, {"n_train": 2})
    assert _leftovers(tmp_path, root) == []


def test_an_existing_root_with_a_read_only_parent_is_staged_inside(tmp_path, monkeypatch):
    """E.g. a mounted volume: nothing can be written next to it (or renamed across to it),
    so the generator stages inside it, and the result is the same."""
    reference = _hashes(make_synthetic_coco(tmp_path / "ref", **SMALL, progress=False))
    root = tmp_path / "volume"
    root.mkdir()
    monkeypatch.setattr(synthetic.os, "access", lambda path, mode, **kw: False)
    make_synthetic_coco(root, **SMALL, progress=False)
    assert _hashes(root) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "volume"]


# ----------------------------------------------------------------------------- 5: interruption
def _interrupt_after(n: int):
    calls = []

    def make_one(job):
        calls.append(job)
        if len(calls) > n:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while drawing this image
        return _ORIGINAL_MAKE_ONE(job)
    return make_one


def test_ctrl_c_without_a_pool_leaves_nothing_behind(tmp_path, small_default, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setattr(synthetic, "_make_one", _interrupt_after(4))
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(root, progress=False)
    assert not root.exists() and _leftovers(tmp_path, root) == []
    monkeypatch.setattr(synthetic, "_make_one", _ORIGINAL_MAKE_ONE)
    assert verify_synthetic_coco(ensure_default_dataset(root, progress=False), SMALL)


def test_ctrl_c_during_a_repair_keeps_the_folder_repairable(tmp_path, small_default, monkeypatch):
    root = ensure_default_dataset(tmp_path / "data", progress=False)
    reference = _hashes(root)
    (root / "images" / "train" / "000002.jpg").write_bytes(b"damaged")
    (root / "notes.txt").write_text("keep me")
    monkeypatch.setattr(synthetic, "_make_one", _interrupt_after(3))
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(root, progress=False)
    assert _leftovers(tmp_path, root) == []
    monkeypatch.setattr(synthetic, "_make_one", _ORIGINAL_MAKE_ONE)
    ensure_default_dataset(root, progress=False)
    assert (root / "notes.txt").read_text() == "keep me"
    (root / "notes.txt").unlink()
    assert _hashes(root) == reference


def _fail_on_image_7(job):
    """Module level, so that the pool's worker processes can unpickle it."""
    if job[2] == 7:
        raise RuntimeError("disk full while writing image 7")
    return _ORIGINAL_MAKE_ONE(job)


def test_an_error_in_a_pool_worker_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_make_one", _fail_on_image_7)
    root = tmp_path / "data"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="image 7"):
        make_synthetic_coco(root, n_train=200, n_val=0, img_size=64, progress=False, workers=2)
    assert time.monotonic() - t0 < 30
    assert not root.exists() and _leftovers(tmp_path, root) == []


_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from qcourse.yolo.datasets import synthetic
    root, go, params = Path(sys.argv[1]), Path(sys.argv[2]), eval(sys.argv[3])
    synthetic.DEFAULT_PARAMS = params
    real = synthetic.make_synthetic_coco

    def make_then_wait_for_the_others(*args, **kwargs):
        # line up every process that generates at the moment they race to move their
        # result into place (for at most 2 s: a process that waits on a lock never comes)
        out = real(*args, **kwargs)
        (go / str(os.getpid())).touch()
        t0 = time.monotonic()
        while len(list(go.iterdir())) < 3 and time.monotonic() - t0 < 2:
            time.sleep(0.002)
        return out

    synthetic.make_synthetic_coco = make_then_wait_for_the_others
    while not go.exists():  # start together, after the slow imports
        time.sleep(0.01)
    synthetic.ensure_default_dataset(root, progress=False)
    print(synthetic.verify_synthetic_coco(root, params))
""")


def _spawn(root: Path, go: Path, params: dict) -> subprocess.Popen:
    """A process that calls ensure_default_dataset(root) with ``params`` once the folder
    ``go`` exists."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(go), repr(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own process group


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ctrl_c_with_a_pool_returns_promptly_and_leaves_nothing(tmp_path):
    """A terminal's Ctrl-C: SIGINT to the parent and every pool worker at once (> 500 images
    make ensure_default_dataset use a pool)."""
    root, go = tmp_path / "data" / "synthetic", tmp_path / "go"
    proc = _spawn(root, go, {"n_train": 3000, "n_val": 0, "img_size": 160, "seed": 0})
    try:
        go.mkdir()
        deadline = time.monotonic() + 120
        while not any(root.parent.glob(".*tmp*/images/train/*.jpg")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)  # the old code hung here forever
    finally:
        _kill_group(proc)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()
    assert not root.exists() and _leftovers(root.parent, root) == []


@pytest.mark.parametrize("start", ["empty", "damaged"])
def test_three_processes_build_the_same_dataset_at_once(tmp_path, start):
    params = {"n_train": 20, "n_val": 6, "img_size": 96, "seed": 3}
    reference = _hashes(make_synthetic_coco(tmp_path / "ref", **params, progress=False))
    root, go = tmp_path / "data" / "synthetic", tmp_path / "go"
    if start == "damaged":
        make_synthetic_coco(root, **params, progress=False)
        (root / "images" / "val" / "000004.jpg").write_bytes(b"damaged")
    procs = [_spawn(root, go, params) for _ in range(3)]
    try:
        time.sleep(0.5)
        go.mkdir()
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            _kill_group(p)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "True", err
    assert _hashes(root) == reference
    assert _leftovers(root.parent, root) == []


# ----------------------------------------------------------------------------- 8: COCO json
def _mini_coco(root: Path) -> dict:
    """Two images on disk and a valid json with categories 1 and 3 (written by _save)."""
    (root / "val2017").mkdir(parents=True)
    images = []
    for k, (w, h) in enumerate([(64, 48), (40, 64)]):
        name = f"{139 + k:012d}.jpg"
        Image.fromarray(np.full((h, w, 3), 60 * k, np.uint8)).save(root / "val2017" / name)
        images.append({"id": 139 + k, "file_name": name, "width": w, "height": h})
    anns = [{"id": 11, "image_id": 139, "category_id": 1, "bbox": [2.5, 3, 10, 12], "area": 120.0,
             "iscrowd": 0},
            {"id": 12, "image_id": 139, "category_id": 3, "bbox": [20, 5, 30, 20], "area": 600.0,
             "iscrowd": 0},
            {"id": 13, "image_id": 140, "category_id": 3, "bbox": [5, 5, 20, 30], "area": 600.0,
             "iscrowd": 0}]
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _save(root: Path, data) -> Path:
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))  # NaN is written as NaN, as Python's json reads it
    return path


def _set(section, k, field, value):
    def edit(d):
        if value is _DELETE:
            del d[section][k][field]
        else:
            d[section][k][field] = value
    return edit


_DELETE = object()
BROKEN = {  # name: (edit, words the message must contain)
    "negative width": (_set("annotations", 1, "bbox", [20, 5, -30, 20]),
                       ["annotation id 12", "'bbox'", "negative", "[x, y, width, height]"]),
    "unknown category": (_set("annotations", 0, "category_id", 77),
                         ["annotation id 11", "'category_id'", "77", "1, 3"]),
    "missing width": (_set("images", 1, "width", _DELETE), ["image id 140", "'width' is missing"]),
    "string bbox": (_set("annotations", 2, "bbox", "5, 5, 20, 30"),
                    ["annotation id 13", "'bbox'", "'5, 5, 20, 30'", "four finite numbers"]),
    "string coordinate": (_set("annotations", 2, "bbox", [5, "5", 20, 30]),
                          ["annotation id 13", "'bbox'"]),
    "NaN box": (_set("annotations", 0, "bbox", [2, float("nan"), 10, 12]),
                ["annotation id 11", "'bbox'", "nan"]),
    "infinite box": (_set("annotations", 0, "bbox", [2, 3, float("inf"), 12]),
                     ["annotation id 11", "'bbox'", "inf"]),
    "duplicate image id": (_set("images", 1, "id", 139), ["image id 139", "'id'", "one image only"]),
    "duplicate annotation id": (_set("annotations", 2, "id", 11),
                                ["annotation id 11", "'id'", "one annotation only"]),
    "unknown image": (_set("annotations", 1, "image_id", 999),
                      ["annotation id 12", "'image_id'", "999"]),
    "missing area": (_set("annotations", 1, "area", _DELETE), ["annotation id 12", "'area' is missing"]),
    "bad iscrowd": (_set("annotations", 1, "iscrowd", "no"), ["annotation id 12", "'iscrowd'"]),
    "missing bbox": (_set("annotations", 0, "bbox", _DELETE), ["annotation id 11", "'bbox' is missing"]),
    "annotation without id": (_set("annotations", 2, "id", _DELETE), ["annotations[2]", "'id' is missing"]),
    "annotation not an object": (lambda d: d["annotations"].append([1, 2, 3]),
                                 ["annotations[3]", "JSON object"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_annotations_name_file_entry_and_field(tmp_path, case):
    edit, words = BROKEN[case]
    data = _mini_coco(tmp_path)
    edit(data)
    path = _save(tmp_path, data)
    with pytest.raises(CocoFormatError) as e:
        CocoDetection(tmp_path, "val2017", img_size=64)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("text", ['{"images": [{"id": 1,', "", "[1, 2]", '{"images": {}}'])
def test_malformed_json_names_the_file(tmp_path, text):
    _mini_coco(tmp_path)
    path = _save(tmp_path, {})
    path.write_text(text)
    with pytest.raises(CocoFormatError) as e:
        CocoDetection(tmp_path, "val2017", img_size=64)
    assert str(path) in str(e.value)
    if text.startswith('{"images": [') or not text:
        assert "not valid JSON" in str(e.value) and "line 1" in str(e.value)


def test_real_coco_quirks_still_load(tmp_path):
    """Zero-size boxes (real COCO has a few), crowd regions with RLE, boxes a little outside
    the image and extra keys (info, licenses, segmentation) load; only the usable boxes
    become targets."""
    data = _mini_coco(tmp_path)
    data["annotations"] += [
        {"id": 14, "image_id": 139, "category_id": 1, "bbox": [30, 30, 0.0, 5], "area": 0.0, "iscrowd": 0},
        {"id": 15, "image_id": 139, "category_id": 1, "bbox": [0, 0, 64, 48], "area": 900.0, "iscrowd": 1,
         "segmentation": {"counts": [0, 3072], "size": [48, 64]}},
        {"id": 16, "image_id": 140, "category_id": 1, "bbox": [30.5, 50, 12, 20], "area": 240.0,
         "iscrowd": 0, "segmentation": [[30.5, 50, 42.5, 50, 42.5, 70]]},
    ]
    data["info"], data["licenses"] = {"year": 2017}, []
    _save(tmp_path, data)
    ds = CocoDetection(tmp_path, "val2017", img_size=64)
    assert ds.cat_ids == [1, 3] and ds.image_ids == [139, 140]
    np.testing.assert_allclose(ds.labels_xyxy(0), [[0, 2.5, 3, 12.5, 15], [1, 20, 5, 50, 25]])
    np.testing.assert_allclose(ds.labels_xyxy(1), [[1, 5, 5, 25, 35], [0, 30.5, 50, 40, 64]])


def test_checking_coco_val2017_sized_annotations_is_fast(tmp_path):
    """36k annotations, as val2017 (on 1000 images, to spare the disk): loading, checks
    included, stays fast."""
    rng = np.random.default_rng(0)
    (tmp_path / "val2017").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1000)]
    for im in images:
        (tmp_path / "val2017" / im["file_name"]).touch()
    n = 36000
    xywh = np.concatenate([rng.uniform(0, 400, (n, 2)), rng.uniform(0, 200, (n, 2))], 1).tolist()
    image_ids = rng.integers(1000, size=n).tolist()
    anns = [{"id": k + 1, "image_id": image_ids[k], "category_id": 1 + k % 90, "bbox": xywh[k],
             "area": xywh[k][2] * xywh[k][3], "iscrowd": int(k % 97 == 0)} for k in range(n)]
    cats = [{"id": i, "name": str(i)} for i in range(1, 91)]
    _save(tmp_path, {"images": images, "annotations": anns, "categories": cats})
    t0 = time.perf_counter()
    ds = CocoDetection(tmp_path, "val2017", img_size=64, cache=False)
    assert time.perf_counter() - t0 < 15  # under 1 s; generous for a busy machine
    assert len(ds) == 1000 and sum(len(ds.labels_xyxy(i)) for i in range(1000)) > 35000


def test_missing_paths_name_what_is_expected(tmp_path):
    root = tmp_path / "coco"
    data = _mini_coco(root)
    _save(root, data)
    with pytest.raises(FileNotFoundError) as e:  # the wrong split: say which ones exist
        CocoDetection(root, "val", img_size=64)
    msg = str(e.value)
    assert str(root / "images" / "val") in msg and str(root / "val") in msg
    assert str(root / "annotations" / "instances_val.json") in msg and "['val2017']" in msg
    (root / "val").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(root, "val", img_size=64)
    assert str(root / "annotations" / "instances_val.json") in str(e.value)
    assert "['val2017']" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(root, "val2017", img_size=64, img_dir=tmp_path / "photos")
    assert f"img_dir={str(tmp_path / 'photos')!r}" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        CocoDetection(root, "val2017", img_size=64, ann_file=tmp_path / "labels.json")
    assert f"ann_file={str(tmp_path / 'labels.json')!r}" in str(e.value)


# ----------------------------------------------------------------------------- 20: untrusted input
def test_deeply_nested_annotations_are_one_error_not_a_recursion_error(tmp_path):
    _mini_coco(tmp_path)
    path = _save(tmp_path, {})
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CocoFormatError) as e:
        CocoDetection(tmp_path, "val2017", img_size=64)
    assert str(path) in str(e.value) and "deeper" in str(e.value)


def test_a_huge_annotation_file_is_refused_before_it_is_read(tmp_path, opened):
    _mini_coco(tmp_path)
    path = _save(tmp_path, {})
    with open(path, "wb") as f:
        f.truncate(10 << 30)  # sparse: 10 GiB that take no disk
    opened.clear()
    with pytest.raises(CocoFormatError) as e:
        CocoDetection(tmp_path, "val2017", img_size=64)
    msg = str(e.value)
    assert str(path) in msg and "10.0 GiB" in msg and "1.0 GiB" in msg and "instances_train2017.json" in msg
    assert os.path.realpath(path) not in opened


@pytest.mark.parametrize("file_name", ["ABSOLUTE", "../outside.jpg", "sub/../../outside.jpg", ""])
def test_a_file_name_outside_the_image_folder_is_refused(tmp_path, file_name, opened):
    data = _mini_coco(tmp_path)
    outside = tmp_path / "outside.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    (tmp_path / "val2017" / "sub").mkdir()
    name = str(outside) if file_name == "ABSOLUTE" else file_name
    data["images"][1]["file_name"] = name
    path = _save(tmp_path, data)
    opened.clear()
    with pytest.raises(CocoFormatError) as e:
        ds = CocoDetection(tmp_path, "val2017", img_size=64, cache=False)
        ds[1]  # before the check: the image outside the folder was read
    msg = str(e.value)
    assert str(path) in msg and "image id 140" in msg and repr(name) in msg and "relative" in msg
    assert os.path.realpath(outside) not in opened


def test_a_link_out_of_the_image_folder_is_refused(tmp_path, opened):
    _save(tmp_path, _mini_coco(tmp_path))
    outside = tmp_path / "secret.jpg"
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(outside)
    link = tmp_path / "val2017" / "000000000140.jpg"
    link.unlink()
    link.symlink_to(outside)
    opened.clear()
    ds = CocoDetection(tmp_path, "val2017", img_size=64, cache=False)
    assert ds[0][0].shape == (3, 64, 64)  # the other image loads
    with pytest.raises(CocoImageError) as e:
        ds[1]
    msg = str(e.value)
    assert str(link) in msg and str(outside) in msg and "image id 140" in msg and "copy" in msg
    assert os.path.realpath(outside) not in opened


def _huge_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` pixels (its data is a 1x1 image's)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))


def _broken_image(kind: str, path: Path) -> None:
    if kind == "not an image":
        path.write_bytes(b"GIF89a? no, just text pretending to be an image")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(path, "JPEG")
        path.write_bytes(path.read_bytes()[:300])
    else:
        _huge_png_header(path, 30000, 30000)


@pytest.mark.parametrize("kind", ["not an image", "truncated", "30000x30000"])
def test_an_unreadable_image_is_one_error_naming_it(tmp_path, kind):
    _save(tmp_path, _mini_coco(tmp_path))
    bad = tmp_path / "val2017" / "000000000140.jpg"
    _broken_image(kind, bad)
    ds = CocoDetection(tmp_path, "val2017", img_size=64, cache=False)
    with pytest.raises(CocoImageError) as e:
        ds[1]
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(bad) in msg and "image id 140" in msg and str(ds.ann_file) in msg
    if kind == "30000x30000":
        assert "900000000 pixels" in msg and "MAX_IMAGE_PIXELS" in msg
    with pytest.raises(CocoImageError):  # the cache fills through the same check
        CocoDetection(tmp_path, "val2017", img_size=64, cache=True)


def test_an_image_past_pillows_warning_limit_is_refused_too(tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice that, Pillow only warns and decodes anyway."""
    _save(tmp_path, _mini_coco(tmp_path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 64x48 image: 3072 pixels, under 2x
    ds = CocoDetection(tmp_path, "val2017", img_size=64, cache=False)
    with pytest.raises(CocoImageError) as e:
        ds[0]
    assert "3072 pixels" in str(e.value) and "000000000139.jpg" in str(e.value)
