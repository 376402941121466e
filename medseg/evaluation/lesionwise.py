"""BraTS 2023 lesion-wise Dice and HD95 of one region of one case, 2D and 3D: :func:`lesion_wise` ->
:class:`LesionWise`.

Inputs are masks: boolean arrays (or ones of 0/1 integers) ``(*spatial)``. Empty rules, as the ``"brats"`` rule of
:mod:`medseg.evaluation.metrics`: no lesion and no prediction gives lesion-wise Dice 1 and HD95 0; objects on one
side only give Dice 0 and HD95 the cap. Sizes are voxel counts; ``volume_ml`` is voxels x prod(spacing) / 1000 for
3D arrays and NaN for 2D ones (a pixel has an area, not a volume: use ``voxels``, the pixel count). Components,
overlaps and input checks are those of :mod:`medseg.evaluation.objects`.

BraTS 2023 lesion-wise rules (:func:`lesion_wise`), following the challenge's published evaluation code:

1. Prediction components: connected components of the binary prediction, 26-connectivity (8 in 2D).
2. Reference lesions: the reference mask is dilated ``dilation`` times with
   ``scipy.ndimage.generate_binary_structure(ndim, 2)`` (18-connectivity in 3D, 8 in 2D); each reference voxel
   takes the id of the 26-connected component of the dilated mask it lies in, so reference blobs separated by
   up to 2 x ``dilation`` background voxels along an axis are one lesion.
3. Each lesion L is matched to the prediction components that intersect the dilated L; their union P is compared
   with L (undilated): Dice(L, P) and HD95(L, P) in mm (HD95 as in :mod:`medseg.evaluation.metrics`: the larger of
   the two directed 95th percentiles of the surface distances). P empty: L is a false negative, Dice 0 and HD95
   ``hd_cap``; an infinite HD95 becomes ``hd_cap``.
4. Lesions with volume (voxels x voxel volume in mm^3; mm^2 in 2D) <= ``min_volume`` are dropped: neither counted
   nor false negatives; the prediction components matched to them are still not false positives.
5. False positives: prediction components that intersect no dilated lesion (dropped lesions included).
6. Lesion-wise Dice = sum(Dice of kept lesions) / (n_kept + n_fp); HD95 = (sum(HD95 of kept lesions) +
   hd_cap x n_fp) / (n_kept + n_fp). A denominator of 0 (nothing on either side) gives Dice 1 and HD95 0.

HD95 uses the surfaces of :mod:`medseg.evaluation.surface` (face-connected boundary voxels, as MONAI), not the
surfel areas of the DeepMind ``surface-distance`` package the BraTS code calls, so values can differ slightly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation import surface as surf
from medseg.evaluation.objects import _mask, _overlap, _spacing, _structure, _volume_ml


@dataclass(frozen=True, eq=False)
class LesionWise:
    """BraTS 2023 lesion-wise scores of one case (rules in the module docstring).

    Attributes:
        dice, hd95: lesion-wise Dice and HD95 (mm).
        n_reference: lesions counted (volume > ``min_volume``); n_small: lesions dropped as too small.
        n_prediction: prediction components.
        tp, fn: counted lesions with / without a matched component; fp: components matched to no lesion.
        rows: one dict per lesion (``kind`` "lesion" or "small_lesion") and per false positive (``kind``
            "false_positive", Dice 0 and HD95 ``hd_cap``, as they enter the scores), with ``lesion_id``,
            ``prediction_ids`` (tuple of component ids), ``voxels``, ``volume_ml``, ``dice``, ``hd95``, ``detected``.
        lesions, components: instance maps of the reference lesions and prediction components (their ids).
    """

    dice: float
    hd95: float
    n_reference: int
    n_small: int
    n_prediction: int
    tp: int
    fn: int
    fp: int
    rows: tuple[dict, ...]
    lesions: np.ndarray = field(repr=False)
    components: np.ndarray = field(repr=False)


def _reference_lesions(ref: np.ndarray, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lesions, dilated lesions)``: instance maps of rule 2, computed in the bounding box of the reference.

    The dilated lesion L equals the dilation of L alone: dilation distributes over the voxels, and every voxel
    within reach of L is connected to L in the dilated mask; so one dilation serves rules 2 and 3."""
    lesions = np.zeros(ref.shape, dtype=np.int32)
    dilated = np.zeros(ref.shape, dtype=np.int32)
    box = surf.bounding_box(ref, margin=dilation)
    if box is None:
        return lesions, dilated
    grown = ref[box]
    if dilation > 0:  # iterations=0 would mean "until nothing changes" to scipy
        grown = ndimage.binary_dilation(grown, ndimage.generate_binary_structure(ref.ndim, 2), iterations=dilation)
    dilated[box] = ndimage.label(grown, _structure(ref.ndim, "full"))[0]
    lesions[box] = np.where(ref[box], dilated[box], 0)
    return lesions, dilated


def _lesion_hd95(lesions: np.ndarray, components: np.ndarray, lesion: int, matched: np.ndarray,
                 boxes: tuple[list, list], spacing: np.ndarray, hd_cap: float) -> float:
    """HD95 (mm) between one lesion and the union of its matched components, on the hull of their boxes."""
    if matched.size == 0:
        return hd_cap
    parts = [boxes[0][lesion - 1]] + [boxes[1][c - 1] for c in matched]
    box = tuple(slice(min(p[a].start for p in parts), max(p[a].stop for p in parts)) for a in range(lesions.ndim))
    chosen = np.zeros(len(boxes[1]) + 1, dtype=bool)
    chosen[matched] = True
    d_pl, d_lp = surf.surface_distances(chosen[components[box]], lesions[box] == lesion, spacing)
    hd = surf.percentile_hausdorff(d_pl, d_lp, 95.0)
    return hd if np.isfinite(hd) else hd_cap


def lesion_wise(reference_mask: np.ndarray, prediction_mask: np.ndarray, spacing: Sequence[float],
                dilation: int = 3, min_volume: float = 50.0, hd_cap: float = 374.0) -> LesionWise:
    """BraTS 2023 lesion-wise Dice and HD95 of one region of one case (rules 1-6 in the module docstring).

    Args:
        reference_mask, prediction_mask: boolean (or 0/1) masks of one shape ``(*spatial)``, 2D or 3D.
        spacing: voxel size in mm per axis.
        dilation: dilation iterations that merge nearby reference blobs and widen the matching (0: none).
        min_volume: lesions of at most this volume (mm^3; mm^2 in 2D) are dropped.
        hd_cap: HD95 (mm) of a missed lesion and of a false positive.

    Example:
        >>> ref = np.zeros((9, 9), bool); ref[1:4, 1:4] = True
        >>> pred = np.zeros((9, 9), bool); pred[1:4, 1:3] = True; pred[7:, 7:] = True
        >>> r = lesion_wise(ref, pred, (1.0, 1.0), min_volume=0)
        >>> r.tp, r.fn, r.fp, round(r.dice, 3), r.hd95
        (1, 0, 1, 0.4, 187.5)
    """
    ref, pred = _mask(reference_mask, "reference_mask"), _mask(prediction_mask, "prediction_mask")
    if ref.shape != pred.shape:
        raise MedsegError(f"reference_mask shape {ref.shape} differs from prediction_mask shape {pred.shape}; "
                          "both masks must share one grid")
    spacing = _spacing(spacing, ref.ndim)
    if int(dilation) != dilation or dilation < 0 or not min_volume >= 0 or not hd_cap > 0:
        raise MedsegError(f"dilation={dilation} must be a whole number >= 0, min_volume={min_volume} >= 0 and "
                          f"hd_cap={hd_cap} > 0")
    components = ndimage.label(pred, _structure(ref.ndim, "full"))[0].astype(np.int32, copy=False)
    lesions, dilated = _reference_lesions(ref, int(dilation))
    near, inside = _overlap(dilated, components), _overlap(lesions, components)  # lesion ids are 1..N in both
    n, voxel_mm3 = near.ref_ids.size, float(np.prod(spacing))
    sizes = inside.ref_sizes
    inter = np.bincount(inside.ref_index, weights=inside.intersection, minlength=n)  # matched parts only
    matched_size = np.bincount(near.ref_index, weights=near.pred_sizes[near.pred_index], minlength=n)
    dice = 2 * inter / (sizes + matched_size)
    boxes = (ndimage.find_objects(lesions), ndimage.find_objects(components))
    matched = np.split(near.pred_ids[near.pred_index], np.searchsorted(near.ref_index, np.arange(1, n)))
    hd = np.array([_lesion_hd95(lesions, components, i + 1, matched[i], boxes, spacing, hd_cap) for i in range(n)])
    kept = sizes * voxel_mm3 > min_volume
    detected = np.array([matched[i].size > 0 for i in range(n)], dtype=bool)
    fp_ids = np.setdiff1d(near.pred_ids, near.pred_ids[near.pred_index])
    fp_sizes = near.pred_sizes[np.searchsorted(near.pred_ids, fp_ids)]
    den = int(kept.sum()) + fp_ids.size
    score_dice = float(dice[kept].sum() / den) if den else 1.0
    score_hd = float((hd[kept].sum() + hd_cap * fp_ids.size) / den) if den else 0.0
    ml = _volume_ml(sizes, spacing, ref.ndim)
    fp_ml = _volume_ml(fp_sizes, spacing, ref.ndim)
    rows = [{"kind": "lesion" if kept[i] else "small_lesion", "lesion_id": i + 1,
             "prediction_ids": tuple(int(c) for c in matched[i]), "voxels": int(sizes[i]), "volume_ml": float(ml[i]),
             "dice": float(dice[i]), "hd95": float(hd[i]), "detected": bool(detected[i])} for i in range(n)]
    rows += [{"kind": "false_positive", "lesion_id": None, "prediction_ids": (int(c),), "voxels": int(s),
              "volume_ml": float(v), "dice": 0.0, "hd95": float(hd_cap), "detected": False}
             for c, s, v in zip(fp_ids, fp_sizes, fp_ml)]
    return LesionWise(score_dice, score_hd, int(kept.sum()), int((~kept).sum()), int(near.pred_ids.size),
                      int((kept & detected).sum()), int((kept & ~detected).sum()), int(fp_ids.size), tuple(rows),
                      lesions, components)
