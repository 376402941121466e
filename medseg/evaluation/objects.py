"""Per-object (instance) metrics on arrays, 2D and 3D (any number of axes from 2).

An **instance map** is an integer array ``(*spatial)`` where 0 is background and each other value is one object
(an object need not be connected). A **mask** is a boolean array (or one of 0/1 integers).

- :func:`label_components`, :func:`relabel_sequential`: instance maps from masks; ids made consecutive.
- :func:`overlap_table`: ids, sizes and pairwise intersections of two instance maps from one ``bincount``. It is the
  one place that computes object overlaps; everything below uses it, and so do the modules named next.
- :func:`aggregated_jaccard`: AJI (Kumar et al. 2017), AJI+ (Graham et al. 2019) with ``one_to_one=True``.
- :func:`object_rows`: one row per object of a matching, for a table.

Built on these, in their own modules: one-to-one matching at an IoU threshold (``match_objects`` -> ``Matching``),
detection scores (precision, recall, F1) and panoptic quality (PQ, SQ, RQ) in :mod:`medseg.evaluation.matching`;
COCO-style average precision over a set of images in :mod:`medseg.evaluation.precision` (``average_precision``);
and the BraTS 2023 lesion-wise Dice and HD95 in :mod:`medseg.evaluation.lesionwise` (``lesion_wise`` ->
``LesionWise``).

Empty rules, as the ``"brats"`` rule of :mod:`medseg.evaluation.metrics`: no object on either side gives AJI 1;
objects on one side only give 0. Sizes are voxel counts; ``volume_ml`` is voxels x prod(spacing) / 1000 for 3D
arrays and NaN for 2D ones (a pixel has an area, not a volume: use ``voxels``, the pixel count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medseg.errors import MedsegError, check_choice
from medseg.evaluation.metrics import _as_labels

if TYPE_CHECKING:  # matching.py imports this module
    from medseg.evaluation.matching import Matching

CONNECTIVITIES = ("full", "face")


# ----------------------------------------------------------------------------------------------- input checks

def _instances(array: Any, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:
        raise MedsegError(f"{name}: an instance map is an image with 2 or more axes, got shape {array.shape}")
    if array.dtype.kind not in "buif":
        raise MedsegError(f"{name}: an instance map holds integer object ids (0 = background), got {array.dtype}")
    array = _as_labels(array, name)
    return array.astype(np.int64) if array.dtype == np.uint64 else array


def _pair(reference: Any, prediction: Any, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    ref, pred = _instances(reference, f"{where}reference"), _instances(prediction, f"{where}prediction")
    if ref.shape != pred.shape:
        raise MedsegError(f"{where}reference shape {ref.shape} differs from prediction shape {pred.shape}; "
                          "both maps must share one grid")
    return ref, pred


def _mask(array: Any, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:
        raise MedsegError(f"{name}: a mask is an image with 2 or more axes, got shape {array.shape}")
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind not in "uif" or not ((array == 0) | (array == 1)).all():
        raise MedsegError(f"{name}: a mask holds booleans or 0/1, got {array.dtype} values outside 0/1; pass one "
                          "region as a boolean array, e.g. np.isin(labels, (1, 2, 4))")
    return array != 0


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size != ndim or not np.all(np.isfinite(values) & (values > 0)):
        raise MedsegError(f"spacing {tuple(np.ravel(spacing))} must give one positive voxel size in mm per axis "
                          f"of the {ndim}D arrays")
    return values


def _volume_ml(voxels: np.ndarray, spacing: np.ndarray | None, ndim: int) -> np.ndarray:
    if spacing is None or ndim != 3:
        return np.full(np.shape(voxels), np.nan)
    return np.asarray(voxels) * float(np.prod(spacing)) / 1000.0


def _structure(ndim: int, connectivity: str) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim if connectivity == "full" else 1)


# ------------------------------------------------------------------------------------------- components, ids

def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(map with ids 1..N in the order of the original ids (int32), (N,) original ids)``."""
    hi = int(labels.max(initial=0))
    if hi <= 4 * labels.size + 65536:
        ids = np.flatnonzero(np.bincount(labels.ravel(), minlength=hi + 1)[1:]) + 1
        lut = np.zeros(hi + 1, dtype=np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[labels], ids
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    inverse = inverse.astype(np.int32).reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return inverse, ids[1:]
    return inverse + 1, ids


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Instance map with ids 1..N, keeping the order of the original ids (0 stays background).

    Args:
        instances: non-negative integer map ``(*spatial)``.

    Returns:
        ``int32`` map of the same shape.

    Example:
        >>> relabel_sequential(np.array([[0, 7, 7], [30, 0, 2]])).tolist()
        [[0, 2, 2], [3, 0, 1]]
    """
    return _compact(_instances(instances, "instances"))[0]


def label_components(mask: np.ndarray, connectivity: str = "full", min_size: int = 0,
                     spacing: Sequence[float] | None = None, min_volume_ml: float = 0.0) -> np.ndarray:
    """Connected components of a mask as an instance map, small ones removed, ids 1..N in scan order.

    Args:
        mask: boolean (or 0/1) array ``(*spatial)``, 2 or more axes.
        connectivity: ``"full"`` (8 neighbours in 2D, 26 in 3D) or ``"face"`` (4 in 2D, 6 in 3D).
        min_size: components of fewer voxels are removed.
        spacing: voxel size in mm per axis; needed for ``min_volume_ml``.
        min_volume_ml: components of smaller volume (voxels x prod(spacing) / 1000 mL) are removed.

    Returns:
        ``int32`` map of the mask's shape; ids follow the C-order position of each component's first voxel.

    Example:
        >>> m = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
        >>> label_components(m).tolist(), int(label_components(m, "face").max())
        ([[1, 0, 0], [0, 1, 0], [0, 0, 0], [2, 2, 2]], 3)
        >>> label_components(m, min_size=3).tolist()[3]
        [1, 1, 1]
    """
    mask = _mask(mask, "mask")
    check_choice(connectivity, CONNECTIVITIES, "connectivity")
    if not min_size >= 0 or not min_volume_ml >= 0:
        raise MedsegError(f"min_size={min_size} and min_volume_ml={min_volume_ml} must be non-negative")
    if min_volume_ml > 0 and spacing is None:
        raise MedsegError(f"min_volume_ml={min_volume_ml} needs the voxel size: pass spacing (mm per axis)")
    labels, n = ndimage.label(mask, _structure(mask.ndim, connectivity))
    labels = labels.astype(np.int32, copy=False)
    if n == 0 or (min_size <= 1 and min_volume_ml == 0):
        return labels
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    if min_volume_ml > 0:  # compared in mm^3, where the product of the spacings is exact more often
        keep &= sizes * float(np.prod(_spacing(spacing, mask.ndim))) >= min_volume_ml * 1000.0
    keep[0] = False
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.int32)
    return lut[labels]


# ------------------------------------------------------------------------------------------------- overlaps

@dataclass(frozen=True, eq=False)
class ObjectOverlap:
    """Sizes and pairwise intersections of the objects of two instance maps (``R`` reference, ``P`` predicted).

    Attributes:
        ref_ids, pred_ids: ``(R,)``, ``(P,)`` object ids present in each map, ascending (0 is not an object).
        ref_sizes, pred_sizes: ``(R,)``, ``(P,)`` voxel counts.
        ref_index, pred_index: ``(K,)`` positions in ``ref_ids`` / ``pred_ids`` of the ``K`` pairs that
            intersect, sorted by reference then prediction.
        intersection, iou: ``(K,)`` voxels in common and intersection over union of those pairs.
    """

    ref_ids: np.ndarray
    pred_ids: np.ndarray
    ref_sizes: np.ndarray
    pred_sizes: np.ndarray
    ref_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray
    iou: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """``(K,)`` voxels in the union of each intersecting pair."""
        return self.ref_sizes[self.ref_index] + self.pred_sizes[self.pred_index] - self.intersection

    def iou_matrix(self) -> np.ndarray:
        """Dense ``(R, P)`` IoU (0 for the pairs that do not intersect)."""
        out = np.zeros((self.ref_ids.size, self.pred_ids.size))
        out[self.ref_index, self.pred_index] = self.iou
        return out


def _count(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``codes`` (all in ``[0, n)``) and their counts: a dense bincount when ``n`` is small."""
    if n <= 4 * codes.size + 65536:
        counts = np.bincount(codes, minlength=n)
        keys = np.flatnonzero(counts)
        return keys, counts[keys]
    return np.unique(codes, return_counts=True)


def _overlap(ref: np.ndarray, pred: np.ndarray) -> ObjectOverlap:
    r, ref_ids = _compact(ref)
    p, pred_ids = _compact(pred)
    stride = pred_ids.size + 1
    either = (r != 0) | (p != 0)
    keys, counts = _count(r[either].astype(np.int64) * stride + p[either], (ref_ids.size + 1) * stride)
    ri, pi = np.divmod(keys, stride)
    ref_sizes = np.bincount(ri, weights=counts, minlength=ref_ids.size + 1)[1:].astype(np.int64)
    pred_sizes = np.bincount(pi, weights=counts, minlength=stride)[1:].astype(np.int64)
    both = (ri > 0) & (pi > 0)
    ri, pi, inter = ri[both] - 1, pi[both] - 1, counts[both].astype(np.int64)
    iou = inter / (ref_sizes[ri] + pred_sizes[pi] - inter)
    return ObjectOverlap(ref_ids, pred_ids, ref_sizes, pred_sizes, ri, pi, inter, iou)


def overlap_table(reference: np.ndarray, prediction: np.ndarray) -> ObjectOverlap:
    """Ids, sizes and pairwise intersections of two instance maps, from one ``bincount`` over the voxels where
    either map has an object (sparse: only pairs that occur are kept).

    Args:
        reference, prediction: non-negative integer instance maps of one shape ``(*spatial)``; 0 = background.

    Example:
        >>> t = overlap_table(np.array([[1, 1, 0, 2]]), np.array([[0, 5, 5, 5]]))
        >>> t.ref_ids.tolist(), t.pred_ids.tolist(), t.intersection.tolist(), t.iou.round(3).tolist()
        ([1, 2], [5], [1, 1], [0.25, 0.333])
    """
    return _overlap(*_pair(reference, prediction))


# ------------------------------------------------------------------------------------------ assignment, AJI

def _assign(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, most_pairs: bool) -> np.ndarray:
    """Positions of a one-to-one choice among the pairs ``(rows[k], cols[k])``: the largest total ``weight``
    (with ``most_pairs``: the most pairs, and among those the largest total weight)."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    if ur.size == rows.size and uc.size == cols.size:  # no object in two pairs: take them all
        return np.arange(rows.size)
    pair = np.full((ur.size, uc.size), -1)
    pair[ri, ci] = np.arange(rows.size)
    gain = np.zeros((ur.size, uc.size))  # a pair's bonus exceeds any total of weights <= 1: more pairs win
    gain[ri, ci] = weight + (min(ur.size, uc.size) + 1 if most_pairs else 0)
    a, b = linear_sum_assignment(gain, maximize=True)
    chosen = pair[a, b]
    return np.sort(chosen[chosen >= 0])



def aggregated_jaccard(reference: np.ndarray, prediction: np.ndarray, one_to_one: bool = False) -> float:
    """Aggregated Jaccard Index, AJI (Kumar et al., IEEE TMI 2017), or AJI+ (Graham et al., MedIA 2019).

    AJI: each reference object G takes the intersecting prediction S of highest IoU (ties: the lowest id);
    C += |G n S| and U += |G u S|. A reference object that meets no prediction adds |G| to U; predictions never
    taken add their size to U. AJI = C / U. As in the paper, one prediction may be taken by several reference
    objects (its voxels then count in several unions). ``one_to_one=True`` gives AJI+: the pairs are the
    one-to-one assignment of intersecting objects with the largest total IoU, and each prediction is used at most
    once. No objects on either side: 1.

    Args:
        reference, prediction: instance maps of one shape ``(*spatial)``, 0 = background.

    Example:
        >>> ref = np.array([[1, 1, 0, 2, 2]])
        >>> aggregated_jaccard(ref, np.array([[3, 3, 3, 3, 3]])), aggregated_jaccard(ref, np.array([[3, 3, 3, 3, 3]]), True)
        (0.4, 0.2857142857142857)
    """
    t = overlap_table(reference, prediction)
    if t.ref_ids.size == 0 and t.pred_ids.size == 0:
        return 1.0
    if one_to_one:
        chosen = _assign(t.ref_index, t.pred_index, t.iou, most_pairs=False)
    else:  # per reference object, its pair of highest IoU (pairs are sorted by reference, then prediction)
        order = np.lexsort((-t.iou, t.ref_index))
        chosen = order[np.unique(t.ref_index[order], return_index=True)[1]]
    used_ref = np.zeros(t.ref_ids.size, bool)
    used_pred = np.zeros(t.pred_ids.size, bool)
    used_ref[t.ref_index[chosen]] = True
    used_pred[t.pred_index[chosen]] = True
    inter = t.intersection[chosen].sum()
    union = t.union[chosen].sum() + t.ref_sizes[~used_ref].sum() + t.pred_sizes[~used_pred].sum()
    return float(inter / union)


# ------------------------------------------------------------------------------------------------ object rows

def _geometry(labels: np.ndarray, n: int, spacing: np.ndarray | None) -> list[tuple[int, float, tuple]]:
    """``(voxels, volume_ml, bounding-box centre)`` of objects 1..n of a compact instance map."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ml = _volume_ml(sizes, spacing, labels.ndim)
    centres = [tuple((s.start + s.stop - 1) / 2 for s in box) for box in ndimage.find_objects(labels, n)]
    return [(int(v), float(m), c) for v, m, c in zip(sizes, ml, centres)]


def _row(kind: str, ref_id: int | None, pred_id: int | None, iou: float, voxels: int, ml: float, centre: tuple) -> dict:
    return {"kind": kind, "ref_id": ref_id, "pred_id": pred_id, "voxels": voxels, "volume_ml": ml, "centre": centre,
            "iou": float(iou), "dice": float(2 * iou / (1 + iou)), "detected": ref_id is not None and pred_id is not None}


def object_rows(reference: np.ndarray, prediction: np.ndarray, matching: Matching,
                spacing: Sequence[float] | None = None) -> list[dict]:
    """One row per reference object and per unmatched predicted object, for an objects table.

    Row keys: ``kind`` ("reference" or "false_positive"), ``ref_id``, ``pred_id`` (``None`` when absent),
    ``voxels`` (pixels in 2D) and ``volume_ml`` (3D with ``spacing``; NaN otherwise) and ``centre`` (bounding-box
    centre, voxel coordinates per array axis) of the row's object (the reference object, or the false positive),
    ``iou`` and ``dice`` of the matched pair (NaN without one) and ``detected``.

    Args:
        reference, prediction: the instance maps ``matching`` was computed on.
        matching: from :func:`medseg.evaluation.matching.match_objects` on these maps.
        spacing: voxel size in mm per axis, for ``volume_ml``.

    Example:
        >>> from medseg.evaluation.matching import match_objects
        >>> ref, pred = np.array([[1, 1, 0, 0]]), np.array([[2, 2, 0, 3]])
        >>> [(r["kind"], r["pred_id"], r["centre"], r["dice"]) for r in object_rows(ref, pred, match_objects(ref, pred))]
        [('reference', 2, (0.0, 0.5), 1.0), ('false_positive', 3, (0.0, 3.0), nan)]
    """
    ref, pred = _pair(reference, prediction)
    r, ref_ids = _compact(ref)
    p, pred_ids = _compact(pred)
    given = (np.sort(np.concatenate([matching.ref_ids, matching.unmatched_ref])),
             np.sort(np.concatenate([matching.pred_ids, matching.unmatched_pred])))
    if not (np.array_equal(given[0], ref_ids) and np.array_equal(given[1], pred_ids)):
        raise MedsegError("matching does not belong to these instance maps (its object ids differ); compute it "
                          "with medseg.evaluation.matching.match_objects(reference, prediction)")
    spacing = None if spacing is None else _spacing(spacing, ref.ndim)
    pairs = {int(a): (int(b), float(v)) for a, b, v in zip(matching.ref_ids, matching.pred_ids, matching.iou)}
    ref_geo, pred_geo = _geometry(r, ref_ids.size, spacing), _geometry(p, pred_ids.size, spacing)
    out = [_row("reference", i, *pairs.get(i, (None, np.nan)), *ref_geo[k]) for k, i in enumerate(ref_ids.tolist())]
    for k in np.searchsorted(pred_ids, matching.unmatched_pred):
        out.append(_row("false_positive", None, int(pred_ids[k]), np.nan, *pred_geo[k]))
    return out
