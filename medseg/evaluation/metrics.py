"""Segmentation metrics on arrays: one label map against another, per class and per region.

All overlap counts of a case come from one ``bincount`` over (prediction, reference) index pairs inside the
bounding box of the union of both foregrounds (voxels outside it are background in both). Surface metrics use
:mod:`medseg.evaluation.surface`. Definitions and the rules for empty masks are in ``docs/evaluation.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from medseg.data.labels import LabelScheme, get_scheme
from medseg.errors import MedsegError, check_choice
from medseg.evaluation import surface as surf

EMPTY_RULES = ("brats", "nan")
OVERLAP_METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy")
DISTANCE_METRICS = ("hd95", "assd", "nsd")
VOLUME_METRICS = ("ref_ml", "pred_ml", "vol_diff_ml")
CASE_METRICS = ("pixel_accuracy", "mean_pixel_accuracy")
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
    """Dice, IoU, precision, recall, specificity and accuracy from voxel counts, with the empty-mask rules.

    Example:
        >>> overlap_metrics(tp=3, fp=1, fn=2, tn=4)["dice"]
        0.6666666666666666
    """
    ref_n, pred_n = tp + fn, tp + fp
    both = ref_n == 0 and pred_n == 0
    one = (ref_n == 0) != (pred_n == 0)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both, one, empty),
        "iou": _ratio(tp, tp + fp + fn, both, one, empty),
        "precision": _ratio(tp, pred_n, both, one, empty),
        "recall": _ratio(tp, ref_n, both, one, empty),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "accuracy": float((tp + tn) / (tp + fp + fn + tn)),
    }


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
        pred, ref: integer label maps ``(X, Y[, Z])`` on the same grid, both in the convention of ``scheme``.
        spacing: voxel size in mm per axis (distances and volumes are in mm and mL).
        scheme: label scheme (name or object); regions (BraTS WT/TC/ET) are evaluated when it has them.
        settings: surface-Dice tolerance and the rule for empty masks.

    Returns:
        One row per class and region (``kind`` "class"/"region", ``target``) with the columns of
        :data:`METRICS`, plus a row ``kind="case", target="all"`` with the multi-class ``pixel_accuracy`` and
        ``mean_pixel_accuracy`` (mean over the classes present in the reference, background included).

    Raises:
        MedsegError: for arrays of different shapes or label values outside the scheme.

    Example:
        >>> ref = np.zeros((6, 5, 4), np.uint8); ref[1:4, 1:4, 1:3] = 1
        >>> df = compute_metrics(ref.copy(), ref, (1.0, 1.0, 2.0), "binary")
        >>> row = df.iloc[0]
        >>> row["target"], float(row["dice"]), float(row["hd95"]), round(float(row["ref_ml"]), 6)
        ('foreground', 1.0, 0.0, 0.036)
    """
    scheme = get_scheme(scheme)
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise MedsegError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}; they must share one grid")
    if len(spacing) != ref.ndim:
        raise MedsegError(f"spacing {tuple(spacing)} has {len(spacing)} values for {ref.ndim}D arrays")
    pred, ref = _as_labels(pred, "prediction"), _as_labels(ref, "reference")
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
    if counts[-1].any() or counts[:, -1].any():  # values outside the scheme: the scheme names them
        scheme.check(p, "prediction")
        scheme.check(r, "reference")
    return pd.DataFrame(_rows(p, r, counts[:-1, :-1], values, scheme, spacing, ref.shape, settings))


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
    ref_counts = counts.sum(axis=0)
    present = ref_counts > 0
    rows.append({"kind": "case", "target": "all", "pixel_accuracy": float(np.trace(counts) / total),
                 "mean_pixel_accuracy": float(np.mean(np.diag(counts)[present] / ref_counts[present]))})
    return rows
