"""YOLOv7 layer configurations as Python data (lessons 5-8).

Each configuration has the structure of the official YAML files of the YOLOv7 repository
(``cfg/training/yolov7.yaml`` and ``cfg/training/yolov7-tiny.yaml``), written the way
``yaml.safe_load`` returns them: module names and expressions are strings (``"Conv"``,
``"nn.Upsample"``, ``"None"``, ``"nc"``, ``"anchors"``, ``"nn.LeakyReLU(0.1)"``). Keeping that
exact form means the ``yaml`` attribute stored inside an official checkpoint compares equal to
these dictionaries, which is how :func:`identify_architecture` recognises a checkpoint.

Every layer is ``[from, number, module, args]``:

* ``from``: index of the input layer (``-1`` = previous layer) or a list of indices;
* ``number``: repeats (scaled by ``depth_multiple``);
* ``module``: a name that :mod:`qcourse.yolo.models.yolo` maps to a class (never ``eval``-ed);
* ``args``: constructor arguments; the input channel count is prepended when the model is built.

Layer ``i`` of the list becomes the module ``model.i`` of the built network, so the module
names in sensitivity tables (``model.37``, ``model.104``...) are the official ones.
"""
from __future__ import annotations

import copy

__all__ = [
    "YOLOV7",
    "YOLOV7_TINY",
    "ARCHITECTURES",
    "get_config",
    "identify_architecture",
]

# ---------------------------------------------------------------------------------------------
# YOLOv7 (cfg/training/yolov7.yaml): 106 layers, IDetect head at index 105.
# ---------------------------------------------------------------------------------------------


def _elan_backbone(c_mid: int, c_out: int) -> list:
    """Backbone ELAN block: two 1x1 branches, four 3x3 convs, concat of 4 taps, 1x1 fuse."""
    return [
        [-1, 1, "Conv", [c_mid, 1, 1]],
        [-2, 1, "Conv", [c_mid, 1, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [[-1, -3, -5, -6], 1, "Concat", [1]],
        [-1, 1, "Conv", [c_out, 1, 1]],
    ]


def _elan_head(c_branch: int, c_mid: int, c_out: int) -> list:
    """Head ELAN-H block: like the backbone one but all six taps are concatenated."""
    return [
        [-1, 1, "Conv", [c_branch, 1, 1]],
        [-2, 1, "Conv", [c_branch, 1, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [-1, 1, "Conv", [c_mid, 3, 1]],
        [[-1, -2, -3, -4, -5, -6], 1, "Concat", [1]],
        [-1, 1, "Conv", [c_out, 1, 1]],
    ]


def _mp_down(c: int) -> list:
    """Transition block: MaxPool branch + strided-conv branch, concatenated."""
    return [
        [-1, 1, "MP", []],
        [-1, 1, "Conv", [c, 1, 1]],
        [-3, 1, "Conv", [c, 1, 1]],
        [-1, 1, "Conv", [c, 3, 2]],
    ]


YOLOV7: dict = {
    "nc": 80,
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": [
        [12, 16, 19, 36, 40, 28],  # P3/8
        [36, 75, 76, 55, 72, 146],  # P4/16
        [142, 110, 192, 243, 459, 401],  # P5/32
    ],
    "backbone": (
        [
            [-1, 1, "Conv", [32, 3, 1]],  # 0
            [-1, 1, "Conv", [64, 3, 2]],  # 1-P1/2
            [-1, 1, "Conv", [64, 3, 1]],
            [-1, 1, "Conv", [128, 3, 2]],  # 3-P2/4
        ]
        + _elan_backbone(64, 256)  # 4-11
        + _mp_down(128)  # 12 (MP) - 15
        + [[[-1, -3], 1, "Concat", [1]]]  # 16-P3/8
        + _elan_backbone(128, 512)  # 17-24
        + _mp_down(256)  # 25 (MP) - 28
        + [[[-1, -3], 1, "Concat", [1]]]  # 29-P4/16
        + _elan_backbone(256, 1024)  # 30-37
        + _mp_down(512)  # 38 (MP) - 41
        + [[[-1, -3], 1, "Concat", [1]]]  # 42-P5/32
        + _elan_backbone(256, 1024)  # 43-50
    ),
    "head": (
        [
            [-1, 1, "SPPCSPC", [512]],  # 51
            [-1, 1, "Conv", [256, 1, 1]],
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [37, 1, "Conv", [256, 1, 1]],  # route backbone P4
            [[-1, -2], 1, "Concat", [1]],
        ]
        + _elan_head(256, 128, 256)  # 56-63
        + [
            [-1, 1, "Conv", [128, 1, 1]],
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [24, 1, "Conv", [128, 1, 1]],  # route backbone P3
            [[-1, -2], 1, "Concat", [1]],
        ]
        + _elan_head(128, 64, 128)  # 68-75
        + _mp_down(128)  # 76 (MP) - 79
        + [[[-1, -3, 63], 1, "Concat", [1]]]
        + _elan_head(256, 128, 256)  # 81-88
        + _mp_down(256)  # 89 (MP) - 92
        + [[[-1, -3, 51], 1, "Concat", [1]]]
        + _elan_head(512, 256, 512)  # 94-101
        + [
            [75, 1, "RepConv", [256, 3, 1]],  # 102
            [88, 1, "RepConv", [512, 3, 1]],  # 103
            [101, 1, "RepConv", [1024, 3, 1]],  # 104
            [[102, 103, 104], 1, "IDetect", ["nc", "anchors"]],  # 105 Detect(P3, P4, P5)
        ]
    ),
}

# ---------------------------------------------------------------------------------------------
# YOLOv7-tiny (cfg/training/yolov7-tiny.yaml): 78 layers, IDetect head at index 77,
# every Conv with LeakyReLU(0.1).
# ---------------------------------------------------------------------------------------------

_LEAKY = "nn.LeakyReLU(0.1)"


def _tconv(c: int, k: int, s: int, frm=-1) -> list:
    return [frm, 1, "Conv", [c, k, s, "None", 1, _LEAKY]]


def _elan_tiny(c_mid: int, c_out: int) -> list:
    """Tiny ELAN block: two 1x1 branches, two 3x3 convs, concat of 4 taps, 1x1 fuse."""
    return [
        _tconv(c_mid, 1, 1),
        _tconv(c_mid, 1, 1, -2),
        _tconv(c_mid, 3, 1),
        _tconv(c_mid, 3, 1),
        [[-1, -2, -3, -4], 1, "Concat", [1]],
        _tconv(c_out, 1, 1),
    ]


YOLOV7_TINY: dict = {
    "nc": 80,
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": [
        [10, 13, 16, 30, 33, 23],  # P3/8
        [30, 61, 62, 45, 59, 119],  # P4/16
        [116, 90, 156, 198, 373, 326],  # P5/32
    ],
    "backbone": (
        [
            _tconv(32, 3, 2),  # 0-P1/2
            _tconv(64, 3, 2),  # 1-P2/4
        ]
        + _elan_tiny(32, 64)  # 2-7
        + [[-1, 1, "MP", []]]  # 8-P3/8
        + _elan_tiny(64, 128)  # 9-14
        + [[-1, 1, "MP", []]]  # 15-P4/16
        + _elan_tiny(128, 256)  # 16-21
        + [[-1, 1, "MP", []]]  # 22-P5/32
        + _elan_tiny(256, 512)  # 23-28
    ),
    "head": (
        [
            _tconv(256, 1, 1),  # 29
            _tconv(256, 1, 1, -2),
            [-1, 1, "SP", [5]],
            [-2, 1, "SP", [9]],
            [-3, 1, "SP", [13]],
            [[-1, -2, -3, -4], 1, "Concat", [1]],
            _tconv(256, 1, 1),
            [[-1, -7], 1, "Concat", [1]],
            _tconv(256, 1, 1),  # 37
            _tconv(128, 1, 1),
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            _tconv(128, 1, 1, 21),  # route backbone P4
            [[-1, -2], 1, "Concat", [1]],
        ]
        + _elan_tiny(64, 128)  # 42-47
        + [
            _tconv(64, 1, 1),
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            _tconv(64, 1, 1, 14),  # route backbone P3
            [[-1, -2], 1, "Concat", [1]],
        ]
        + _elan_tiny(32, 64)  # 52-57
        + [
            _tconv(128, 3, 2),
            [[-1, 47], 1, "Concat", [1]],
        ]
        + _elan_tiny(64, 128)  # 60-65
        + [
            _tconv(256, 3, 2),
            [[-1, 37], 1, "Concat", [1]],
        ]
        + _elan_tiny(128, 256)  # 68-73
        + [
            _tconv(128, 3, 1, 57),  # 74
            _tconv(256, 3, 1, 65),  # 75
            _tconv(512, 3, 1, 73),  # 76
            [[74, 75, 76], 1, "IDetect", ["nc", "anchors"]],  # 77 Detect(P3, P4, P5)
        ]
    ),
}


def _with_head(cfg: dict, head_module: str) -> dict:
    """Copy of ``cfg`` whose last layer uses ``head_module`` (``"Detect"`` or ``"IDetect"``)."""
    out = copy.deepcopy(cfg)
    out["head"][-1][2] = head_module
    return out


# Architecture name -> configuration. The ``-deploy`` variants are the official
# ``cfg/deploy/*.yaml`` files: the same network with a plain ``Detect`` head (the implicit
# layers folded away), which is what the official re-parameterisation script saves.
ARCHITECTURES: dict[str, dict] = {
    "yolov7": YOLOV7,
    "yolov7-tiny": YOLOV7_TINY,
    "yolov7-deploy": _with_head(YOLOV7, "Detect"),
    "yolov7-tiny-deploy": _with_head(YOLOV7_TINY, "Detect"),
}


def get_config(arch: str, nc: int = 80) -> dict:
    """A fresh (deep-copied) configuration dict for ``arch`` with ``nc`` classes.

    ``arch`` is one of :data:`ARCHITECTURES` (``"yolov7"``, ``"yolov7-tiny"``,
    ``"yolov7-deploy"``, ``"yolov7-tiny-deploy"``); ``nc`` is the number of classes (>= 1).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ValueError(f"nc (number of classes) must be an integer >= 1, got {nc!r}")
    cfg = copy.deepcopy(ARCHITECTURES[arch])
    cfg["nc"] = nc
    return cfg


def _normalise(layers) -> list:
    # YAML gives lists; tuples written by hand compare equal after this
    return [[list(f) if isinstance(f, (list, tuple)) else f, n, m, list(a)] for f, n, m, a in layers]


def identify_architecture(cfg: dict) -> str:
    """Name of the known architecture whose layers equal ``cfg``'s, else ``"custom"``.

    Only ``backbone``, ``head`` and the two multipliers are compared (``nc``, ``ch`` and the
    anchors may differ: anchors are data, trained or re-estimated per dataset).
    """
    try:
        layers = (_normalise(cfg["backbone"]), _normalise(cfg["head"]))
        mult = (float(cfg.get("depth_multiple", 1.0)), float(cfg.get("width_multiple", 1.0)))
    except (KeyError, TypeError, ValueError):
        return "custom"
    for name, known in ARCHITECTURES.items():
        if (
            layers == (_normalise(known["backbone"]), _normalise(known["head"]))
            and mult == (known["depth_multiple"], known["width_multiple"])
        ):
            return name
    return "custom"
