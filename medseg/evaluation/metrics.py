"""Segmentation metrics on arrays: one label map against another, per class and per region.

All overlap counts of a case come from one ``bincount`` over (prediction, reference) index pairs inside the
bounding box of the union of both foregrounds (voxels outside it are background in both). Surface metrics use
:mod:`medseg.evaluation.surface`. Definitions and the rules for empty masks are in ``docs/evaluation.md``.

Ignored voxels: when the scheme ignores file values (``trimap``: the boundary), the decoded reference holds
:data:`~medseg.data.labels.IGNORE` there. Those voxels count as neither prediction nor reference: they are left out of
every count (overlap, confusion matrix, pixel accuracy, volumes) and are background in both masks for the surface
distances.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from medseg.data.labels import IGNORE, LabelScheme, get_scheme
from medseg.errors import MedsegError, check_choice
from medseg.evaluation import surface as surf

EMPTY_RULES = ("brats", "nan")
OVERLAP_METRICS = ("dice", "iou", "precision", "recall", "f1", "specificity", "accuracy")
DISTANCE_METRICS = ("hd95", "assd", "nsd")
VOLUME_METRICS = ("ref_ml", "pred_ml", "vol_diff_ml")
CASE_METRICS = ("pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou")  # the kind="case" row
METRICS = OVERLAP_METRICS + DISTANCE_METRICS + VOLUME_METRICS + CASE_METRICS


@dataclass(frozen=True)
class MetricSettings:
    """How metrics are computed.

    Attributes:
        tolerance_mm: distance (mm) under which surface voxels count as matched in the normalised surface Dice.
        empty: what both masks empty gives: ``"brats"`` (Dice, IoU, precision, recall, surface Dice 1;
            HD95 and ASSD 0) or ``"nan"`` (all of them NaN, left out of means and counted apart).
        distances: compute HD95, ASSD and surface Dice (the slow part); ``False`` leaves them NaN.
        targets: what is evaluated: ``("classes", "regions")`` (default), or either alone.
    """

    tolerance_mm: float = 1.0
    empty: str = "brats"
    distances: bool = True
    targets: tuple[str, ...] = ("classes", "regions")

    def __post_init__(self) -> None:
        check_choice(self.empty, EMPTY_RULES, "empty")
        if not self.tolerance_mm >= 0:
            raise MedsegError(f"tolerance_mm={self.tolerance_mm} must be a non-negative distance in mm")
        if not self.targets or set(self.targets) - {"classes", "regions"}:
            raise MedsegError(f"targets={self.targets!r}: choose 'classes', 'regions' or both")


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length (mm) of the diagonal of the image extent: the distance given when one mask is empty.

    Example:
        >>> round(image_diagonal((240, 240, 155), (1.0, 1.0, 1.0)), 2)
        373.13
    """
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _ratio(num: float, den: float, both_empty: bool, one_empty: bool, empty: str) -> float:
    if both_empty:
        return 1.0 if empty == "brats" else float("nan")
    if den == 0:
        return 0.0 if one_empty else float("nan")
    return float(num / den)


def overlap_metrics(tp: int, fp: int, fn: int, tn: int, empty: str = "brats") -> dict[str, float]:
    """Dice, IoU, precision, recall, F1, specificity and accuracy from voxel counts, with the empty-mask rules.

    F1 (2 precision recall / (precision + recall)) is Dice for one class against the rest; it is listed under its
    own name for readers who look for it.

    Example:
        >>> overlap_metrics(tp=3, fp=1, fn=2, tn=4)["dice"]
        0.6666666666666666
    """
    ref_n, pred_n = tp + fn, tp + fp
    both = ref_n == 0 and pred_n == 0
    one = (ref_n == 0) != (pred_n == 0)
    dice = _ratio(2 * tp, 2 * tp + fp + fn, both, one, empty)
    total = tp + fp + fn + tn
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn, both, one, empty),
        "precision": _ratio(tp, pred_n, both, one, empty),
        "recall": _ratio(tp, ref_n, both, one, empty),
        "f1": dice,
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "accuracy": float((tp + tn) / total) if total else float("nan"),
    }


def semantic_metrics(counts: np.ndarray) -> dict[str, float]:
    """Multi-class scores of a confusion matrix (classes incl. background), as in Long et al. (FCN, CVPR 2015).

    Args:
        counts: ``(K, K)`` voxel counts, ``[i, j]`` = predicted class i and reference class j (the layout of
            :func:`confusion_matrix`); one case or summed over cases.

    Returns:
        ``pixel_accuracy`` (right voxels / all), ``mean_pixel_accuracy`` (mean over the classes present in the
        reference of their recall), ``mean_iou`` (mean over the classes present in the prediction or the reference
        of their IoU: a class absent from both has no IoU and is left out, as scikit-learn's ``jaccard_score``
        does over the labels it finds) and ``fw_iou`` (IoUs weighted by the classes' reference voxel counts).
        All NaN when ``counts`` is empty (every voxel ignored).

    Example:
        >>> m = semantic_metrics(np.array([[5, 1], [0, 2]]))  # 5 + 2 right, 1 reference-1 voxel predicted 0
        >>> round(m["pixel_accuracy"], 4), round(m["mean_iou"], 4)
        (0.875, 0.75)
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {m: float("nan") for m in CASE_METRICS}
    diag = np.diag(counts)
    ref_n, pred_n = counts.sum(axis=0), counts.sum(axis=1)
    union = ref_n + pred_n - diag
    in_ref, present = ref_n > 0, union > 0
    iou = diag[present] / union[present]
    return {"pixel_accuracy": float(diag.sum() / total),
            "mean_pixel_accuracy": float(np.mean(diag[in_ref] / ref_n[in_ref])),
            "mean_iou": float(iou.mean()),
            "fw_iou": float((ref_n[present] * iou).sum() / total)}


def distance_metrics(pred_surface: np.ndarray, ref_surface: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                     settings: MetricSettings, image_shape: Sequence[int] | None = None) -> dict[str, float]:
    """HD95 and ASSD (mm) and surface Dice from the surface voxels of two masks, with the empty-mask rules.

    Args:
        pred_surface, ref_surface: sorted flat indices of the surface voxels (:func:`surface.surface`) in an
            array of ``shape``; empty for an empty mask.
        image_shape: shape of the whole image when ``shape`` is a crop of it: one empty mask gives the length of
            the image diagonal (:func:`image_diagonal`) as HD95 and ASSD.
    """
    if pred_surface.size == 0 and ref_surface.size == 0:
        value = (0.0, 1.0) if settings.empty == "brats" else (float("nan"), float("nan"))
        return {"hd95": value[0], "assd": value[0], "nsd": value[1]}
    if pred_surface.size == 0 or ref_surface.size == 0:
        worst = image_diagonal(shape if image_shape is None else image_shape, spacing)
        return {"hd95": worst, "assd": worst, "nsd": 0.0}
    d_pr = surf.directed_distances(pred_surface, ref_surface, shape, spacing)
    d_rp = surf.directed_distances(ref_surface, pred_surface, shape, spacing)
    return {
        "hd95": surf.percentile_hausdorff(d_pr, d_rp, 95.0),
        "assd": surf.average_surface_distance(d_pr, d_rp),
        "nsd": surf.surface_dice(d_pr, d_rp, settings.tolerance_mm),
    }


def _all_distances(p: np.ndarray, r: np.ndarray, value_sets: list[tuple[int, ...]], spacing, settings, image_shape) -> dict:
    """Distance metrics of several label-value sets: masks as bit flags, 8 sets per pass."""
    out = {}
    for start in range(0, len(value_sets), 8):
        chunk = value_sets[start:start + 8]
        lut = np.zeros(max(max(v) for v in chunk) + 1 if chunk else 1, dtype=np.uint8)
        for bit, values in enumerate(chunk):
            lut[list(values)] |= np.uint8(1 << bit)
        hi = lut.size - 1
        ps = surf.surface(lut[np.minimum(p, hi)] if p.size and p.max() > hi else lut[p])
        rs = surf.surface(lut[np.minimum(r, hi)] if r.size and r.max() > hi else lut[r])
        for bit, values in enumerate(chunk):
            flag = np.uint8(1 << bit)
            out[values] = distance_metrics(np.flatnonzero(ps & flag), np.flatnonzero(rs & flag), p.shape, spacing,
                                           settings, image_shape)
    return out


def targets(scheme: LabelScheme, values: Sequence[int], which: Sequence[str] = ("classes", "regions")) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(kind, name, label values)`` evaluated for a scheme: each class, then each region.

    The generic scheme evaluates each non-zero value in ``values`` as a class named after the value.
    """
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if "classes" in which or not scheme.regions:
        if scheme.is_generic:
            out += [("class", str(v), (int(v),)) for v in values if v != 0]
        else:
            out += [("class", name, (scheme.labels[name],)) for name in scheme.class_names]
    if "regions" in which:
        out += [("region", name, tuple(vals)) for name, vals in scheme.regions.items()]
    return out


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, values: Sequence[int], outside: int = 0) -> np.ndarray:
    """``(K+1, K+1)`` voxel counts, ``[i, j]`` = predicted ``values[i]`` and reference ``values[j]``, in one pass.

    Index ``K`` counts values not in ``values``. ``outside`` voxels (background in both, not in the arrays) are
    added to ``[0, 0]``; ``values[0]`` must be 0. Arrays hold non-negative integers.
    """
    k = len(values) + 1
    hi = max(int(pred.max(initial=0)), int(ref.max(initial=0)), *values)
    lut = np.full(hi + 1, k - 1, dtype=np.uint8 if k * k <= 256 else np.int64)
    lut[list(values)] = np.arange(k - 1)
    codes = lut[pred]
    codes *= k
    codes += lut[ref]
    counts = np.bincount(codes.ravel(), minlength=k * k).reshape(k, k)
    counts[0, 0] += outside
    return counts


def _present(*arrays: np.ndarray) -> list[int]:
    hi = max(int(a.max(initial=0)) for a in arrays)
    seen = np.zeros(hi + 1, dtype=bool)
    for a in arrays:
        seen[np.bincount(a.ravel().astype(np.int64, copy=False), minlength=hi + 1) > 0] = True
    return [int(v) for v in np.flatnonzero(seen)]


def _as_labels(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "ui":
        if not np.array_equal(array, np.round(array)):
            raise MedsegError(f"{name}: label maps must hold integers, got non-integer {array.dtype} values")
        array = array.astype(np.int64)
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise MedsegError(f"{name}: label maps hold non-negative integers, found {int(array.min())}")
    return array


def compute_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                    scheme: str | LabelScheme = "labels", settings: MetricSettings = MetricSettings()) -> pd.DataFrame:
    """Metrics of a predicted label map against a reference, per class and per region of ``scheme``.

    Args:
        pred, ref: integer label maps ``(X, Y[, Z])`` on the same grid, both in the convention of ``scheme``
            (label values, as :meth:`LabelScheme.decode` gives them). When the scheme ignores values, reference
            voxels equal to :data:`~medseg.data.labels.IGNORE` are left out of every metric.
        spacing: voxel size in mm per axis (distances and volumes are in mm and mL).
        scheme: label scheme (name or object); regions (BraTS WT/TC/ET) are evaluated when it has them.
        settings: surface-Dice tolerance and the rule for empty masks.

    Returns:
        One row per class and region (``kind`` "class"/"region", ``target``) with the columns of
        :data:`METRICS`, plus a row ``kind="case", target="all"`` with the multi-class scores of
        :data:`CASE_METRICS` (:func:`semantic_metrics`, background included).

    Raises:
        MedsegError: for arrays of different shapes or label values outside the scheme.

    Example:
        >>> ref = np.zeros((6, 5, 4), np.uint8); ref[1:4, 1:4, 1:3] = 1
        >>> df = compute_metrics(ref.copy(), ref, (1.0, 1.0, 2.0), "binary")
        >>> row = df.iloc[0]
        >>> row["target"], float(row["dice"]), float(row["hd95"]), round(float(row["ref_ml"]), 6)
        ('foreground', 1.0, 0.0, 0.036)
    """
    return compute_metrics_confusion(pred, ref, spacing, scheme, settings)[0]


def compute_metrics_confusion(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], scheme: str | LabelScheme = "labels",
                              settings: MetricSettings = MetricSettings()) -> tuple[pd.DataFrame, list[int], np.ndarray]:
    """:func:`compute_metrics` and the case's confusion matrix: ``(table, values, counts)`` with ``counts[i, j]``
    the voxels of reference ``values[i]`` predicted ``values[j]`` (rows = reference, as scikit-learn's
    ``confusion_matrix``), ignored voxels left out. ``values`` are the scheme's label values with 0 (generic
    scheme: the values found in either map)."""
    scheme = get_scheme(scheme)
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise MedsegError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}; they must share one grid")
    if len(spacing) != ref.ndim:
        raise MedsegError(f"spacing {tuple(spacing)} has {len(spacing)} values for {ref.ndim}D arrays")
    pred, ref = _as_labels(pred, "prediction"), _as_labels(ref, "reference")
    ignored = 0
    if scheme.has_ignore:  # ignored voxels: background in both, then taken out of the [0, 0] count
        mask = ref == IGNORE
        ignored = int(np.count_nonzero(mask))
        if ignored:
            pred, ref = np.where(mask, 0, pred).astype(pred.dtype, copy=False), np.where(mask, 0, ref).astype(ref.dtype, copy=False)
    box = surf.bounding_box((pred != 0) | (ref != 0))
    box = box or tuple(slice(0, 0) for _ in ref.shape)
    p, r = np.ascontiguousarray(pred[box]), np.ascontiguousarray(ref[box])
    if max(int(p.max(initial=0)), int(r.max(initial=0))) > 65535:
        scheme.check(p, "prediction")
        scheme.check(r, "reference")
        raise MedsegError("label values above 65535 are not supported; relabel the maps with consecutive integers")
    values = _present(p, r) if scheme.is_generic else list(scheme.values)
    values = values if values and values[0] == 0 else [0, *values]
    counts = confusion_matrix(p, r, values, outside=ref.size - p.size)
    counts[0, 0] -= ignored
    if counts[-1].any() or counts[:, -1].any():  # values outside the scheme: the scheme names them
        scheme.check(p, "prediction")
        scheme.check(r, "reference")
        raise MedsegError(f"prediction: label value {IGNORE} marks ignored voxels of a reference in label scheme "
                          f"'{scheme.name}'; a prediction holds label values only ({', '.join(map(str, scheme.values))})")
    counts = counts[:-1, :-1]
    table = pd.DataFrame(_rows(p, r, counts, values, scheme, spacing, ref.shape, settings))
    return table, values, counts.T.copy()


def _rows(p, r, counts, values, scheme, spacing, shape, settings) -> list[dict]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    total = int(counts.sum())
    index = {v: i for i, v in enumerate(values)}
    rows = []
    wanted = targets(scheme, values, settings.targets)
    distances = {}
    if settings.distances:  # a class equal to a region (BraTS ET) is computed once
        sets = list(dict.fromkeys(tuple(sorted(v)) for _, _, v in wanted))
        distances = _all_distances(p, r, sets, spacing, settings, shape)
    for kind, name, target_values in wanted:
        sel = [index[v] for v in target_values]
        tp = int(counts[np.ix_(sel, sel)].sum())
        pred_n, ref_n = int(counts[sel, :].sum()), int(counts[:, sel].sum())
        row = {"kind": kind, "target": name, **overlap_metrics(tp, pred_n - tp, ref_n - tp, total - pred_n - ref_n + tp, settings.empty)}
        if settings.distances:
            row.update(distances[tuple(sorted(target_values))])
        else:
            row.update({m: float("nan") for m in DISTANCE_METRICS})
        row.update({"ref_ml": ref_n * voxel_ml, "pred_ml": pred_n * voxel_ml, "vol_diff_ml": (pred_n - ref_n) * voxel_ml})
        rows.append(row)
    rows.append({"kind": "case", "target": "all", **semantic_metrics(counts)})
    return rows
