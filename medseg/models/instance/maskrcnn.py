"""Mask R-CNN (He et al. 2017): a ResNet-FPN backbone, a region proposal network (Ren et al. 2015) over the pyramid
levels, and per-region heads for class, box refinement and a 28 x 28 mask, all trained jointly from instance maps.

Differences from the paper, for small objects (nuclei of 5-40 pixels) and a CPU budget; every one is a setting
(:class:`MaskRCNNSettings`, passed as keyword arguments):

* backbone: the package's basic-block ResNet (``base_channels`` 32, ``blocks`` (2, 2, 2, 2)) with a 128-channel FPN,
  trained from scratch, instead of an ImageNet ResNet-50/101 with 256 channels;
* anchors of 8, 16, 32, 64 pixels on P2-P5 (paper: 32-512 on P2-P6); five ``anchor_sizes`` add P6 for the RPN;
* RoIs go to level ``floor(4 + log2(sqrt(area) / 56))`` (paper: 224), so 14-28 pixel objects read P2-P3;
* proposals per level before NMS 1000 / 500 (train / inference; paper 2000 / 1000), after NMS 1000 / 300;
  sampled RoIs per image 256 (paper 512); box head width 256 (paper 1024); mask head 64 channels (paper 256, 4x the
  time of the largest part of a CPU training step);
* anchors crossing the image border are kept for training (as in Detectron2; the paper ignores them);
* the box losses are smooth L1 with beta 1/9 on deltas coded with weights (1, 1, 1, 1) (RPN) and (10, 10, 5, 5) (heads).

Any image size works at prediction (the input is padded to a multiple of 32 and the results cropped back); training
pads the same way. Only 2D is registered; the code is written for any dimension.

Example:
    >>> from medseg.models import create_model
    >>> net = create_model("maskrcnn", spatial_dims=2, in_channels=3, out_channels=2, base_channels=4,
    ...                    blocks=(1, 1, 1, 1), fpn_channels=8, box_width=16, mask_channels=8)
    >>> inst = torch.zeros(1, 1, 64, 64, dtype=torch.long); inst[0, 0, 10:20, 30:44] = 1
    >>> sorted(net.training_losses(torch.rand(1, 3, 64, 64), inst))
    ['box_class', 'box_reg', 'mask', 'rpn_box', 'rpn_objectness']
    >>> preds = net.predict_instances(torch.rand(1, 3, 50, 61))   # any size: masks (N, 50, 61)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from monai.apps.detection.utils.box_coder import BoxCoder

from medseg.errors import MedsegError
from medseg.models.blocks import conv, conv_transpose
from medseg.models.instance.base import InstanceModel, Instances, InstanceTargets, instance_targets
from medseg.models.instance.detection import (batched_nms, box_iou, clip_boxes, match_by_iou, remove_small_boxes,
                                              sample_balanced)
from medseg.models.instance.fpn import BackboneFPN
from medseg.models.instance.roi import multilevel_roi_align, paste_masks, roi_align_per_box
from medseg.models.registry import register

SIZE_DIVISOR = 32
SMOOTH_L1_BETA = 1.0 / 9.0
BOX_POOL, MASK_POOL = 7, 14  # RoIAlign output sizes of the box and mask heads (the mask head doubles its size)


@dataclass(frozen=True)
class MaskRCNNSettings:
    """The settings of :class:`MaskRCNN` (the keyword arguments of ``create_model("maskrcnn", ...)``).

    Backbone: ``base_channels``, ``blocks``, ``fpn_channels``, ``norm`` (see
    :class:`~medseg.models.instance.fpn.BackboneFPN`).
    RPN: one anchor size per level (``anchor_sizes``, 4 for P2-P5 or 5 for P2-P6) times ``aspect_ratios``; anchors
    with IoU ``>= rpn_iou[1]`` are positive, ``< rpn_iou[0]`` negative; ``rpn_batch`` anchors sampled per image with at
    most ``rpn_positive_fraction`` positive; proposals: ``rpn_pre_nms_topk`` per level, NMS at ``rpn_nms``,
    ``rpn_post_nms_topk`` per image (pairs: training, inference); boxes under ``min_box_size`` voxels are dropped.
    Heads: ``roi_batch`` RoIs per image, at most ``roi_positive_fraction`` of them objects (IoU ``>= roi_iou``);
    ``box_width`` fully connected units; ``mask_convs`` convolutions of ``mask_channels``; RoIs of size
    ``canonical_size`` read level ``canonical_level``. Inference: detections above ``score_threshold``, per-class NMS
    at ``nms_threshold``, at most ``max_instances`` per image.
    """

    base_channels: int = 32
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    fpn_channels: int = 128
    norm: str = "batch"
    anchor_sizes: tuple[float, ...] = (8, 16, 32, 64)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_iou: tuple[float, float] = (0.3, 0.7)
    rpn_batch: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk: tuple[int, int] = (1000, 500)
    rpn_post_nms_topk: tuple[int, int] = (1000, 300)
    rpn_nms: float = 0.7
    min_box_size: float = 1.0
    roi_batch: int = 256
    roi_positive_fraction: float = 0.25
    roi_iou: float = 0.5
    box_width: int = 256
    mask_channels: int = 64
    mask_convs: int = 4
    canonical_size: float = 56.0
    canonical_level: int = 4
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_instances: int = 300

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lists from a config file become tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if len(self.anchor_sizes) not in (4, 5):
            raise MedsegError(f"maskrcnn: anchor_sizes {list(self.anchor_sizes)} needs one size per RPN level: 4 (P2-P5) "
                              "or 5 (P2-P6), e.g. (8, 16, 32, 64)")
        for name in ("rpn_iou", "rpn_pre_nms_topk", "rpn_post_nms_topk"):
            if len(getattr(self, name)) != 2:
                raise MedsegError(f"maskrcnn: {name} must be a pair (training, inference) or (low, high), "
                                  f"got {getattr(self, name)!r}")


class RPN(nn.Module):
    """Shared 3x3 conv, objectness and box-delta 1x1 convs over every level. ``forward(feats)`` -> objectness logits
    (B, A) and deltas (B, A, 2 * dims) over all anchors, ordered level, position, anchor shape (as :meth:`anchors`)."""

    def __init__(self, dims: int, channels: int, sizes: Sequence[float], ratios: Sequence[float]):
        super().__init__()
        self.dims = dims
        self.generator = AnchorGenerator(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
        a = self.generator.num_anchors_per_location()[0]
        self.conv = conv(dims, channels, channels, 3)
        self.objectness = conv(dims, channels, a, 1)
        self.deltas = conv(dims, channels, a * 2 * dims, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = [], []
        for f in feats:
            h = F.relu(self.conv(f))
            b, a = h.shape[0], self.objectness.out_channels
            move = (0, *range(2, 2 + self.dims), 1)  # channels last: position-major, anchor shape minor
            logits.append(self.objectness(h).permute(move).reshape(b, -1))
            d = self.deltas(h).view(b, a, 2 * self.dims, *h.shape[2:])
            deltas.append(d.permute(0, *range(3, 3 + self.dims), 1, 2).reshape(b, -1, 2 * self.dims))
        return torch.cat(logits, 1), torch.cat(deltas, 1)

    def anchors(self, image: torch.Tensor, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Anchors (A, 2 * dims) of one image of ``image``'s size, and their number per level."""
        self.generator.set_cell_anchors(feats[0].dtype, feats[0].device)
        strides = [[torch.tensor(image.shape[2 + a] // f.shape[2 + a]) for a in range(self.dims)] for f in feats]
        per_level = self.generator.grid_anchors([list(f.shape[2:]) for f in feats], strides)
        return torch.cat(per_level), [len(p) for p in per_level]


class BoxHead(nn.Module):
    """Two fully connected layers on the RoI features, then class logits (N, K) and class-specific deltas
    (N, K * 2 * dims)."""

    def __init__(self, in_features: int, width: int, classes: int, dims: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(inplace=True),
                                nn.Linear(width, width), nn.ReLU(inplace=True))
        self.cls = nn.Linear(width, classes)
        self.reg = nn.Linear(width, classes * 2 * dims)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        return self.cls(h), self.reg(h)


class MaskHead(nn.Sequential):
    """``convs`` 3x3 conv-ReLU, a 2x transposed conv-ReLU and a 1x1 conv: (N, C, 14, 14) -> mask logits (N, K, 28, 28)."""

    def __init__(self, dims: int, cin: int, channels: int, convs: int, classes: int):
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [conv(dims, cin if i == 0 else channels, channels, 3), nn.ReLU(inplace=True)]
        layers += [conv_transpose(dims, channels if convs else cin, channels, 2, 2), nn.ReLU(inplace=True),
                   conv(dims, channels, classes, 1)]
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self[-1].weight, std=0.001)  # the mask predictor starts near 0.5 everywhere


def mask_targets(masks: torch.Tensor, matched: torch.Tensor, rois: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Binary mask targets (n, *size): object ``matched[i]`` of ``masks`` (G, *S) resampled into box ``rois[i]``
    (RoIAlign of the mask as a float image, thresholded at 0.5)."""
    return roi_align_per_box(masks[matched].float()[:, None], rois, size)[:, 0].ge(0.5).float()


def _smooth_l1_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA, reduction="sum")


class MaskRCNN(InstanceModel):
    """Mask R-CNN; see the module docstring. ``out_channels`` = classes including background."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, settings: MaskRCNNSettings):
        super().__init__(spatial_dims, in_channels, out_channels)
        if out_channels < 2:
            raise MedsegError(f"maskrcnn: out_channels counts the background too, so it must be >= 2, got {out_channels}")
        s, d = settings, spatial_dims
        self.settings = s
        self.backbone = BackboneFPN(d, in_channels, s.base_channels, s.blocks, s.fpn_channels, s.norm,
                                    extra_pool=len(s.anchor_sizes) == 5)
        self.rpn = RPN(d, s.fpn_channels, s.anchor_sizes, s.aspect_ratios)
        self.box_head = BoxHead(s.fpn_channels * BOX_POOL ** d, s.box_width, out_channels, d)
        self.mask_head = MaskHead(d, s.fpn_channels, s.mask_channels, s.mask_convs, out_channels)
        self.rpn_coder = BoxCoder((1.0,) * (2 * d))
        self.roi_coder = BoxCoder((10.0,) * d + (5.0,) * d)
        self.set_size_rule(SIZE_DIVISOR, "FPN levels down to stride 32")

    # ---------------------------------------------------------------- shared steps
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded at the end of every axis to a multiple of 32 (zeros), after checking its layout."""
        if x.ndim != self.spatial_dims + 2:
            self.check_input(x)
        pad: list[int] = []
        for s in reversed(x.shape[2:]):
            pad += [0, (-s) % SIZE_DIVISOR]
        x = F.pad(x, pad) if any(pad) else x
        self.check_input(x)
        return x

    def _roi_features(self, feats: list[torch.Tensor], boxes: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        s = self.settings
        return multilevel_roi_align(feats[:4], self.backbone.strides[:4], boxes, size, s.canonical_size,
                                    s.canonical_level)

    def _proposals(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, counts: list[int],
                   shape: Sequence[int], phase: int) -> torch.Tensor:
        """Proposal boxes of one image (no gradient): top-k per level, decoded, clipped, small ones removed, NMS per
        level, the best ``post_nms_topk`` over all levels; ``phase`` 0 training, 1 inference."""
        pre, post = self.settings.rpn_pre_nms_topk[phase], self.settings.rpn_post_nms_topk[phase]
        picks, levels = [], []
        start = 0
        for lvl, n in enumerate(counts):
            top = torch.topk(logits[start:start + n], min(pre, n)).indices + start
            picks.append(top)
            levels.append(torch.full_like(top, lvl))
            start += n
        idx, levels = torch.cat(picks), torch.cat(levels)
        boxes = clip_boxes(self.rpn_coder.decode_single(deltas[idx].float(), anchors[idx]), shape)
        keep = remove_small_boxes(boxes, self.settings.min_box_size)
        boxes, scores, levels = boxes[keep], logits[idx][keep], levels[keep]
        return boxes[batched_nms(boxes, scores, levels, self.settings.rpn_nms, post)]

    def _rpn(self, x: torch.Tensor, feats: list[torch.Tensor], shape: Sequence[int],
             phase: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """RPN outputs over all anchors, the anchors, and the proposals of every image."""
        logits, deltas = self.rpn(feats)
        anchors, counts = self.rpn.anchors(x, feats)
        with torch.no_grad():
            props = [self._proposals(logits[b].detach(), deltas[b].detach(), anchors, counts, shape, phase)
                     for b in range(x.shape[0])]
        return logits, deltas, anchors, props

    # ---------------------------------------------------------------- training
    def training_losses(self, x: torch.Tensor, instances: torch.Tensor,
                        classes: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        expected = (x.shape[0], 1, *x.shape[2:])
        for name, t in (("instance maps", instances), ("class maps", classes)):
            if t is not None and tuple(t.shape) != expected:
                raise MedsegError(f"maskrcnn: {name} must be (B, 1, *S) = {expected} to match the images "
                                  f"{tuple(x.shape)}, got {tuple(t.shape)}")
        xp = self._pad(x)
        pad = [p for s, t in zip(reversed(x.shape[2:]), reversed(xp.shape[2:])) for p in (0, t - s)]
        targets = [instance_targets(F.pad(instances[b, 0], pad), None if classes is None else F.pad(classes[b, 0], pad))
                   for b in range(x.shape[0])]
        bad = [int(v) for t in targets for v in t.labels if not 1 <= v < self.out_channels]
        if bad:
            raise MedsegError(f"maskrcnn: objects of class {sorted(set(bad))} in the class map, but the model has "
                              f"classes 1..{self.out_channels - 1} (out_channels={self.out_channels} counts the "
                              "background); every object needs a foreground class under its mask")
        feats = self.backbone(xp)
        logits, deltas, anchors, props = self._rpn(xp, feats, xp.shape[2:], 0)
        losses = self._rpn_losses(logits, deltas, anchors, targets)
        losses.update(self._head_losses(feats, props, targets))
        return losses

    def _rpn_losses(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
                    targets: list[InstanceTargets]) -> dict[str, torch.Tensor]:
        s = self.settings
        obj, reg, sampled = logits.new_zeros(()), deltas.new_zeros(()), 0
        for b, t in enumerate(targets):
            matches = match_by_iou(box_iou(anchors, t.boxes), high=s.rpn_iou[1], low=s.rpn_iou[0])
            pos, neg = sample_balanced(matches, s.rpn_batch, s.rpn_positive_fraction)
            idx = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
            obj = obj + F.binary_cross_entropy_with_logits(logits[b, idx], labels, reduction="sum")
            if pos.numel():
                target = self.rpn_coder.encode_single(t.boxes[matches[pos]], anchors[pos])
                reg = reg + _smooth_l1_sum(deltas[b, pos], target)
            sampled += idx.numel()
        n = max(sampled, 1)
        return {"rpn_objectness": obj / n, "rpn_box": reg / n + 0 * deltas.sum()}

    def _sample_rois(self, props: list[torch.Tensor], targets: list[InstanceTargets]) -> tuple[list[torch.Tensor], ...]:
        """Per image: sampled RoIs (proposals and ground-truth boxes), their class (0 background) and matched object."""
        s = self.settings
        rois, labels, matched = [], [], []
        for p, t in zip(props, targets):
            cand = torch.cat([p, t.boxes])
            m = match_by_iou(box_iou(cand, t.boxes), high=s.roi_iou, low=s.roi_iou, allow_low_quality=False)
            pos, neg = sample_balanced(m, s.roi_batch, s.roi_positive_fraction)
            idx = torch.cat([pos, neg])
            rois.append(cand[idx])
            matched.append(m[pos])
            labels.append(torch.cat([t.labels[m[pos]], torch.zeros_like(neg)]))
        return rois, labels, matched

    def _head_losses(self, feats: list[torch.Tensor], props: list[torch.Tensor],
                     targets: list[InstanceTargets]) -> dict[str, torch.Tensor]:
        d, k = self.spatial_dims, self.out_channels
        rois, labels, matched = self._sample_rois(props, targets)
        cls_logits, box_deltas = self.box_head(self._roi_features(feats, rois, BOX_POOL))
        all_labels = torch.cat(labels)
        n = max(all_labels.numel(), 1)
        box_class = F.cross_entropy(cls_logits, all_labels, reduction="sum") / n
        fg = torch.nonzero(all_labels > 0).view(-1)
        pos_rois = [r[:len(m)] for r, m in zip(rois, matched)]  # positives come first in every image
        box_reg = 0 * box_deltas.sum()
        if fg.numel():
            gt = torch.cat([t.boxes[m] for t, m in zip(targets, matched)])
            target = self.roi_coder.encode_single(gt, torch.cat(pos_rois))
            pred = box_deltas[fg].view(-1, k, 2 * d)[torch.arange(fg.numel(), device=fg.device), all_labels[fg]]
            box_reg = box_reg + _smooth_l1_sum(pred, target) / n
        mask_logits = self.mask_head(self._roi_features(feats, pos_rois, MASK_POOL))
        mask = 0 * mask_logits.sum()
        if fg.numel():
            goal = torch.cat([mask_targets(t.masks, m, r, mask_logits.shape[2:])
                              for t, m, r in zip(targets, matched, pos_rois)])[:, None]
            pred = mask_logits[torch.arange(fg.numel(), device=fg.device), all_labels[fg]][:, None]
            mask = mask + F.binary_cross_entropy_with_logits(pred, goal)
        return {"box_class": box_class, "box_reg": box_reg, "mask": mask}

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_instances(self, x: torch.Tensor) -> list[Instances]:
        shape = tuple(x.shape[2:])
        xp = self._pad(x)
        feats = self.backbone(xp)
        _, _, _, props = self._rpn(xp, feats, shape, 1)
        cls_logits, box_deltas = self.box_head(self._roi_features(feats, props, BOX_POOL))
        out = []
        for p, logit, delta in zip(props, cls_logits.split([len(p) for p in props]),
                                   box_deltas.split([len(p) for p in props])):
            out.append(self._detect(feats, len(out), p, logit, delta, shape))
        return out

    def _detect(self, feats: list[torch.Tensor], b: int, props: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
                shape: Sequence[int]) -> Instances:
        """Per-class decoding, score threshold, per-class NMS and masks for image ``b``."""
        s, d, k = self.settings, self.spatial_dims, self.out_channels
        if props.shape[0] == 0:
            return Instances.empty(shape, props.device)
        scores = F.softmax(logits, dim=1)[:, 1:].reshape(-1)
        boxes = self.roi_coder.decode_single(deltas, props).view(-1, k, 2 * d)[:, 1:].reshape(-1, 2 * d)
        labels = torch.arange(1, k, device=props.device).repeat(props.shape[0])
        boxes = clip_boxes(boxes, shape)
        keep = torch.nonzero(scores > s.score_threshold).view(-1)
        keep = keep[remove_small_boxes(boxes[keep], s.min_box_size)]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, s.nms_threshold, s.max_instances)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if boxes.shape[0] == 0:
            return Instances.empty(shape, props.device)
        single = [f[b:b + 1] for f in feats]
        mask_logits = self.mask_head(self._roi_features(single, [boxes], MASK_POOL))
        probs = torch.sigmoid(mask_logits[torch.arange(len(labels), device=labels.device), labels])
        return Instances(paste_masks(probs, boxes, shape), scores, labels, boxes)


@register("maskrcnn", spatial_dims=(2,), paper="He et al. 2017, Mask R-CNN (ICCV)", task="instances",
          test_kwargs=dict(base_channels=4, blocks=(1, 1, 1, 1), fpn_channels=8, box_width=16, mask_channels=8,
                           mask_convs=1, rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50), roi_batch=64,
                           max_instances=20))
def maskrcnn(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> MaskRCNN:
    """Mask R-CNN; keyword arguments are the fields of :class:`MaskRCNNSettings`."""
    names = {f.name for f in dataclasses.fields(MaskRCNNSettings)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"maskrcnn: unknown argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return MaskRCNN(spatial_dims, in_channels, out_channels, MaskRCNNSettings(**kwargs))
