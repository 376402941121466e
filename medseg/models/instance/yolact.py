"""A one-stage prototype-mask instance model in the spirit of YOLACT (Bolya et al. 2019), registered as ``yolact``.

A protonet turns the finest pyramid level into ``k`` image-sized prototype masks; a head shared over the pyramid
levels gives, per anchor, class logits, box deltas (MONAI's ``BoxCoder``) and ``k`` mask coefficients (tanh). An
object's mask is ``sigmoid(prototypes @ coefficients)``, cropped to its box.

Differences from the paper, for small objects such as nuclei and for training from scratch on CPU-sized budgets:

* backbone: the package's basic-block ResNet + FPN (:class:`BackboneFPN`), not an ImageNet ResNet-101;
* the protonet reads P2 (stride 4) instead of P3, so prototypes come at stride 2 (the paper's at stride 4), and it
  is ``proto_channels`` (64) wide instead of 256; masks are up-sampled to the image for the loss and the output
  (the paper computes the loss at prototype resolution);
* the head runs on P2..P5 with one anchor size per level (8, 16, 32, 64; the paper: P3..P7, 24..384 at 550 px);
* standard greedy per-class NMS (:func:`~medseg.models.instance.detection.batched_nms`), not Fast NMS;
* the masks of at most ``max_mask_positives`` positives per image enter the loss, every object's best-matching
  anchors first (deterministic; the paper samples at random);
* an image without objects still trains on its ``negative_ratio`` hardest negatives (as if it had one positive);
* loss weights class 1, box 1.5 (as in the authors' configuration), mask 1 on the mean BCE inside the box
  (their mask weight goes with another normalisation), semantic 1.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("yolact", 2, 1, 2, base_channels=4, blocks=(1, 1, 1, 1), fpn_channels=8, prototypes=4,
    ...                    proto_channels=8)
    >>> inst = torch.zeros(1, 1, 64, 64, dtype=torch.long); inst[0, 0, 10:20, 30:42] = 1
    >>> sorted(net.training_losses(torch.randn(1, 1, 64, 64), inst))
    ['box', 'class', 'mask', 'semantic']
    >>> net.eval().predict_instances(torch.randn(1, 1, 50, 37))[0].masks.shape[1:]
    torch.Size([50, 37])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from monai.apps.detection.utils.box_coder import BoxCoder

from medseg.errors import MedsegError, check_choice
from medseg.models.blocks import ConvNormAct, conv, interpolate
from medseg.models.instance.base import InstanceModel, Instances, InstanceTargets, instance_targets
from medseg.models.instance.detection import (BACKGROUND, IGNORED, batched_nms, box_iou, clip_boxes, match_by_iou,
                                              remove_small_boxes)
from medseg.models.instance.fpn import BackboneFPN
from medseg.models.registry import register

CLASS_LOSSES = ("ohem", "focal")
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # SSD's variances (0.1, 0.2), which YOLACT uses, as BoxCoder weights


@dataclass(frozen=True)
class YolactSettings:
    """Head, matching, loss and prediction settings of :class:`YOLACT` (the backbone's are separate).

    ``levels``: pyramid levels of the head (2..5 = strides 4..32); ``anchor_sizes``: one per level;
    ``aspect_ratios``: width:height = 1:r on (axis 0, axis 1); ``pos_iou`` / ``neg_iou``: anchor matching;
    ``class_loss``: ``"ohem"`` (softmax CE, ``negative_ratio`` hardest negatives per positive) or ``"focal"``
    (sigmoid focal loss, alpha 0.25, gamma 2); ``loss_weights``: class, box, mask, semantic.
    """

    prototypes: int = 32
    proto_channels: int = 64
    levels: tuple[int, ...] = (2, 3, 4, 5)
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    class_loss: str = "ohem"
    negative_ratio: float = 3.0
    max_mask_positives: int = 100
    semantic_loss: bool = True
    loss_weights: tuple[float, ...] = (1.0, 1.5, 1.0, 1.0)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_instances: int = 300
    pre_nms_top: int = 1000

    def __post_init__(self) -> None:
        for name in ("levels", "anchor_sizes", "aspect_ratios", "loss_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_choice(self.class_loss, CLASS_LOSSES, "yolact class_loss")
        if not self.levels or any(level not in (2, 3, 4, 5) for level in self.levels) or \
                list(self.levels) != sorted(set(self.levels)):
            raise MedsegError(f"yolact levels {list(self.levels)}: give increasing pyramid levels from 2..5, "
                              "e.g. [2, 3, 4, 5]")
        if len(self.anchor_sizes) != len(self.levels):
            raise MedsegError(f"yolact anchor_sizes {list(self.anchor_sizes)} must have one size per level "
                              f"{list(self.levels)}")
        if not 0 < self.neg_iou <= self.pos_iou <= 1:
            raise MedsegError(f"yolact needs 0 < neg_iou <= pos_iou <= 1, got {self.neg_iou} and {self.pos_iou}")
        if len(self.loss_weights) != 4:
            raise MedsegError(f"yolact loss_weights {list(self.loss_weights)}: give 4 (class, box, mask, semantic)")
        if min(self.prototypes, self.proto_channels, self.max_mask_positives, self.max_instances, self.pre_nms_top) < 1:
            raise MedsegError("yolact prototypes, proto_channels, max_mask_positives, max_instances and pre_nms_top "
                              "must be positive")


def box_mask(boxes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(N, *shape)`` bool: the voxels whose centre lies in the box ``[min, max)`` (boxes ``(N, 2 * dims)``)."""
    dims = len(shape)
    inside = torch.ones((boxes.shape[0],) + (1,) * dims, dtype=torch.bool, device=boxes.device)
    for axis, size in enumerate(shape):
        view = [1] * dims
        view[axis] = size
        centre = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5).view(1, *view)
        lo, hi = (boxes[:, i].view(-1, *([1] * dims)) for i in (axis, axis + dims))
        inside = inside & (centre >= lo) & (centre < hi)
    return inside.expand(boxes.shape[0], *shape)


def mask_logits(prototypes: torch.Tensor, coefficients: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``prototypes`` (k, *s) up-sampled to ``shape`` times ``coefficients`` (N, k): logits ``(N, *shape)``."""
    if tuple(prototypes.shape[1:]) != tuple(shape):
        prototypes = interpolate(prototypes[None], shape)[0]
    return (coefficients @ prototypes.flatten(1)).view(coefficients.shape[0], *shape)


def assemble_masks(prototypes: torch.Tensor, coefficients: torch.Tensor, boxes: torch.Tensor,
                   shape: Sequence[int]) -> torch.Tensor:
    """Object masks ``(N, *shape)``: ``sigmoid(prototypes @ coefficients)``, zero outside each box."""
    return torch.sigmoid(mask_logits(prototypes, coefficients, shape)) * box_mask(boxes, shape)


def hard_negatives(negative_loss: torch.Tensor, negative: torch.Tensor, num_positive: int,
                   ratio: float) -> torch.Tensor:
    """``(N,)`` bool: the ``ratio x max(num_positive, 1)`` negatives with the highest loss (online hard negative
    mining, Liu et al. 2016)."""
    k = min(int(round(ratio * max(num_positive, 1))), int(negative.sum()))
    ranked = negative_loss.detach().masked_fill(~negative, float("-inf"))
    keep = torch.zeros_like(negative)
    keep[ranked.topk(k).indices] = True
    return keep


def mask_positives(object_index: torch.Tensor, iou: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices of at most ``cap`` positives for the mask loss: each object's best anchor, then each one's
    second best, and so on (so that many objects are all represented)."""
    order = torch.argsort(-iou, stable=True)
    order = order[torch.argsort(object_index[order], stable=True)]  # grouped by object, best first
    grouped = object_index[order]
    rank = torch.arange(order.numel(), device=iou.device) - torch.searchsorted(grouped, grouped)
    return order[torch.argsort(rank, stable=True)][:cap]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (Lin et al. 2017) of ``logits`` (N, C) for classes 1..C-1 (channel 0 unused)
    against ``target`` (N,) in 0..C-1 (0 background), over the ``valid`` anchors."""
    onehot = F.one_hot(target, logits.shape[1])[:, 1:].to(logits.dtype)
    x = logits[:, 1:]
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none")
    pt = p * onehot + (1 - p) * (1 - onehot)
    weight = alpha * onehot + (1 - alpha) * (1 - onehot)
    return (weight * (1 - pt) ** gamma * ce)[valid].sum()


class Protonet(nn.Module):
    """P2 ``(B, C, *S/4)`` -> prototypes ``(B, k, *S/2)``: 3 conv3x3, x2 up-sampling, conv3x3, conv1x1, ReLU."""

    def __init__(self, dims: int, cin: int, width: int, k: int):
        super().__init__()
        self.pre = nn.Sequential(*[ConvNormAct(dims, cin if i == 0 else width, width, 3, norm="none")
                                   for i in range(3)])
        self.post = nn.Sequential(ConvNormAct(dims, width, width, 3, norm="none"),
                                  ConvNormAct(dims, width, k, 1, norm="none"))

    def forward(self, p2: torch.Tensor) -> torch.Tensor:
        x = self.pre(p2)
        return self.post(interpolate(x, [2 * s for s in x.shape[2:]]))


class PredictionHead(nn.Module):
    """Shared over levels: a conv3x3 + ReLU, then conv3x3 branches for class logits, box deltas and tanh mask
    coefficients. ``forward(levels)`` -> ``(B, N, classes)``, ``(B, N, 2 * dims)``, ``(B, N, k)``, anchors in
    MONAI's order (level, position, anchor shape)."""

    def __init__(self, dims: int, channels: int, anchors: int, classes: int, k: int):
        super().__init__()
        self.anchors = anchors
        self.shared = ConvNormAct(dims, channels, channels, 3, norm="none")
        self.cls, self.box, self.coef = (conv(dims, channels, anchors * c, 3) for c in (classes, 2 * dims, k))

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        b, ch = t.shape[:2]
        return t.reshape(b, self.anchors, ch // self.anchors, -1).permute(0, 3, 1, 2).reshape(b, -1, ch // self.anchors)

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs: tuple[list, list, list] = ([], [], [])
        for feat in levels:
            h = self.shared(feat)
            for out, branch in zip(outs, (self.cls, self.box, self.coef)):
                out.append(self._flat(branch(h)))
        cls, box, coef = (torch.cat(o, dim=1) for o in outs)
        return cls, box, torch.tanh(coef)


class YOLACT(InstanceModel):
    """Prototype masks + per-anchor coefficients (see the module docstring). Inputs of any size: they are padded to a
    multiple of 32 inside :meth:`training_losses` and :meth:`predict_instances`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 32,
                 blocks: Sequence[int] = (2, 2, 2, 2), fpn_channels: int = 128, norm: Optional[str] = "batch",
                 settings: YolactSettings = YolactSettings()):
        super().__init__(spatial_dims, in_channels, out_channels)
        if spatial_dims != 2 or out_channels < 2:
            raise MedsegError(f"yolact is 2D with out_channels >= 2 (background + classes), got spatial_dims="
                              f"{spatial_dims}, out_channels={out_channels}")
        self.settings = s = settings
        self.backbone = BackboneFPN(spatial_dims, in_channels, base_channels, blocks, fpn_channels, norm)
        self.protonet = Protonet(spatial_dims, fpn_channels, s.proto_channels, s.prototypes)
        self.anchor_generator = AnchorGenerator(tuple((a,) for a in s.anchor_sizes), (s.aspect_ratios,) * len(s.levels))
        self.head = PredictionHead(spatial_dims, fpn_channels, len(s.aspect_ratios), out_channels, s.prototypes)
        if s.class_loss == "focal":  # prior 0.01 for the object classes (RetinaNet)
            nn.init.constant_(self.head.cls.bias, -4.595)
        self.semantic = conv(spatial_dims, fpn_channels, out_channels - 1, 1) if s.semantic_loss else None
        self.unused_in_forward = ("semantic",) if s.semantic_loss else ()
        self.coder = BoxCoder(BOX_WEIGHTS)
        self.set_size_rule(32, "stride 32 (P5); inputs of other sizes are padded inside")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pads = [p for s, d in zip(reversed(x.shape[2:]), reversed(self.size_divisor)) for p in (0, (-s) % d)]
        return F.pad(x, pads) if any(pads) else x

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor]:
        """Pyramid levels, prototypes, class logits, box deltas, coefficients and the anchors (N, 4) float32."""
        feats = self.backbone(x)
        levels = [feats[level - 2] for level in self.settings.levels]
        cls, deltas, coefs = self.head(levels)
        anchors = self.anchor_generator(x, [f[:1, :1].float() for f in levels])[0]  # float32 under mixed precision
        return feats, self.protonet(feats[0]), cls, deltas, coefs, anchors

    def training_losses(self, x: torch.Tensor, instances: torch.Tensor,
                        classes: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Loss terms ``class``, ``box``, ``mask`` (+ ``semantic``) for ``x`` (B, C, H, W) and instance maps
        (B, 1, H, W); their sum is the loss. Class and box losses are normalised by the positives of the batch."""
        if instances.shape[0] != x.shape[0] or instances.shape[2:] != x.shape[2:] or instances.shape[1] != 1:
            raise MedsegError(f"yolact: instance maps must be (B, 1, *S) matching the images {tuple(x.shape)}, got "
                              f"{tuple(instances.shape)}")
        x = self._pad(x)
        self.check_input(x)
        instances = self._pad(instances)
        classes = None if classes is None else self._pad(classes)
        targets = [instance_targets(instances[b, 0], None if classes is None else classes[b, 0])
                   for b in range(x.shape[0])]
        top = max((int(t.labels.max()) for t in targets if t.labels.numel()), default=0)
        if top >= self.out_channels:
            raise MedsegError(f"yolact: class index {top} in the class map, but out_channels={self.out_channels} "
                              "(background + classes); build the model with more outputs")
        feats, protos, cls, deltas, coefs, anchors = self._run(x)
        totals = [cls.sum() * 0, deltas.sum() * 0, (coefs.sum() + protos.sum()) * 0]  # finite, connected zeros
        counts = [0, 0]  # positives, masks in the loss
        for b, t in enumerate(targets):
            terms, n_pos, n_masks = self._image_terms(t, anchors, cls[b], deltas[b], coefs[b], protos[b])
            totals = [a + v for a, v in zip(totals, terms)]
            counts = [counts[0] + n_pos, counts[1] + n_masks]
        w = self.settings.loss_weights
        losses = {"class": w[0] * totals[0] / max(counts[0], 1), "box": w[1] * totals[1] / max(counts[0], 1),
                  "mask": w[2] * totals[2] / max(counts[1], 1)}
        if self.semantic is not None:
            logits = self.semantic(feats[1])
            target = torch.stack([self._semantic_target(t, x.shape[2:]) for t in targets])
            target = F.interpolate(target, size=logits.shape[2:], mode="area")  # fraction of each P3 pixel covered
            losses["semantic"] = w[3] * F.binary_cross_entropy_with_logits(logits, target)
        return losses

    def _image_terms(self, t: InstanceTargets, anchors: torch.Tensor, cls: torch.Tensor, deltas: torch.Tensor,
                     coefs: torch.Tensor, protos: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
        """Summed class, box and mask losses of one image, its number of positives and of masks in the loss."""
        s = self.settings
        overlaps = box_iou(anchors, t.boxes)
        matches = match_by_iou(overlaps, s.pos_iou, s.neg_iou)  # object index, BACKGROUND or IGNORED
        pos, index = matches >= 0, matches.clamp_min(0)
        target = t.labels[index] * pos if t.labels.numel() else torch.zeros_like(index)
        terms = [self._class_loss(cls, target, matches)]
        if not bool(pos.any()):
            return terms + [deltas.sum() * 0, coefs.sum() * 0], 0, 0
        encoded = self.coder.encode_single(t.boxes[index[pos]], anchors[pos])
        terms.append(F.smooth_l1_loss(deltas[pos], encoded, reduction="sum"))
        iou = overlaps[pos, index[pos]]
        chosen = pos.nonzero()[:, 0][mask_positives(index[pos], iou, s.max_mask_positives)]
        terms.append(self._mask_loss(protos, coefs[chosen], t, index[chosen]))
        return terms, int(pos.sum()), int(chosen.numel())

    def _class_loss(self, logits: torch.Tensor, target: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
        """Focal loss over the non-ignored anchors, or CE of the positives and of the mined hard negatives."""
        if self.settings.class_loss == "focal":
            return focal_loss(logits, target, matches != IGNORED)
        pos = matches >= 0
        ce = F.cross_entropy(logits, target, reduction="none")
        hard = hard_negatives(ce, matches == BACKGROUND, int(pos.sum()), self.settings.negative_ratio)
        return ce[pos].sum() + ce[hard].sum()

    def _mask_loss(self, protos: torch.Tensor, coefs: torch.Tensor, t: InstanceTargets,
                   objects: torch.Tensor) -> torch.Tensor:
        """Sum over the chosen positives of the mean BCE inside their object's box (box-area normalisation)."""
        shape = t.masks.shape[1:]
        logits = mask_logits(protos, coefs, shape)
        inside = box_mask(t.boxes[objects], shape).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, t.masks[objects].to(logits.dtype), reduction="none")
        return ((bce * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1)).sum()

    def _semantic_target(self, t: InstanceTargets, shape: Sequence[int]) -> torch.Tensor:
        target = torch.zeros((self.out_channels - 1, *shape), device=t.masks.device)
        for c in range(1, self.out_channels):
            sel = t.labels == c
            if bool(sel.any()):
                target[c - 1] = t.masks[sel].any(dim=0).float()
        return target

    @torch.no_grad()
    def predict_instances(self, x: torch.Tensor) -> list[Instances]:
        """Objects per image of ``x`` (B, C, H, W): boxes decoded and clipped to the image, scores above
        ``score_threshold``, per-class NMS, at most ``max_instances``; masks ``(N, H, W)`` cropped to their box."""
        shape = tuple(x.shape[2:])
        padded = self._pad(x)
        self.check_input(padded)
        _, protos, cls, deltas, coefs, anchors = self._run(padded)
        protos, cls, deltas, coefs = protos.float(), cls.float(), deltas.float(), coefs.float()  # boxes need float32
        if self.settings.class_loss == "focal":
            scores = torch.sigmoid(cls[..., 1:])
        else:
            scores = torch.softmax(cls, dim=-1)[..., 1:]
        return [self._detect(scores[b], deltas[b], coefs[b], anchors, protos[b], shape, padded.shape[2:])
                for b in range(x.shape[0])]

    def _detect(self, scores: torch.Tensor, deltas: torch.Tensor, coefs: torch.Tensor, anchors: torch.Tensor,
                protos: torch.Tensor, shape: tuple[int, ...], padded: Sequence[int]) -> Instances:
        s = self.settings
        anchor, label = (scores > s.score_threshold).nonzero(as_tuple=True)
        score = scores[anchor, label]
        if score.numel() > s.pre_nms_top:
            top = score.topk(s.pre_nms_top).indices
            anchor, label, score = anchor[top], label[top], score[top]
        if score.numel() == 0:
            return Instances.empty(shape, scores.device)
        boxes = self.coder.decode_single(deltas[anchor], anchors[anchor])
        boxes = clip_boxes(boxes, shape)
        keep = remove_small_boxes(boxes, 1.0)
        boxes = boxes[keep]
        anchor, label, score = anchor[keep], label[keep], score[keep]
        if score.numel() == 0:
            return Instances.empty(shape, scores.device)
        keep = batched_nms(boxes, score, label, s.nms_threshold, s.max_instances)
        boxes, anchor, label, score = boxes[keep], anchor[keep], label[keep], score[keep]
        masks = assemble_masks(protos, coefs[anchor], boxes, padded)[(slice(None), *(slice(0, n) for n in shape))]
        return Instances(masks.float(), score, label + 1, boxes)


@register("yolact", spatial_dims=(2,), paper="Bolya et al. 2019, YOLACT: real-time instance segmentation (ICCV)",
          task="instances", test_kwargs={"base_channels": 4, "blocks": (1, 1, 1, 1), "fpn_channels": 8,
                                         "prototypes": 4, "proto_channels": 8})
def yolact(spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 32,
           blocks: Sequence[int] = (2, 2, 2, 2), fpn_channels: int = 128, norm: Optional[str] = "batch",
           **settings) -> YOLACT:
    """YOLACT-style model; ``settings`` are the fields of :class:`YolactSettings` (unknown names raise TypeError)."""
    return YOLACT(spatial_dims, in_channels, out_channels, base_channels, blocks, fpn_channels, norm,
                  YolactSettings(**settings))
