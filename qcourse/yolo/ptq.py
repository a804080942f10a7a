"""Lesson 5's application — YOLOv7 post-training quantization, as ``qcourse ptq`` and the notebook run it.

The model-agnostic steps live in :mod:`qcourse.ptq`; this module adds what is YOLOv7's:

* :func:`load_float_model` — the embedded default, an official ``.pt`` or a qcourse
  checkpoint, fused by PyTorch before export (Conv+BN folded, RepConv re-parameterised, the
  IDetect implicit layers folded: TensorRT does not merge RepConv's branches itself);
* :func:`default_ignore` — the detection head's 1x1 convs stay in float (found from the model:
  the index of its ``Detect`` layer, ``model.77`` in YOLOv7-tiny, ``model.105`` in YOLOv7);
* :func:`quantize` — histogram-calibrated inputs, per-channel max weights, the ignore policy
  checked against the model, TensorRT's placement rules;
* :class:`Setting` — bit widths and weight granularity, by name (``W8pcA6``), and the embedded
  default's stress settings :data:`METHOD_STRESS` and :data:`SENSITIVITY_STRESS`; :func:`calibrated`
  quantizes and calibrates a model at one; :func:`method_screen` compares the calibration methods
  at one from a single calibration, keeping each evaluation's match table;
* :func:`save_quantized` / :func:`load_quantized` — calibrated checkpoints (plain tensors and
  JSON-able data, ``torch.load(weights_only=True)`` reads them) that reload with identical
  outputs, ties and amax included;
* :func:`ort_agreement` — the INT8 ONNX file in ONNX Runtime against the PyTorch model;
* :func:`run_ptq` — the whole lesson for one :class:`PTQConfig`, writing ``OUT/results.json``
  (and the files :func:`output_files` names).
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from qcourse import ptq, quant_modules, workflow
from qcourse.export import export_onnx
from qcourse.nn import TensorQuantizer
from qcourse.tensor_quant import QuantDescriptor
from qcourse.utils import atomic_write, check_writable, remove_owned, remove_owned_tree

from . import default_checkpoint
from .models import Detect, Model, load_checkpoint
from .models.checkpoint import (QUANTIZED_FORMAT, CheckpointError, float_model_from_checkpoint,
                                read_checkpoint)

__all__ = [
    "PTQConfig", "load_float_model", "default_ignore", "quantizable_layers", "check_ignore", "quantize",
    "save_quantized", "load_quantized", "ort_agreement", "run_ptq", "output_files", "loaders",
    "QUANTIZED_FORMAT_VERSION", "Setting", "METHOD_STRESS", "SENSITIVITY_STRESS", "calibrated", "method_screen",
]

QUANTIZED_FORMAT_VERSION = 1
_DESC_FIELDS = ("num_bits", "axis", "unsigned", "narrow_range", "calib_method")


@dataclass(frozen=True)
class PTQConfig:
    """Everything one PTQ run needs (``qcourse ptq`` fills it from its options).

    ``weights``: checkpoint (None: the embedded default). ``coco``: COCO root (None: the
    synthetic dataset; calibration on its train split, evaluation on val). ``img_size``: None
    takes the checkpoint's, else 640. ``methods``: calibration methods to compare. ``ignore``:
    regexes of layers left in float (None: :func:`default_ignore`). ``eval_batches``: None
    evaluates the whole split. ``ort_batches``: batches for the ONNX Runtime check. ``matches``: also
    keep each evaluation's per-image match table (``fp32.npz``, ``int8_<method>.npz``) for
    :mod:`qcourse.yolo.intervals`' bootstrap intervals.
    """

    weights: Optional[Path] = None
    coco: Optional[Path] = None
    img_size: Optional[int] = None
    batch_size: int = 32
    calib_batches: int = 8
    methods: Tuple[str, ...] = ptq.METHODS
    ignore: Optional[Tuple[str, ...]] = None
    rules: bool = True
    eval_batches: Optional[int] = None
    ort_batches: int = 1
    matches: bool = False
    device: str = "cpu"
    out: Path = Path("runs/ptq")
    progress: bool = True
    log: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in ptq.METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown calibration method(s) {unknown or self.methods}; choose from "
                             f"{', '.join(ptq.METHODS)}")
        for name in ("batch_size", "calib_batches", "ort_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"eval_batches must be a whole number >= 1 or None, got {self.eval_batches!r}")


@dataclass(frozen=True)
class Setting:
    """How a model is quantized: weight bits, per-channel (axis 0) or per-tensor weights (max
    calibration either way), activation bits (per tensor, histogram calibration, amax by ``method``).

    Named like ``W8pcA6`` (``pc`` per-channel, ``pt`` per-tensor weights): :meth:`parse` reads the
    name, :attr:`name` writes it. ``Setting()`` is what TensorRT runs: W8pcA8.
    """

    w_bits: int = 8
    per_channel: bool = True
    a_bits: int = 8
    method: str = "mse"

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"{name} must be a whole number of bits from 2 to 8, got {value!r}")
        if self.method not in ptq.METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose from {', '.join(ptq.METHODS)}")

    @classmethod
    def parse(cls, text: str, method: str = "mse") -> "Setting":
        m = re.fullmatch(r"w(\d)(pc|pt)a(\d)", str(text).strip().lower())
        if not m or not (2 <= int(m[1]) <= 8 and 2 <= int(m[3]) <= 8):
            raise ValueError(f"{text!r} is not a setting like W8pcA6 (weight bits 2-8, pc = per-channel or pt = "
                             "per-tensor weights, activation bits 2-8)")
        return cls(int(m[1]), m[2] == "pc", int(m[3]), method)

    @property
    def name(self) -> str:
        return f"W{self.w_bits}{'pc' if self.per_channel else 'pt'}A{self.a_bits}"

    def descriptors(self) -> Tuple[QuantDescriptor, QuantDescriptor]:
        """``(input, weight)`` descriptors for :func:`quantize`."""
        return (QuantDescriptor(num_bits=self.a_bits, calib_method="histogram"),
                QuantDescriptor(num_bits=self.w_bits, axis=0 if self.per_channel else None))

    def as_dict(self) -> dict:
        return {"name": self.name, "w_bits": self.w_bits, "per_channel": self.per_channel, "a_bits": self.a_bits,
                "method": self.method}


#: lesson 5's stress setting on the embedded default: 6-bit activations, where the calibration method
#: decides the result (max loses about 10 points more than the best histogram method on 250 val images,
#: ``tools/measure_settings.py``); at 8 bits every method is within noise of FP32 there
METHOD_STRESS = Setting(8, True, 6)
#: lesson 6's stress setting on the embedded default: 4-bit activations, amax by entropy, where
#: quantization costs about 20 points and some layers matter much more than others
SENSITIVITY_STRESS = Setting(8, True, 4, "entropy")


def calibrated(model: Model, setting: Setting, calib, calib_batches: int, ignore: Optional[Sequence[str]] = None,
               device="cpu", progress: bool = False) -> Model:
    """A quantized copy of the fused ``model`` at ``setting``, calibrated on ``calib_batches`` batches of
    ``calib`` with ``setting.method``'s amax (head in float unless ``ignore`` says otherwise; tied)."""
    input_desc, weight_desc = setting.descriptors()
    qmodel, _ = quantize(model, ignore, input_desc=input_desc, weight_desc=weight_desc)
    qmodel.to(device)
    ptq.calibrate(qmodel, calib, calib_batches, device=device, progress=progress)
    ptq.load_amax(qmodel, setting.method)
    return qmodel.eval()


def method_screen(model: Model, setting: Setting, calib, calib_batches: int, val,
                  methods: Sequence[str] = ptq.METHODS, eval_batches: Optional[int] = None,
                  ignore: Optional[Sequence[str]] = None, device="cpu", out=None,
                  progress: bool = False) -> dict:
    """Each calibration method at ``setting`` on the fused ``model``, from ONE calibration.

    The histograms are collected once (:func:`calibrated`, ``calib_batches`` batches of ``calib``);
    then each method's amax is loaded and the model evaluated on ``val`` (its first ``eval_batches``
    batches; None: all) with the per-image match table. Returns ``{method: {"map", "map50",
    "images", "table"}}``, ``table`` the :class:`~qcourse.yolo.intervals.MatchTable` (not JSON:
    drop it before saving the rows). With ``out``, each table is also written (atomically) as
    ``<out>/<method>.npz`` and the row names it under ``"matches"``.
    """
    from .evaluate import evaluate
    from .intervals import save_table

    unknown = [m for m in methods if m not in ptq.METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown calibration method(s) {unknown or list(methods)}; choose from "
                         f"{', '.join(ptq.METHODS)}")
    first = Setting(setting.w_bits, setting.per_channel, setting.a_bits, methods[0])
    qmodel = calibrated(model, first, calib, calib_batches, ignore=ignore, device=device, progress=progress)
    rows = {}
    for method in methods:
        if method != first.method:
            ptq.load_amax(qmodel, method)
        r = evaluate(qmodel, val, device=device, progress=progress, max_batches=eval_batches, matches=True)
        rows[method] = {"map": round(r["map"], 4), "map50": round(r["map50"], 4), "images": r["images"],
                        "table": r["matches"]}
        if out is not None:
            save_table(Path(out) / f"{method}.npz", r["matches"])
            rows[method]["matches"] = f"{method}.npz"
    return rows


# ----------------------------------------------------------------------------- the model
def load_float_model(weights=None) -> Model:
    """FP32 model from ``weights`` (None: the embedded default), fused by PyTorch before export.

    YOLOv7's ``fuse()``: BatchNorm folded into the convs, RepConv's branches merged into one 3x3 conv,
    the implicit layers folded. TensorRT would fold the BatchNorms itself, but it does not merge
    RepConv's branches: that happens here, so the quantized weights are the ones TensorRT runs.
    """
    path = Path(weights) if weights is not None else default_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(f"weights {path} not found; pass an existing .pt file (or none for the default)")
    return load_checkpoint(path, fuse=True)


def default_ignore(model: nn.Module) -> List[str]:
    """The detection head's convs stay float: ``[r"model\\.<i>\\.m\\..*"]`` for the Detect layer i.

    Their outputs are box coordinates and logits decoded in float; NVIDIA's yolov7_qat leaves
    them unquantized too. The index comes from the model, so custom depths work.
    """
    heads = [name for name, m in model.named_modules() if isinstance(m, Detect)]
    if not heads:
        raise ValueError("the model has no YOLO Detect head; pass ignore patterns explicitly")
    return [re.escape(h) + r"\.m\..*" for h in heads]


def quantizable_layers(model: nn.Module) -> List[str]:
    """Names of the layers :func:`quantize` would replace (convs, linears, avg-pools)."""
    mapping = quant_modules.quant_map()
    pools = {nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d}
    return [n for n, m in model.named_modules() if type(m) in mapping and type(m) not in pools]


def check_ignore(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """The layers ``patterns`` leave in float; raises for an invalid pattern or one that matches nothing."""
    names = quantizable_layers(model)
    ignored = []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"--ignore {p!r} is not a valid regular expression ({e}); escape dots as \\.") from None
        hits = [n for n in names if rx.match(n)]
        if not hits:
            sample = ", ".join(names[:3] + names[-3:])
            raise ValueError(f"--ignore {p!r} matches no quantizable layer (matched from the start of the "
                             f"name); layer names look like {sample}, e.g. 'model\\.77\\.m\\..*'")
        ignored += [n for n in hits if n not in ignored]
    return sorted(ignored, key=ptq._natural)


def quantize(model: Model, ignore: Optional[Sequence[str]] = None, rules: bool = True,
             input_desc: Optional[QuantDescriptor] = None,
             weight_desc: Optional[QuantDescriptor] = None) -> Tuple[Model, dict]:
    """A quantized copy of the fused ``model`` and ``{"ignore", "ignored", "replaced", "groups"}``.

    Inputs get histogram calibrators, weights per-channel (axis 0) max, unless the descriptors
    say otherwise; ``rules`` ties quantizers as TensorRT needs (before calibration, so each
    shared calibrator sees all its members' inputs).
    """
    ignore = list(default_ignore(model) if ignore is None else ignore)
    ignored = check_ignore(model, ignore)
    input_desc = input_desc or QuantDescriptor(calib_method="histogram")
    weight_desc = weight_desc or QuantDescriptor(axis=0)
    qmodel = copy.deepcopy(model).eval()
    replaced = quant_modules.replace_modules(qmodel, ignore=ignore, quant_desc_input=input_desc,
                                             quant_desc_weight=weight_desc)
    groups = ptq.apply_placement_rules(qmodel) if rules else {}
    qmodel.ptq_info = {"ignore": ignore, "ignored": ignored, "replaced": replaced, "groups": groups,
                       "input_desc": _desc_dict(input_desc), "weight_desc": _desc_dict(weight_desc)}
    return qmodel, qmodel.ptq_info


def _desc_dict(desc: QuantDescriptor) -> dict:
    out = {}
    for f in _DESC_FIELDS:
        v = getattr(desc, f)
        out[f] = list(v) if isinstance(v, tuple) else v
    return out


def _desc(d: dict) -> QuantDescriptor:
    axis = d.get("axis")
    return QuantDescriptor(num_bits=d["num_bits"], axis=tuple(axis) if isinstance(axis, list) else axis,
                           unsigned=d["unsigned"], narrow_range=d["narrow_range"], calib_method=d["calib_method"])


# ----------------------------------------------------------------------------- checkpoints
def _is_amax_key(key: str) -> bool:
    return key.endswith("_quantizer._amax")


def save_quantized(qmodel: Model, path, **meta) -> Path:
    """Write a calibrated model made by :func:`quantize` (atomically); reload with :func:`load_quantized`.

    The file is a qcourse checkpoint dict (float weights, config, names, ``meta``) with the
    format tag ``qcourse.yolo.ptq`` and a ``quantization`` entry: the ignore patterns, the two
    descriptors, the tied groups, the quantizers switched off, and every amax as a tensor.
    Plain data only: ``torch.load(path, weights_only=True)`` reads it, no code is pickled.
    """
    info = getattr(qmodel, "ptq_info", None)
    if info is None:
        raise TypeError("save_quantized needs a model made by qcourse.yolo.ptq.quantize")
    for key, value in meta.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f"metadata {key}={value!r} is not JSON-serialisable; pass numbers, strings, "
                             "lists or dicts") from None
    sd = {k: v.detach().to("cpu", copy=True) for k, v in qmodel.state_dict().items()}
    off = [n for n, q in workflow.quantizers(qmodel).items() if not q.is_enabled]
    ckpt = {
        "format": QUANTIZED_FORMAT, "format_version": 1, "arch": qmodel.arch, "nc": qmodel.nc,
        "names": list(qmodel.names), "cfg": json.loads(json.dumps(qmodel.yaml)), "fused": bool(qmodel.fused),
        "dtype": "float32", "state_dict": {k: v for k, v in sd.items() if not _is_amax_key(k)},
        "meta": json.loads(json.dumps(meta)),
        "quantization": {"version": QUANTIZED_FORMAT_VERSION,
                         **json.loads(json.dumps({k: info[k] for k in ("ignore", "groups", "input_desc",
                                                                        "weight_desc")})),
                         "disabled": off, "amax": {k: v for k, v in sd.items() if _is_amax_key(k)}},
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_quantized(path, map_location="cpu") -> Model:
    """The calibrated quantized model saved by :func:`save_quantized`, ready to evaluate or export.

    The float model is built and checked as :func:`~qcourse.yolo.models.load_checkpoint` does;
    the quantizers are inserted with the saved ignore patterns and descriptors, tied into the
    saved groups (checked against the model's own graph) and given the saved amax.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != QUANTIZED_FORMAT:
        raise CheckpointError(f"{path.name} is not a calibrated INT8 checkpoint of `qcourse ptq`; a float "
                              "checkpoint loads with qcourse.yolo.models.load_checkpoint")
    quant = obj.get("quantization")
    if not isinstance(quant, dict) or quant.get("version") != QUANTIZED_FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: quantization entry missing or of an unknown version; "
                              "recreate it with `qcourse ptq`")
    model = float_model_from_checkpoint(obj, path.name)
    qmodel, info = quantize(model, quant["ignore"], rules=bool(quant["groups"]),
                            input_desc=_desc(quant["input_desc"]), weight_desc=_desc(quant["weight_desc"]))
    if info["groups"] != quant["groups"]:
        raise CheckpointError(f"{path.name}: the saved tied groups differ from the ones this model's graph "
                              "gives; recreate the checkpoint with `qcourse ptq`")
    _load_amax(qmodel, quant["amax"], path.name)
    qs = workflow.quantizers(qmodel)
    for name in quant.get("disabled", []):
        qs[name].disable()
    qmodel.meta = {**getattr(model, "meta", {}), "quantized": True}
    return qmodel.to(map_location).eval()


def _load_amax(qmodel: Model, amax: dict, source: str) -> None:
    # a tied quantizer appears under each member's name in the state_dict, so in the file too
    expected = {f"{n}._amax" for n, m in qmodel.named_modules(remove_duplicate=False)
                if isinstance(m, TensorQuantizer)}
    missing, extra = sorted(expected - set(amax)), sorted(set(amax) - expected)
    if missing or extra:
        raise CheckpointError(f"{source}: the amax entries do not fit the model ({len(missing)} missing, "
                              f"first {missing[:1]}; {len(extra)} unexpected, first {extra[:1]}); recreate "
                              "the checkpoint with `qcourse ptq`")
    qmodel.load_state_dict({**qmodel.state_dict(), **amax}, strict=True)


# ----------------------------------------------------------------------------- ONNX Runtime
def ort_agreement(qmodel: nn.Module, onnx_path, loader, batches: int = 1, conf: float = 0.25,
                  iou: float = 0.45) -> dict:
    """How far the INT8 ONNX file in ONNX Runtime is from the PyTorch fake-quant model.

    Both run the same ``batches`` batches. Two measures: ``max_abs_diff`` of the raw
    predictions (box pixels and sigmoid scores), and ``matched``: the fraction of PyTorch
    detections (NMS at ``conf``/``iou``, the deployment settings) that ONNX Runtime also finds
    with the same class and IoU >= 0.9. The integer kernels sum exactly where PyTorch sums in
    float, so a value landing on a rounding tie (x.5 steps) can take the neighbouring code:
    ``matched`` is 1.0 up to such ties; ``ort_only`` counts ONNX Runtime detections with no partner.
    """
    import onnxruntime as ort
    from torchvision.ops import box_iou

    from .postprocess import non_max_suppression

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3  # errors only: ORT's notes on folded initializers are not the learner's to act on
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    device = next(qmodel.parameters()).device
    diff, n_torch, n_matched, n_ort, images = 0.0, 0, 0, 0, 0
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        x = batch[0].float()
        with torch.no_grad():
            want = qmodel(x.to(device))[0].cpu()
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        diff = max(diff, float((got - want).abs().max()))
        images += len(x)
        for a, b in zip(non_max_suppression(want, conf, iou), non_max_suppression(got, conf, iou)):
            n_torch, n_ort = n_torch + len(a), n_ort + len(b)
            if len(a) and len(b):
                same = (box_iou(a[:, :4], b[:, :4]) >= 0.9) & (a[:, 5:6] == b[:, 5].unsqueeze(0))
                n_matched += int(same.any(1).sum())
                n_ort -= int(same.any(0).sum())
    return {"images": images, "max_abs_diff": diff, "detections": n_torch,
            "matched": n_matched / n_torch if n_torch else 1.0, "ort_only": n_ort}


# ----------------------------------------------------------------------------- the run
def loaders(coco, batch_size: int, img_size: int, progress: bool = False):
    """``(root, calibration loader, val loader)`` of lesson 5, for PTQ and the sensitivity scan.

    Calibration reads the training images (train2017 with ``coco``, else the synthetic train
    split) in a fixed order, without augmentation, so the first N batches are always the same;
    val is for mAP.
    """
    from .datasets import create_dataloader, dataset_splits

    root, train, val = dataset_splits(coco, progress)
    # calibration: the first N batches of the training images in a fixed order (no augmentation)
    calib = create_dataloader(root, train, img_size=img_size, batch_size=batch_size, shuffle=False)
    val_loader = create_dataloader(root, val, img_size=img_size, batch_size=batch_size)
    return root, calib, val_loader


def _evaluate(model, loader, config: PTQConfig, table: Path) -> dict:
    """The row of one evaluation; with ``config.matches`` its match table is written to ``table`` too."""
    from .evaluate import evaluate
    from .intervals import save_table

    r = evaluate(model, loader, device=config.device, progress=config.progress, max_batches=config.eval_batches,
                 matches=config.matches)
    row = {"map": round(r["map"], 4), "map50": round(r["map50"], 4), "images": r["images"]}
    if config.matches:
        save_table(table, r["matches"])
        row["matches"] = table.name
    return row


def _prepare(config: PTQConfig):
    """Load, check the ignore policy and the data, before anything slow or any file is written."""
    model = load_float_model(config.weights)
    img_size = config.img_size or int(model.meta.get("img_size", 640))
    qmodel, info = quantize(model, config.ignore, rules=config.rules)
    root, calib, val = loaders(config.coco, config.batch_size, img_size, config.progress)
    return model.to(config.device), qmodel.to(config.device), info, img_size, root, calib, val


def _int8_method(qmodel, method, val, example, stage: Path, config: PTQConfig, meta: dict) -> dict:
    ptq.load_amax(qmodel, method)
    row = _evaluate(qmodel, val, config, stage / f"int8_{method}.npz")
    onnx_name, ckpt_name = f"int8_{method}.onnx", f"int8_{method}.pt"
    export_onnx(qmodel, example, stage / onnx_name)
    save_quantized(qmodel, stage / ckpt_name, method=method, **meta)
    row["onnx"], row["checkpoint"] = onnx_name, ckpt_name
    row["placement_problems"] = len(ptq.check_qdq_placement(stage / onnx_name))
    row["ort"] = {k: (round(v, 6) if isinstance(v, float) else v)
                  for k, v in ort_agreement(qmodel, stage / onnx_name, val, config.ort_batches).items()}
    config.log(f"  {method:10s} mAP@0.5:0.95 {row['map']:.4f}  mAP@0.5 {row['map50']:.4f}  "
               f"ORT matched {row['ort']['matched']:.3f}")
    return row


def run_ptq(config: PTQConfig) -> dict:
    """FP32 vs each calibration method on one model: evaluate, export, save; returns the results.

    Writes ``fp32.onnx``, ``int8_<method>.onnx``, ``int8_<method>.pt`` (with ``matches``, the
    ``.npz`` match tables of the evaluations too) and last
    ``results.json`` into ``config.out``. Files are made in a hidden staging folder and moved
    in at the end, so an interrupted run leaves the previous results as they were (or none).
    A file of those names that qcourse did not write is refused before any work
    (:func:`qcourse.utils.check_writable`): qcourse replaces only its own files.
    """
    out = Path(config.out)
    check_writable(*(out / name for name in output_files(config.methods, config.matches)))
    out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be a folder fails here, before the work
    model, qmodel, info, img_size, root, calib, val = _prepare(config)
    stage = Path(tempfile.mkdtemp(prefix=".ptq-", dir=str(out)))
    try:
        example = torch.zeros(1, 3, img_size, img_size, device=config.device)
        config.log(f"FP32 {Path(config.weights).name if config.weights else 'embedded default'} at {img_size} px")
        fp32 = {**_evaluate(model, val, config, stage / "fp32.npz"), "onnx": "fp32.onnx"}
        export_onnx(model, example, stage / "fp32.onnx")
        config.log(f"  {'fp32':10s} mAP@0.5:0.95 {fp32['map']:.4f}  mAP@0.5 {fp32['map50']:.4f}")
        ptq.calibrate(qmodel, calib, config.calib_batches, device=config.device, progress=config.progress)
        meta = {"img_size": img_size, "calib_batches": config.calib_batches}
        int8 = {m: _int8_method(qmodel, m, val, example, stage, config, meta) for m in config.methods}
        graphs = ptq.compare_graphs({"fp32": stage / "fp32.onnx",
                                     **{m: stage / r["onnx"] for m, r in int8.items()}})
        results = {
            "weights": str(config.weights) if config.weights else "embedded default",
            "data": str(root), "img_size": img_size, "batch_size": config.batch_size,
            "calib_batches": config.calib_batches, "eval_batches": config.eval_batches,
            "rules": config.rules, "quantizers": len(workflow.quantizers(qmodel)),
            "ignore": info["ignore"], "ignored": info["ignored"], "tied_groups": info["groups"],
            "fp32": fp32, "int8": int8, "graphs": graphs,
        }
        _publish(stage, out, results)
    finally:
        remove_owned_tree(stage)  # what the run wrote there; the folder too once empty
    return results


def output_files(methods: Sequence[str], matches: bool = False) -> List[str]:
    """The names :func:`run_ptq` writes into its folder for these calibration methods (and match tables)."""
    tables = ["fp32.npz", *(f"int8_{m}.npz" for m in methods)] if matches else []
    return ["fp32.onnx", *(f"int8_{m}{ext}" for m in methods for ext in (".onnx", ".pt")), *tables, "results.json"]


def _publish(stage: Path, out: Path, results: dict) -> None:
    """Move the staged files into ``out``; results.json goes last, so it never names a missing file."""
    remove_owned(out / "results.json")  # its files are about to be replaced: it must not describe the new ones
    for f in sorted(stage.iterdir()):
        if f.is_file() and not f.name.startswith("."):  # not the folder's list of qcourse's files
            with atomic_write(out / f.name, suffix=f.suffix) as tmp:
                os.replace(f, tmp)  # a rename: the same file system
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
