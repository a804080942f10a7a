"""YOLOv7 detection heads and the layer-list ``Model`` (lessons 5-8).

Mirrors ``models/yolo.py`` of the official YOLOv7 repository: ``Model.model`` is an
``nn.Sequential`` whose children are named ``0 ... 105`` (YOLOv7) or ``0 ... 77``
(YOLOv7-tiny), each child carrying the official bookkeeping attributes ``.i`` (index),
``.f`` (from), ``.type`` (official class path, e.g. ``"models.common.Conv"``) and ``.np``
(parameter count), and the head owns the ``anchors``/``anchor_grid`` buffers. Module and
parameter names are the official ones, so ``state_dict`` keys read ``model.104.rbr_dense.0.weight``.

Forward contract (same as the official model):

* training mode: a list with one raw tensor per level, shape ``(N, na, ny, nx, 5 + nc)``;
* eval mode: ``(pred, raw_list)`` where ``pred`` is ``(N, sum(na * ny * nx), 5 + nc)`` with
  ``x, y, w, h`` in input pixels (box centre and size) and sigmoid objectness and class
  scores. Decoding: ``xy = (2 * sigmoid - 0.5 + grid) * stride``,
  ``wh = (2 * sigmoid) ** 2 * anchor_grid`` (anchor_grid in pixels).

The decode is written without in-place slice assignment, with ``-1`` as the batch dimension
of every reshape and (while tracing) with the cell grid built inside the graph, so the model
exports to ONNX (``torch.onnx.export(..., dynamo=False, opset_version=13)``) with a dynamic
batch axis, and the exported graph also accepts other input sizes (multiples of 32).
"""
from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from .common import MP, SP, SPPCSPC, Concat, Conv, ImplicitA, ImplicitM, RepConv
from .configs import identify_architecture

__all__ = [
    "Detect",
    "IDetect",
    "Model",
    "build_model",
    "parse_model",
    "initialize_weights",
    "check_anchor_order",
    "UnsupportedArchitectureError",
]


class UnsupportedArchitectureError(ValueError):
    """A configuration (or checkpoint) uses a module or argument qcourse does not implement."""


def _make_grid(nx: int, ny: int) -> torch.Tensor:
    """Cell offsets, shape (1, 1, ny, nx, 2), last dim = (x, y)."""
    yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    return torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()


class Detect(nn.Module):
    """YOLO detection head: one 1x1 conv per level producing ``na * (5 + nc)`` channels.

    Args: ``nc`` classes, ``anchors`` as ``[[w0, h0, w1, h1, ...] per level]`` in input
    pixels, ``ch`` input channels per level. Buffers: ``anchors`` (nl, na, 2) in units of the
    level's stride (set by :class:`Model`), ``anchor_grid`` (nl, 1, na, 1, 1, 2) in pixels.
    """

    stride = None  # (nl,) tensor, computed by Model from a probe forward

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def _level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Raw conv output of level ``i`` before the reshape, (N, na * no, ny, nx)."""
        return self.m[i](x)

    def _grid(self, i: int, nx, ny, like: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # ONNX export: build it in the graph (follows the input size)
            return _make_grid(nx, ny).to(device=like.device, dtype=like.dtype)
        g = self.grid[i]
        if g.dim() != 5 or g.shape[2] != ny or g.shape[3] != nx or g.device != like.device:
            g = _make_grid(nx, ny).to(like.device)
            self.grid[i] = g
        return g.to(like.dtype)

    def forward(self, x):
        raw, z = [], []
        for i in range(self.nl):
            xi = self._level(i, x[i])
            ny, nx = xi.shape[2], xi.shape[3]
            xi = xi.view(-1, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(xi)
            if not self.training:
                y = xi.sigmoid()
                grid = self._grid(i, nx, ny, y)
                xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.stride[i].to(y)
                wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(-1, self.na * ny * nx, self.no))
        if self.training:
            return raw
        return torch.cat(z, 1), raw


class IDetect(Detect):
    """YOLOR-style head with implicit knowledge: ``im * m(x + ia)`` per level.

    ``ia`` (ImplicitA, one per level on the input channels) and ``im`` (ImplicitM on the
    output channels) are folded into ``m`` by :meth:`fuse`, after which the forward is the
    official ``fuseforward`` (identical to :class:`Detect`). The ``ia``/``im`` parameters stay
    in the module (and the state_dict), as in the official code.
    """

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__(nc, anchors, ch)
        self.ia = nn.ModuleList(ImplicitA(x) for x in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)
        self.fused = False

    def _level(self, i, x):
        if getattr(self, "fused", False):
            return self.m[i](x)
        return self.im[i](self.m[i](self.ia[i](x)))

    @torch.no_grad()
    def fuse(self) -> "IDetect":
        """Fold ``ia`` then ``im`` into each ``m`` conv (in place; idempotent)."""
        if getattr(self, "fused", False):
            return self
        for conv, ia, im in zip(self.m, self.ia, self.im):
            w = conv.weight.reshape(conv.out_channels, conv.in_channels)
            conv.bias += w @ ia.implicit.reshape(-1)  # W (x + a) + b = W x + (W a + b)
            scale = im.implicit.reshape(-1)
            conv.bias *= scale  # m * (W x + b') = (m W) x + m b'
            conv.weight *= scale.reshape(-1, 1, 1, 1)
        self.fused = True
        return self


# ---------------------------------------------------------------------------------------------
# Building a model from a configuration
# ---------------------------------------------------------------------------------------------

_MODULES = {
    "Conv": Conv,
    "Concat": Concat,
    "MP": MP,
    "SP": SP,
    "SPPCSPC": SPPCSPC,
    "RepConv": RepConv,
    "Detect": Detect,
    "IDetect": IDetect,
    "nn.Upsample": nn.Upsample,
}
# what the official ``str(m)[8:-2]`` prints for each class
_OFFICIAL_TYPE = {
    Conv: "models.common.Conv",
    Concat: "models.common.Concat",
    MP: "models.common.MP",
    SP: "models.common.SP",
    SPPCSPC: "models.common.SPPCSPC",
    RepConv: "models.common.RepConv",
    Detect: "models.yolo.Detect",
    IDetect: "models.yolo.IDetect",
    nn.Upsample: "torch.nn.modules.upsampling.Upsample",
}
_ACTIVATION = re.compile(r"^nn\.(LeakyReLU|ReLU|SiLU|Hardswish|Identity)\(([^()]*)\)$")


def _make_divisible(x: float, divisor: int) -> int:
    return math.ceil(x / divisor) * divisor


def _resolve_arg(a, nc, anchors, where: str):
    """Turn a YAML-style argument string into a value, without ``eval``."""
    if not isinstance(a, str):
        return a
    if a == "None":
        return None
    if a == "nc":
        return nc
    if a == "anchors":
        return anchors
    m = _ACTIVATION.match(a.replace(" ", ""))
    if m:
        name, arg = m.groups()
        if name == "LeakyReLU":
            try:
                slope = float(arg) if arg else 0.01
            except ValueError:
                raise UnsupportedArchitectureError(
                    f"{where}: cannot read the LeakyReLU slope in {a!r}"
                ) from None
            return nn.LeakyReLU(slope)
        if arg:
            raise UnsupportedArchitectureError(f"{where}: unsupported activation arguments in {a!r}")
        return getattr(nn, name)()
    if a.startswith("nn."):
        raise UnsupportedArchitectureError(
            f"{where}: unsupported expression {a!r}; qcourse understands 'None', 'nc', "
            "'anchors' and nn.LeakyReLU(slope)/ReLU()/SiLU()/Hardswish()/Identity()"
        )
    return a  # plain strings such as 'nearest'


def parse_model(d: dict, ch: list):
    """Build the layer list of a configuration dict (official ``parse_model`` semantics).

    ``d`` has ``nc``, ``anchors``, ``depth_multiple``, ``width_multiple``, ``backbone`` and
    ``head`` (see :mod:`qcourse.yolo.models.configs`); ``ch`` is ``[input_channels]``. Returns
    ``(nn.Sequential of layers, sorted list of layer indices whose outputs are reused)``.
    Module names are looked up in a fixed table and expression strings are parsed, never
    evaluated; anything else raises :class:`UnsupportedArchitectureError`.
    """
    try:
        anchors, nc = d["anchors"], d["nc"]
        gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
        layer_specs = list(d["backbone"]) + list(d["head"])
    except (KeyError, TypeError) as e:
        raise UnsupportedArchitectureError(
            f"model configuration is missing {e}; it needs 'nc', 'anchors', 'backbone' and 'head'"
        ) from None
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)

    layers, save, c2 = [], [], ch[-1]
    for i, spec in enumerate(layer_specs):
        try:
            f, n, m_name, args = spec
        except (TypeError, ValueError):
            raise UnsupportedArchitectureError(
                f"layer {i}: expected [from, number, module, args], got {spec!r}"
            ) from None
        where = f"layer {i} ({m_name})"
        if m_name not in _MODULES:
            raise UnsupportedArchitectureError(
                f"layer {i} uses module {m_name!r}, which qcourse does not implement; "
                f"supported modules: {sorted(_MODULES)} (YOLOv7 and YOLOv7-tiny)"
            )
        m = _MODULES[m_name]
        args = [_resolve_arg(a, nc, anchors, where) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if m in (Conv, RepConv, SPPCSPC):
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = _make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m is SPPCSPC:
                args.insert(2, n)
                n = 1
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m in (Detect, IDetect):
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]
        try:
            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        except (TypeError, ValueError) as e:
            raise UnsupportedArchitectureError(
                f"{where}: cannot build it with args {args!r}: {e}"
            ) from None
        m_.i, m_.f, m_.type = i, f, _OFFICIAL_TYPE[m]
        m_.np = sum(x.numel() for x in m_.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def initialize_weights(model: nn.Module) -> None:
    """Official ``initialize_weights``: BN eps 1e-3 / momentum 0.03, in-place ReLU-likes."""
    for m in model.modules():
        t = type(m)
        if t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6):
            m.inplace = True


def check_anchor_order(m: Detect) -> None:
    """Flip the anchor order if anchor areas do not grow with the stride (official check)."""
    a = m.anchor_grid.prod(-1).view(-1)
    da = a[-1] - a[0]
    ds = m.stride[-1] - m.stride[0]
    if da.sign() != ds.sign():
        m.anchors[:] = m.anchors.flip(0)
        m.anchor_grid[:] = m.anchor_grid.flip(0)


class Model(nn.Module):
    """A YOLOv7-family network built from a configuration dict (see :mod:`.configs`).

    Attributes: ``model`` (nn.Sequential of layers ``model.0 ...``), ``yaml`` (the
    configuration, official structure, with ``nc`` and ``ch``), ``save`` (indices of layers
    whose outputs later layers read), ``stride`` (tensor of per-level strides in pixels),
    ``nc``, ``names`` (class names), ``arch`` (``"yolov7"``, ``"yolov7-tiny"``, their
    ``-deploy`` variants or ``"custom"``). Input: (N, ch, H, W) float in [0, 1], H and W
    multiples of 32. Output: see the module docstring.
    """

    #: input size of the probe forward used to measure the strides (any multiple of 32 works
    #: for stride-32 networks; the official code uses 256, the result is identical)
    _STRIDE_PROBE = 64

    def __init__(self, cfg: dict, ch: int = 3, nc: int | None = None, names=None):
        super().__init__()
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a configuration dict, got {type(cfg).__name__}")
        self.yaml = copy.deepcopy(cfg)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc is not None:
            self.yaml["nc"] = nc
        nc = self.yaml.get("nc")
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
            raise ValueError(f"nc (number of classes) must be an integer >= 1, got {nc!r}")
        self.names = [str(i) for i in range(nc)] if names is None else _check_names(names, nc)
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch=[ch])
        self.froms = [m.f for m in self.model]
        self.nc = nc
        self.arch = identify_architecture(self.yaml)
        self.meta = {}  # metadata of the checkpoint the model was loaded from

        m = self.model[-1]
        if isinstance(m, Detect):
            s = self._STRIDE_PROBE
            m.stride = torch.tensor([s / x.shape[-2] for x in self._probe(torch.zeros(1, ch, s, s))])
            m.anchors /= m.stride.view(-1, 1, 1)
            check_anchor_order(m)
            self.stride = m.stride
            self._initialize_biases()
        else:
            raise UnsupportedArchitectureError(
                f"the last layer must be a Detect or IDetect head, got {type(m).__name__}"
            )
        initialize_weights(self)

    @torch.no_grad()
    def _probe(self, x):
        """Raw head outputs for ``x`` without touching BatchNorm running statistics."""
        was_training = self.training
        self.eval()
        self.model[-1].training = True  # raw outputs; the decode needs the strides being measured
        try:
            return self.forward(x)
        finally:
            self.train(was_training)

    def _initialize_biases(self, cf=None):
        """Official prior: objectness for ~8 objects per 640 image, class prior 0.6 / nc."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:] += math.log(0.6 / (m.nc - 0.99)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def forward(self, x):
        outputs = []
        for i, m in enumerate(self.model):
            f = self.froms[i]
            if f != -1:
                x = outputs[f] if isinstance(f, int) else [x if j == -1 else outputs[j] for j in f]
            x = m(x)
            outputs.append(x if i in self.save else None)
        return x

    @torch.no_grad()
    def fuse(self) -> "Model":
        """Inference fusing, in place: Conv+BN folding, RepConv re-parameterisation and
        IDetect implicit folding (official ``Model.fuse``). Outputs are unchanged up to float
        rounding *when BatchNorm uses its running statistics* (eval mode). Returns ``self``."""
        for m in list(self.model.modules()):
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv:
                m.fuse()
            elif isinstance(m, IDetect):
                m.fuse()
        for layer in self.model:  # keep the official per-layer parameter counts current
            layer.np = sum(x.numel() for x in layer.parameters())
        return self

    @property
    def fused(self) -> bool:
        """True if any block has been fused (see :meth:`fuse`)."""
        return any(
            (type(m) is Conv and m.fused) or (isinstance(m, RepConv) and m.fused)
            or (isinstance(m, IDetect) and getattr(m, "fused", False))
            for m in self.model.modules()
        )

    def summary(self) -> str:
        """The official layer table (index, from, n, params, module) and the model summary line."""
        lines = [f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}"]
        for m in self.model:
            n = len(m) if isinstance(m, nn.Sequential) else 1
            lines.append(f"{m.i:>3}{str(m.f):>18}{n:>3}{m.np:>10}  {m.type:<40}")
        n_p = sum(x.numel() for x in self.parameters())
        lines.append(f"Model Summary: {len(list(self.modules()))} layers, {n_p} parameters")
        return "\n".join(lines)


def _check_names(names, nc: int) -> list:
    names = [str(n) for n in names]
    if len(names) != nc:
        raise ValueError(f"got {len(names)} class names for nc={nc}; pass exactly nc names")
    return names


def build_model(cfg: dict, nc: int | None = None, names=None, ch: int = 3) -> Model:
    """A fresh :class:`Model` (training mode, official initialisation) from a configuration dict."""
    return Model(cfg, ch=ch, nc=nc, names=names)
