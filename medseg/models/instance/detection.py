"""Box utilities shared by the detectors: matching anchors or proposals to ground truth by IoU, balanced sampling,
clipping, removing small boxes, and (per-group) non-maximum suppression.

Boxes are ``(min_0, ..., max_0, ...)`` in array-axis order, the maximum exclusive (MONAI's standard mode, see
:mod:`medseg.models.instance.base`); every function takes and returns tensors and works in 2D and 3D.

Example:
    >>> boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    >>> nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    [0, 2]
    >>> match_by_iou(box_iou(boxes, boxes[:1]), high=0.7, low=0.3).tolist()
    [0, 0, -1]
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from monai.data.box_utils import box_iou as _monai_box_iou

BACKGROUND, IGNORED = -1, -2


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU matrix (N, M) of boxes (N, 2 * dims) and (M, 2 * dims) (MONAI's ``box_iou``; empty inputs allowed)."""
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    return _monai_box_iou(boxes1, boxes2)


def match_by_iou(iou: torch.Tensor, high: float, low: float, allow_low_quality: bool = True) -> torch.Tensor:
    """Ground truth matched to each candidate from the IoU matrix ``iou`` (candidates N, ground truths G) -> (N,) long.

    A candidate gets the index of its best ground truth if that IoU is ``>= high``, :data:`BACKGROUND` (-1) if it is
    ``< low`` and :data:`IGNORED` (-2) in between. ``allow_low_quality`` (Faster R-CNN's RPN rule) also matches each
    ground truth to the candidates of its highest IoU (ties included), so every object has a positive. With no
    ground truth every candidate is background.
    """
    n, g = iou.shape
    if g == 0:
        return torch.full((n,), BACKGROUND, dtype=torch.long, device=iou.device)
    best, idx = iou.max(dim=1)
    matches = idx.clone()
    matches[best < high] = IGNORED
    matches[best < low] = BACKGROUND
    if allow_low_quality and n > 0:
        per_gt = iou.max(dim=0).values
        cand = torch.nonzero(((iou == per_gt[None]) & (per_gt[None] > 0)).any(dim=1)).view(-1)
        matches[cand] = idx[cand]  # the candidate's best ground truth, as Detectron does for ties
    return matches


def sample_balanced(matches: torch.Tensor, num: int, positive_fraction: float,
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of positives (``matches >= 0``) and negatives (``matches == -1``) drawn at random: at most
    ``num * positive_fraction`` positives, negatives filling up to ``num`` in all. Ignored candidates (-2) are
    never drawn. Random draws use ``generator`` (the global generator when None)."""
    pos = torch.nonzero(matches >= 0).view(-1)
    neg = torch.nonzero(matches == BACKGROUND).view(-1)
    n_pos = min(pos.numel(), int(num * positive_fraction))
    n_neg = min(neg.numel(), num - n_pos)
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos].to(pos.device)]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg].to(neg.device)]
    return pos, neg


def clip_boxes(boxes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boxes (N, 2 * dims) clamped to the image ``[0, shape[a]]`` on every axis ``a`` (a new tensor)."""
    hi = torch.tensor(list(shape) * 2, dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp_min(0), hi)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of the boxes (N, 2 * dims) whose extent is at least ``min_size`` (and positive) on every axis."""
    dims = boxes.shape[1] // 2
    extent = boxes[:, dims:] - boxes[:, :dims]
    return torch.nonzero(((extent >= min_size) & (extent > 0)).all(dim=1)).view(-1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, max_keep: int = -1) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes in order of decreasing score. A box is dropped when
    its IoU with a kept, higher-scoring box is above ``threshold``; at most ``max_keep`` are kept (-1: all).

    The same result as MONAI's ``non_max_suppression`` (checked in the tests), but the IoU matrix is computed once
    and the greedy pass runs on it in NumPy, which is ~20x faster for the thousands of proposals of an RPN.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    over = (box_iou(boxes[order].float(), boxes[order].float()) > threshold).cpu().numpy()
    removed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) == max_keep:
            break
        removed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                max_keep: int = -1) -> torch.Tensor:
    """:func:`nms` within each group (class, pyramid level, image) separately: indices of the kept boxes over all
    groups in order of decreasing score, at most ``max_keep`` (-1: all)."""
    kept = [idx[nms(boxes[idx], scores[idx], threshold, max_keep)]
            for idx in (torch.nonzero(groups == g).view(-1) for g in torch.unique(groups))]
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = torch.cat(kept)
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    return keep if max_keep < 0 else keep[:max_keep]
