"""COCO-style average precision of scored instance predictions over a set of images (one class), 2D and 3D.

- :func:`average_precision`: AP at each IoU threshold (default COCO's 0.50, 0.55, ..., 0.95), their mean (mAP),
  AP50 and AP75, following ``pycocotools`` ``COCOeval`` (iouType ``"segm"``); the rules are in its docstring.

Inputs are instance maps, as in :mod:`medseg.evaluation.objects` (an integer array ``(*spatial)``, 0 background,
each other value one object), whose overlap table and input checks are used here, with the greedy score-ordered
matching of :mod:`medseg.evaluation.matching`.
With no reference object in any image, AP is NaN.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.matching import _greedy, _score_array
from medseg.evaluation.objects import _overlap, _pair

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the floats pycocotools uses
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _ap_curve(hits: np.ndarray, n_ref: int) -> float:
    """COCO AP of detections sorted by score: ``hits`` (D,) True = matched. Interpolated precision (max to the
    right) at the 101 recall points; 0 past the largest recall."""
    tps = np.cumsum(hits)
    recall = tps / n_ref
    precision = tps / np.arange(1, hits.size + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
    sampled = np.zeros(COCO_RECALL_POINTS.size)
    ok = at < hits.size
    sampled[ok] = envelope[at[ok]]
    return float(sampled.mean())


def average_precision(images: Sequence[tuple[np.ndarray, np.ndarray, Mapping[int, float] | None]],
                      iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS) -> dict[str, Any]:
    """COCO-style average precision of scored instance predictions over a set of images (one class).

    Rules (``pycocotools`` ``COCOeval``, iouType ``"segm"``, one category): per image and threshold, predictions
    by descending score (stable: ties by id) each take the unmatched reference object of highest IoU >= threshold.
    All predictions of all images are then sorted by score (stable: image order), cumulative TP/FP give precision
    and recall; precision is made non-increasing from the right, sampled at recall 0, 0.01, ..., 1 (0 beyond the
    largest recall) and averaged. Unlike COCO, there are no area ranges, no crowd regions and no limit on the
    number of predictions per image. With no reference object in any image, AP is NaN.

    Args:
        images: ``(reference, prediction, scores)`` per image: two instance maps of one shape (shapes may differ
            between images) and a confidence per predicted object id, or ``None`` for all 1.0.
        iou_thresholds: IoU thresholds; default COCO's 0.50, 0.55, ..., 0.95.

    Returns:
        ``map`` (mean over the thresholds), ``ap50`` and ``ap75`` (NaN when not among the thresholds),
        ``ap_by_threshold`` ({threshold: AP}), ``n_reference`` and ``n_prediction`` (objects in all images).

    Example:
        >>> ref = np.array([[1, 1, 0, 2, 2]])
        >>> ap = average_precision([(ref, np.array([[1, 1, 0, 0, 3]]), {1: 0.9, 3: 0.5})])  # IoU 1 and 0.5
        >>> ap["ap50"], round(ap["ap75"], 4)
        (1.0, 0.505)
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).ravel()
    if thresholds.size == 0 or not np.all((thresholds >= 0) & (thresholds <= 1)):
        raise MedsegError(f"iou_thresholds {thresholds.tolist()} must be one or more values in [0, 1]")
    all_scores, all_hits, n_ref = [], [], 0
    for k, item in enumerate(images):
        if len(item) != 3:
            raise MedsegError(f"images[{k}] must be (reference, prediction, scores or None), got {len(item)} items")
        t = _overlap(*_pair(item[0], item[1], f"images[{k}] "))
        score = _score_array(t.pred_ids, item[2], f"images[{k}] scores")
        hits = np.zeros((thresholds.size, t.pred_ids.size), dtype=bool)
        for j, thr in enumerate(thresholds):
            cand = np.flatnonzero(t.iou >= min(thr, 1 - 1e-10))
            chosen = _greedy(t.ref_index[cand], t.pred_index[cand], t.iou[cand], score, t.ref_ids.size)
            hits[j, t.pred_index[cand[chosen]]] = True
        order = np.argsort(-score, kind="stable")
        all_scores.append(score[order])
        all_hits.append(hits[:, order])
        n_ref += t.ref_ids.size
    score = np.concatenate(all_scores) if all_scores else np.zeros(0)
    hits = np.concatenate(all_hits, axis=1) if all_hits else np.zeros((thresholds.size, 0), bool)
    hits = hits[:, np.argsort(-score, kind="stable")]
    ap = np.array([_ap_curve(h, n_ref) if n_ref else np.nan for h in hits])
    at = {x: float(ap[np.isclose(thresholds, x)][0]) if np.isclose(thresholds, x).any() else float("nan") for x in (0.5, 0.75)}
    return {"map": float(ap.mean()), "ap50": at[0.5], "ap75": at[0.75],
            "ap_by_threshold": {round(float(x), 6): float(a) for x, a in zip(thresholds, ap)},
            "n_reference": int(n_ref), "n_prediction": int(score.size)}
