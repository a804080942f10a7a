"""YOLOv7 building blocks with the official module and parameter names (lessons 5-8).

The classes here mirror ``models/common.py`` of the official YOLOv7 repository
(WongKinYiu/yolov7) in everything a checkpoint or a sensitivity table can see: class names,
submodule names (``conv``/``bn``/``act``, ``cv1``...``cv7``, ``rbr_dense``/``rbr_1x1``/
``rbr_identity``/``rbr_reparam``, ``implicit``), parameter shapes and forward arithmetic. That
is what lets an official ``state_dict`` load with ``strict=True`` and lets the restricted
unpickler in :mod:`qcourse.yolo.models.checkpoint` map ``models.common.Conv`` & co. onto them.

Inference-time fusing (used before ONNX export and by lessons that quantize the deployed
graph) lives next to each block:

* :meth:`Conv.fuse` folds BatchNorm into the convolution (``conv`` gains a bias, ``bn`` goes);
* :meth:`RepConv.fuse_repvgg_block` merges the 3x3, 1x1 and identity branches into one 3x3
  convolution ``rbr_reparam`` (RepVGG re-parameterisation);
* :func:`fuse_conv_and_bn` is the shared arithmetic.

All tensors are NCHW; shapes in docstrings use ``N`` batch, ``C`` channels, ``H``/``W`` pixels.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "autopad",
    "fuse_conv_and_bn",
    "Conv",
    "Concat",
    "MP",
    "SP",
    "SPPCSPC",
    "RepConv",
    "ImplicitA",
    "ImplicitM",
]


def autopad(k, p=None):
    """'Same' padding for an odd kernel ``k`` (int or sequence) unless ``p`` is given."""
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One ``nn.Conv2d`` (with bias) computing ``bn(conv(x))`` with ``bn`` in eval mode.

    ``w' = w * g / sqrt(var + eps)`` per output channel and
    ``b' = beta + (b - mean) * g / sqrt(var + eps)``; ``g``/``beta`` are the BN affine
    weight/bias, ``mean``/``var`` its running statistics. Works for grouped convolutions.
    """
    if conv.out_channels != bn.num_features:
        raise ValueError(
            f"cannot fuse: conv has {conv.out_channels} output channels but the BatchNorm "
            f"has {bn.num_features} features"
        )
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return _conv_like(conv, conv.weight * scale.reshape(-1, 1, 1, 1),
                      bn.bias + (conv_bias - bn.running_mean) * scale)


@torch.no_grad()
def _conv_like(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` with ``template``'s geometry holding ``weight`` and ``bias``:
    what every folding (Conv+BN, RepConv's branches) ends with."""
    conv = nn.Conv2d(
        template.in_channels,
        template.out_channels,
        kernel_size=template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=template.groups,
        bias=True,
        padding_mode=template.padding_mode,
    ).to(device=weight.device, dtype=weight.dtype)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    return conv


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation: ``models.common.Conv``.

    Args: ``c1``/``c2`` input/output channels, ``k`` kernel, ``s`` stride, ``p`` padding
    (``None`` = same), ``g`` groups, ``act``: ``True`` for SiLU (YOLOv7), an ``nn.Module`` to
    use that module (YOLOv7-tiny passes ``nn.LeakyReLU(0.1)``), anything else for Identity.
    Input (N, c1, H, W) -> output (N, c2, H/s, W/s).
    """

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    @property
    def fused(self) -> bool:
        """True once :meth:`fuse` folded the BatchNorm into ``conv``."""
        return "bn" not in self._modules

    def forward(self, x):
        if "bn" in self._modules:
            return self.act(self.bn(self.conv(x)))
        return self.act(self.conv(x))  # the official ``fuseforward``

    def fuse(self) -> "Conv":
        """Fold ``bn`` into ``conv`` (in place; idempotent). Returns ``self``."""
        if "bn" in self._modules:
            self.conv = fuse_conv_and_bn(self.conv, self.bn)
            del self.bn
        return self


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class MP(nn.Module):
    """Max pooling with kernel = stride = ``k``: halves H and W for ``k=2``."""

    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return self.m(x)


class SP(nn.Module):
    """'Same' max pooling (kernel ``k``, stride ``s``, padding ``k // 2``) used by YOLOv7-tiny's SPP."""

    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class SPPCSPC(nn.Module):
    """Spatial pyramid pooling in a cross-stage-partial block (YOLOv7 layer 51).

    Two branches of ``c_ = int(2 * c2 * e)`` channels: ``cv1 -> cv3 -> cv4 -> [x, pool5(x),
    pool9(x), pool13(x)] -> cv5 -> cv6`` and ``cv2``; their concatenation goes through ``cv7``.
    ``n``, ``shortcut`` and ``g`` exist for signature compatibility with the official class.
    """

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13)):
        super().__init__()
        c_ = int(2 * c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(c_, c_, 3, 1)
        self.cv4 = Conv(c_, c_, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])
        self.cv5 = Conv(4 * c_, c_, 1, 1)
        self.cv6 = Conv(c_, c_, 3, 1)
        self.cv7 = Conv(2 * c_, c2, 1, 1)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        y2 = self.cv2(x)
        return self.cv7(torch.cat((y1, y2), dim=1))


class RepConv(nn.Module):
    """RepVGG-style block (YOLOv7 layers 102-104): 3x3 conv+BN + 1x1 conv+BN (+ BN identity).

    Training form: ``act(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x))``, where
    ``rbr_identity`` (a BatchNorm2d) exists only when ``c1 == c2`` and ``s == 1``.
    Deployed form (``deploy=True`` or after :meth:`fuse_repvgg_block`): ``act(rbr_reparam(x))``
    with one 3x3 convolution carrying a bias. Only ``k=3`` with 'same' padding is supported,
    like the official class.
    """

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        if k != 3 or autopad(k, p) != 1:
            raise ValueError(f"RepConv needs a 3x3 kernel with padding 1, got k={k!r}, p={p!r}")
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        padding_11 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(
                nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2),
            )
            self.rbr_1x1 = nn.Sequential(
                nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2),
            )

    @property
    def fused(self) -> bool:
        return "rbr_reparam" in self._modules

    def forward(self, inputs):
        if "rbr_reparam" in self._modules:
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        """(weight (c2, c1/g, 3, 3), bias (c2,)) of the single conv equal to the three branches."""
        dense = fuse_conv_and_bn(self.rbr_dense[0], self.rbr_dense[1])
        one = fuse_conv_and_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        weight = dense.weight + nn.functional.pad(one.weight, [1, 1, 1, 1])
        bias = dense.bias + one.bias
        if self.rbr_identity is not None:
            bn = self.rbr_identity
            in_per_group = self.in_channels // self.groups
            ident = torch.zeros_like(weight)
            for c in range(self.in_channels):
                ident[c, c % in_per_group, 1, 1] = 1.0
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = weight + ident * scale.reshape(-1, 1, 1, 1)
            bias = bias + bn.bias - bn.running_mean * scale
        return weight, bias

    @torch.no_grad()
    def fuse_repvgg_block(self) -> "RepConv":
        """Replace the branches by ``rbr_reparam`` (in place; idempotent). Returns ``self``."""
        if "rbr_reparam" in self._modules:
            return self
        weight, bias = self.get_equivalent_kernel_bias()
        self.rbr_reparam = _conv_like(self.rbr_dense[0], weight, bias)
        for name in ("rbr_identity", "rbr_dense", "rbr_1x1"):
            if name in self._modules:
                del self._modules[name]
            setattr(self, name, None)
        self.deploy = True
        return self

    fuse = fuse_repvgg_block


class ImplicitA(nn.Module):
    """Learned per-channel offset added to the input: ``x + implicit`` (implicit: (1, C, 1, 1))."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, std=0.02)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    """Learned per-channel scale: ``x * implicit`` (implicit: (1, C, 1, 1), initialised near 1)."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=0.02)

    def forward(self, x):
        return self.implicit * x
