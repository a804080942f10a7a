"""The YOLO loss: what lessons 5-7 minimise, for training (lesson 5) and QAT (lesson 7).

:class:`YoloLoss` is the loss of the official YOLOv7 ``ComputeLoss`` (the YOLOv5-style
assignment): every target is matched to the anchors whose width/height ratio to it is
below ``anchor_t`` (4.0) at every level, and to its own grid cell plus the two nearest
neighbouring cells; box loss ``1 - CIoU`` (torchvision's ``complete_box_iou_loss``),
objectness BCE towards the detached IoU, class BCE; level weights (4.0, 1.0, 0.4) and gains
``box 0.05, obj 0.7 * (img/640)^2, cls 0.3 * nc/80`` as in the official hyper-parameters.

It lives apart from :mod:`qcourse.yolo.train` because it is its own idea: the training loop
takes any ``loss_fn(preds, targets) -> (loss, items)``, and a QAT loop may bring another.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss

__all__ = ["YoloLoss"]


class YoloLoss:
    """The official YOLOv7 training loss for a ``Detect``/``IDetect`` head (training outputs).

    Args:
        model: the :class:`qcourse.yolo.models.Model` (its head gives anchors, strides, nc).
        img_size: training input size (scales the objectness gain like the official code).
        box, obj, cls: loss gains (official hyp.scratch defaults). anchor_t: anchor ratio limit.

    ``loss(preds, targets)`` with ``preds`` the head's training output (list of
    ``(B, na, ny, nx, 5 + nc)``) and ``targets`` rows ``(image_index, class, cx, cy, w, h)``
    normalised to [0, 1]. Returns ``(loss * batch_size, tensor([box, obj, cls, total]))``.
    """

    def __init__(self, model: nn.Module, img_size: int, box: float = 0.05, obj: float = 0.7,
                 cls: float = 0.3, anchor_t: float = 4.0):
        det = model.model[-1]
        self.na, self.nl, self.nc = det.na, det.nl, det.nc
        self.anchors = det.anchors.detach().clone()  # (nl, na, 2) in grid units
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        self.box = box * 3 / self.nl
        self.obj = obj * (img_size / 640) ** 2 * 3 / self.nl
        self.cls = cls * self.nc / 80 * 3 / self.nl
        self.anchor_t = anchor_t
        self.bce = nn.BCEWithLogitsLoss()

    def build_targets(self, preds, targets):
        na, nt = self.na, targets.shape[0]
        device = targets.device
        out = []
        gain = torch.ones(7, device=device)
        ai = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
        t_all = torch.cat((targets.repeat(na, 1, 1), ai[:, :, None]), 2)  # (na, nt, 7)
        g = 0.5
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * g
        for i in range(self.nl):
            anchors = self.anchors[i].to(device)
            ny, nx = preds[i].shape[2:4]
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=device, dtype=torch.float32)
            t = t_all * gain
            if nt:
                r = t[:, :, 4:6] / anchors[:, None]
                keep = torch.max(r, 1.0 / r).max(2)[0] < self.anchor_t
                t = t[keep]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1.0 < g) & (gxy > 1.0)).T
                l, m = ((gxi % 1.0 < g) & (gxi > 1.0)).T
                sel = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[sel]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[sel]
            else:
                t = t_all[0]
                offsets = torch.zeros((0, 2), device=device)
            b, c = t[:, :2].long().T
            gxy, gwh = t[:, 2:4], t[:, 4:6]
            gij = (gxy - offsets).long()
            gi = gij[:, 0].clamp(0, nx - 1)
            gj = gij[:, 1].clamp(0, ny - 1)
            a = t[:, 6].long()
            tbox = torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1)
            out.append((b, a, gj, gi, tbox, anchors[a], c))
        return out

    def __call__(self, preds, targets):
        device = preds[0].device
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for i, (pi, (b, a, gj, gi, tbox, anch, tcls)) in enumerate(zip(preds, self.build_targets(preds, targets))):
            tobj = torch.zeros_like(pi[..., 0])
            n = b.shape[0]
            if n:
                ps = pi[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch
                pbox = box_convert(torch.cat((pxy, pwh), 1), "cxcywh", "xyxy")
                tb = box_convert(tbox, "cxcywh", "xyxy")
                ciou_loss = complete_box_iou_loss(pbox, tb, reduction="none")
                lbox = lbox + ciou_loss.mean()
                iou = (1.0 - ciou_loss).detach().clamp(0)
                tobj[b, a, gj, gi] = iou.to(tobj.dtype)
                if self.nc > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(n, device=device), tcls] = 1.0
                    lcls = lcls + self.bce(ps[:, 5:], tc)
            lobj = lobj + self.bce(pi[..., 4], tobj) * self.balance[i]
        lbox, lobj, lcls = lbox * self.box, lobj * self.obj, lcls * self.cls
        bs = preds[0].shape[0]
        total = lbox + lobj + lcls
        return total * bs, torch.stack((lbox, lobj, lcls, total)).detach()
