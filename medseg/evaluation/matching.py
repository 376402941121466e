"""One-to-one matching of reference objects to predicted objects, 2D and 3D, and the scores read off a matching.

Inputs are instance maps, as in :mod:`medseg.evaluation.objects` (an integer array ``(*spatial)``, 0 background,
each other value one object), whose overlap table, input checks and one-to-one assignment are used here.

- :func:`match_objects` (:func:`match_overlap` on an :func:`~medseg.evaluation.objects.overlap_table`): one-to-one
  matching at an IoU threshold -> :class:`Matching`; optimal assignment without scores, COCO's greedy
  score-ordered rule with them (also used by :mod:`medseg.evaluation.precision`).
- :func:`detection_scores` (precision, recall, F1) and :func:`panoptic_quality` (PQ, SQ, RQ) of a :class:`Matching`.

Empty rules, as the ``"brats"`` rule of :mod:`medseg.evaluation.metrics`: no object on either side gives precision,
recall, F1, PQ, SQ and RQ 1; objects on one side only give 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.objects import ObjectOverlap, _assign, overlap_table


@dataclass(frozen=True, eq=False)
class Matching:
    """A one-to-one matching of reference objects to predicted objects.

    Attributes:
        ref_ids, pred_ids, iou: ``(TP,)`` the matched pairs (object ids) and their IoU, sorted by reference id.
        unmatched_ref: ids of reference objects without a match (false negatives), ascending.
        unmatched_pred: ids of predicted objects without a match (false positives), ascending.
        iou_threshold: every pair has IoU >= this.
    """

    ref_ids: np.ndarray
    pred_ids: np.ndarray
    iou: np.ndarray
    unmatched_ref: np.ndarray
    unmatched_pred: np.ndarray
    iou_threshold: float

    @property
    def tp(self) -> int:
        """Matched pairs (true positives)."""
        return int(self.ref_ids.size)

    @property
    def fp(self) -> int:
        """Unmatched predicted objects (false positives)."""
        return int(self.unmatched_pred.size)

    @property
    def fn(self) -> int:
        """Unmatched reference objects (false negatives)."""
        return int(self.unmatched_ref.size)


def _greedy(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, score: np.ndarray, n_rows: int) -> np.ndarray:
    """COCO matching: predictions by descending score (stable) each take the unmatched reference of highest IoU
    (ties: the later reference, as pycocotools). Pairs are sorted by row; returns positions of the chosen pairs."""
    by_col = np.argsort(cols, kind="stable")
    starts = np.searchsorted(cols[by_col], np.arange(score.size + 1))
    taken = np.zeros(n_rows, dtype=bool)
    chosen = []
    for c in np.argsort(-score, kind="stable"):
        cand = by_col[starts[c]:starts[c + 1]]
        cand = cand[~taken[rows[cand]]]
        if cand.size:
            best = cand[np.flatnonzero(iou[cand] == iou[cand].max())[-1]]
            taken[rows[best]] = True
            chosen.append(best)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _score_array(pred_ids: np.ndarray, scores: Mapping[int, float] | None, name: str) -> np.ndarray:
    if scores is None:
        return np.ones(pred_ids.size)
    missing = [int(i) for i in pred_ids if int(i) not in scores]
    extra = sorted(set(int(k) for k in scores) - set(pred_ids.tolist()))
    if missing or extra:
        what = (f"no score for predicted objects {missing[:5]}" if missing
                else f"scores for ids {extra[:5]} absent from the prediction")
        raise MedsegError(f"{name}: {what}; give one score per non-zero object id of the prediction map")
    values = np.array([float(scores[int(i)]) for i in pred_ids])
    if not np.all(np.isfinite(values)):
        raise MedsegError(f"{name}: scores must be finite numbers")
    return values


def match_overlap(table: ObjectOverlap, iou_threshold: float = 0.5,
                  scores: Mapping[int, float] | None = None) -> Matching:
    """One-to-one matching of the objects of an :func:`overlap_table`; see :func:`match_objects`."""
    if not 0.0 <= iou_threshold <= 1.0:
        raise MedsegError(f"iou_threshold={iou_threshold} must lie in [0, 1]")
    cand = np.flatnonzero(table.iou >= iou_threshold)
    rows, cols, iou = table.ref_index[cand], table.pred_index[cand], table.iou[cand]
    if scores is None:
        chosen = _assign(rows, cols, iou, most_pairs=True)
    else:
        chosen = _greedy(rows, cols, iou, _score_array(table.pred_ids, scores, "scores"), table.ref_ids.size)
    rows, cols = rows[chosen], cols[chosen]
    return Matching(table.ref_ids[rows], table.pred_ids[cols], iou[chosen], np.delete(table.ref_ids, rows),
                    np.delete(table.pred_ids, cols), float(iou_threshold))


def match_objects(reference: np.ndarray, prediction: np.ndarray, iou_threshold: float = 0.5,
                  scores: Mapping[int, float] | None = None) -> Matching:
    """Match reference objects to predicted objects one-to-one; pairs need IoU >= ``iou_threshold`` (and overlap).

    Without ``scores``, the matching has the most pairs and, among those, the largest total IoU (optimal
    assignment, ``scipy.optimize.linear_sum_assignment``). Above 0.5 each object has at most one candidate
    (two objects with IoU > 0.5 with a third would share more than half of it), so the pairs are simply all
    candidates; at exactly 0.5 two halves of an object both qualify, and the assignment keeps one. With
    ``scores`` (predicted id -> confidence), COCO's greedy rule is used instead: by descending score, each
    prediction takes the unmatched reference of highest IoU. Swapping reference and prediction (no scores)
    swaps the false negatives and false positives and keeps the pairs (up to ties).

    Args:
        reference, prediction: instance maps of one shape ``(*spatial)``, 0 = background.
        iou_threshold: in ``[0, 1]``.
        scores: optional confidence per predicted object id (all ids of ``prediction``).

    Example:
        >>> ref = np.array([[1, 1, 1, 1, 0, 2, 2]])
        >>> m = match_objects(ref, np.array([[3, 3, 4, 4, 0, 0, 0]]))
        >>> m.ref_ids.tolist(), m.pred_ids.tolist(), m.unmatched_ref.tolist(), m.unmatched_pred.tolist()
        ([1], [3], [2], [4])
    """
    return match_overlap(overlap_table(reference, prediction), iou_threshold, scores)


def detection_scores(matching: Matching) -> dict[str, float]:
    """Object-level ``tp``, ``fp``, ``fn``, ``precision``, ``recall`` and ``f1`` = 2TP / (2TP + FP + FN).

    No objects on either side: precision = recall = F1 = 1. Objects on one side only: all three 0.

    Example:
        >>> detection_scores(match_objects(np.array([[1, 0, 2]]), np.array([[1, 0, 0]])))["recall"]
        0.5
    """
    tp, fp, fn = matching.tp, matching.fp, matching.fn
    if tp + fp + fn == 0:
        return {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn)}


def panoptic_quality(matching: Matching) -> dict[str, float]:
    """Panoptic quality of one class (Kirillov et al., CVPR 2019): ``sq`` = mean IoU of the matched pairs,
    ``rq`` = TP / (TP + FP/2 + FN/2), ``pq`` = SQ x RQ (the paper matches at IoU > 0.5).

    No objects on either side: PQ = SQ = RQ = 1; no matched pair otherwise: all 0.

    Example:
        >>> m = match_objects(np.array([[1, 1, 1, 1, 0, 2]]), np.array([[1, 1, 1, 0, 0, 0]]))
        >>> {k: round(v, 3) for k, v in panoptic_quality(m).items()}
        {'pq': 0.5, 'sq': 0.75, 'rq': 0.667}
    """
    tp, fp, fn = matching.tp, matching.fp, matching.fn
    if tp + fp + fn == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    sq = float(np.mean(matching.iou)) if tp else 0.0
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": sq * rq, "sq": sq, "rq": rq}
