"""Per-object evaluation of a set of predictions (``medseg evaluate --objects``): detection, panoptic quality,
AJI, COCO-style AP and the BraTS 2023 lesion-wise Dice and HD95, per case and class/region, with one row per object.

Objects of each evaluated target (every region of a scheme with regions, e.g. WT/TC/ET; otherwise every
foreground class):

* **reference objects**: the reference's own instance ids when the reference is an instance map (a folder of one
  mask per object, the ``instance-masks`` layout); otherwise connected components of the target's mask (full
  connectivity);
* **predicted objects**: the instance map that ``medseg predict --instances`` wrote beside the prediction
  (``<id>_instances.png`` / ``.nii.gz``, scores from ``<id>_instances.json``) for the target its JSON names (null:
  all foreground, i.e. the target made of every foreground label: WT, or the class of a one-class scheme); a map
  without that record is used where its objects lie inside the target's predicted mask; otherwise connected
  components of that mask (score 1). Object ids in ``objects.csv`` are those of the files.

The array-level definitions are in :mod:`medseg.evaluation.matching` (matching, detection, PQ),
:mod:`medseg.evaluation.objects` (components, AJI, object rows), :mod:`medseg.evaluation.precision` (AP),
:mod:`medseg.evaluation.lesionwise` (the lesion-wise rules) and ``docs/evaluation.md``. AP pools every case's
objects of a target (COCO does the same over images); the other metrics are per case, then averaged.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medseg.data.io import ImageRef, read_mask
from medseg.data.labels import IGNORE
from medseg.errors import MedsegError
from medseg.data.volume import Volume
from medseg.evaluation.evaluate import SUMMARY_STATS, CaseInput, EvaluationOptions, _stats, is_image_2d

OBJECT_METRICS = ("n_reference", "n_predicted", "tp", "fp", "fn", "precision", "recall", "f1", "sq", "rq", "pq", "aji",
                  "lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fn", "lesion_fp")
AP_METRICS = ("ap50", "ap75", "map")


@dataclass(frozen=True)
class ObjectSettings:
    """``iou_threshold``: a predicted and a reference object match (one-to-one) at this IoU or above.
    ``lesion_wise``: compute the BraTS 2023 lesion-wise Dice/HD95 (default: for volumes, not for 2D images, where
    dilating by 3 pixels would merge neighbouring cells); ``dilation``, ``min_volume`` (mm³) and ``hd_cap`` (mm) are
    the challenge's values for gliomas."""

    iou_threshold: float = 0.5
    lesion_wise: bool | None = None
    dilation: int = 3
    min_volume: float = 50.0
    hd_cap: float = 374.0

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold < 1.0:
            raise MedsegError(f"--match-iou {self.iou_threshold}: give an IoU within (0, 1), e.g. 0.5")
        if self.dilation < 0 or self.min_volume < 0:
            raise MedsegError("--lesion-dilation and --lesion-min-volume must be >= 0")


@dataclass(frozen=True)
class ObjectResult:
    """``cases``: one row per case x target with :data:`OBJECT_METRICS`; ``objects``: one row per reference object
    and per false-positive prediction; ``summary``: statistics per target x metric over the cases, plus the pooled
    AP rows (``ap50``, ``ap75``, ``map``: one value each, ``count`` = the cases pooled)."""

    cases: pd.DataFrame
    objects: pd.DataFrame
    summary: pd.DataFrame
    settings: ObjectSettings


def object_targets(options: EvaluationOptions) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, label values)`` whose objects are evaluated: the scheme's regions, or its foreground classes."""
    scheme = options.scheme
    if scheme.regions:
        return [(name, tuple(v)) for name, v in scheme.regions.items()]
    return [(name, (scheme.labels[name],)) for name in scheme.class_names]


def instance_files(prediction: Path) -> tuple[Path | None, Path | None]:
    """The instance map and the JSON that ``medseg predict --instances`` wrote beside a prediction, if any."""
    name = prediction.name
    for suffix in (".nii.gz", ".png", ".nii", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            found = prediction.with_name(f"{stem}_instances{suffix}")
            meta = prediction.with_name(f"{stem}_instances.json")
            return (found if found.is_file() else None), (meta if meta.is_file() else None)
    return None, None


@dataclass(frozen=True)
class InstanceInfo:
    """What ``<id>_instances.json`` says: scores per object id, and the class or region the objects are of
    (``target``: None = all foreground; ``recorded`` False when the file, or its target entry, is absent)."""

    scores: dict
    target: str | None = None
    recorded: bool = False


def read_instance_info(meta: Path | None) -> InstanceInfo:
    if meta is None:
        return InstanceInfo({})
    try:
        body = json.loads(meta.read_text())
        scores = {int(o["id"]): float(o["score"]) for o in body["objects"]}
    except (ValueError, KeyError, TypeError):
        raise MedsegError(f"{meta}: not the object list 'medseg predict --instances' writes; delete it or predict again") from None
    return InstanceInfo(scores, body.get("target"), "target" in body)


def map_applies(info: InstanceInfo, name: str, values: Sequence[int], options: EvaluationOptions) -> bool:
    """Whether an instance map made for ``info.target`` holds the objects of the evaluated target ``name``: the same
    class or region, or (a map of all foreground) a target made of every foreground label (WT for BraTS, the class
    of a one-class scheme)."""
    if info.target is not None:
        return info.target == name
    foreground = {v for v in options.scheme.values if v != 0}
    return set(values) == foreground


def _raw_reference(case: CaseInput, shape: tuple[int, ...]) -> np.ndarray | None:
    """Reference instance ids when the reference is a folder of one mask per object."""
    if not case.reference.path.is_dir():
        return None
    raw = np.asarray(read_mask(case.reference).array)
    return raw if raw.shape[: len(shape)] == shape or raw.size == int(np.prod(shape)) else None


def _plane(array: np.ndarray, two_d: bool) -> np.ndarray:
    return array[:, :, 0] if two_d and array.ndim == 3 else array


def evaluate_case_objects(case: CaseInput, ref_vol: Volume, pred: np.ndarray, options: EvaluationOptions,
                          settings: ObjectSettings):
    """Rows (per target), object rows and AP inputs ``{target: (reference, prediction, scores)}`` of one case, from
    the reference volume and prediction array that :func:`medseg.evaluation.evaluate.load_case` read for the voxel
    metrics (the case is read once)."""
    from medseg.evaluation import lesionwise
    from medseg.evaluation import matching as mat
    from medseg.evaluation import objects as obj

    two_d = is_image_2d(ref_vol)
    ref = _plane(np.asarray(ref_vol.array), two_d)
    pred = _plane(np.asarray(pred), two_d)
    spacing = tuple(float(s) for s in ref_vol.spacing[: ref.ndim])
    ignored = ref == IGNORE if options.scheme.has_ignore else None
    raw = _raw_reference(case, ref_vol.array.shape)
    raw = _plane(raw, two_d) if raw is not None else None
    inst_path, meta = instance_files(case.prediction.path)
    pred_inst = _plane(np.asarray(read_mask(ImageRef(inst_path)).array), two_d) if inst_path is not None else None
    if pred_inst is not None and pred_inst.shape != pred.shape:
        raise MedsegError(f"case {case.id}: instance map {inst_path} has shape {pred_inst.shape} but the prediction "
                          f"{case.prediction} has {pred.shape}; predict again with --instances")
    info = read_instance_info(meta)
    lesion_wise = settings.lesion_wise if settings.lesion_wise is not None else not two_d
    rows, object_rows, ap = [], [], {}
    for name, values in object_targets(options):
        ref_mask, pred_mask = np.isin(ref, values), np.isin(pred, values)
        if ignored is not None:
            pred_mask &= ~ignored
        ref_objects = np.where(ref_mask, raw, 0) if raw is not None else obj.label_components(ref_mask)
        if pred_inst is None:
            use_map = False
        elif info.recorded:  # the map says which target its objects are of
            use_map = map_applies(info, name, values, options)
        else:  # a map from elsewhere: used where its objects lie in the target's predicted mask
            use_map = _inside(pred_inst, pred_mask)
        pred_objects = np.where(pred_mask, pred_inst, 0) if use_map else obj.label_components(pred_mask)
        ref_objects, (pred_objects, file_ids) = obj.relabel_sequential(ref_objects), _relabel_keep(pred_objects)
        pred_scores = {i: info.scores.get(old, 1.0) for i, old in file_ids.items()} if use_map else None
        matching = mat.match_objects(ref_objects, pred_objects, settings.iou_threshold)
        row = {"id": case.id, "target": name, "n_reference": int(ref_objects.max(initial=0)),
               "n_predicted": int(pred_objects.max(initial=0)), **mat.detection_scores(matching),
               **mat.panoptic_quality(matching), "aji": obj.aggregated_jaccard(ref_objects, pred_objects)}
        if lesion_wise:
            lw = lesionwise.lesion_wise(ref_mask, pred_mask, spacing, settings.dilation, settings.min_volume, settings.hd_cap)
            row.update(lesion_dice=lw.dice, lesion_hd95=lw.hd95, lesion_tp=lw.tp, lesion_fn=lw.fn, lesion_fp=lw.fp)
        rows.append(row)
        for r in obj.object_rows(ref_objects, pred_objects, matching, spacing):
            if use_map and r.get("pred_id") is not None and r["pred_id"] == r["pred_id"]:
                r["pred_id"] = file_ids.get(int(r["pred_id"]), r["pred_id"])  # the id in <id>_instances.*
            object_rows.append({"id": case.id, "target": name, **r})
        ap[name] = (*_cropped(ref_objects, pred_objects), pred_scores)
    return rows, object_rows, ap


def _cropped(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cut to the bounding box of their objects (overlaps, hence AP, unchanged), so that pooling many
    cases for AP keeps little memory."""
    from medseg.evaluation.surface import bounding_box

    box = bounding_box((ref > 0) | (pred > 0))
    if box is None:
        box = tuple(slice(0, 1) for _ in ref.shape)
    return np.ascontiguousarray(ref[box]), np.ascontiguousarray(pred[box])


def _inside(instances: np.ndarray, mask: np.ndarray, share: float = 0.99) -> bool:
    """True when the instance map's objects lie in ``mask`` (it was made from this target)."""
    total = int((instances > 0).sum())
    return total > 0 and int(((instances > 0) & mask).sum()) >= share * total


def _relabel_keep(instances: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Ids made consecutive 1..N, with ``{new id: old id}`` (to keep the scores of ``<id>_instances.json``)."""
    old = np.unique(instances)
    old = old[old > 0]
    lut = np.zeros(int(old.max(initial=0)) + 1, np.int32)
    lut[old] = np.arange(1, old.size + 1)
    return lut[instances], {int(n): int(o) for n, o in zip(range(1, old.size + 1), old)}


def combine_objects(parts, settings: ObjectSettings) -> ObjectResult:
    """The cases' :func:`evaluate_case_objects` outputs as one :class:`ObjectResult` (AP pooled over the cases)."""
    from medseg.evaluation.precision import average_precision

    rows, object_rows, pooled = [], [], {}
    for r, o, ap in parts:
        rows += r
        object_rows += o
        for name, item in ap.items():
            pooled.setdefault(name, []).append(item)
    frame = pd.DataFrame(rows, columns=["id", "target", *OBJECT_METRICS])
    summary = summarize_objects(frame)
    ap_rows = []
    for name, images in pooled.items():
        ap = average_precision(images)
        for metric in AP_METRICS:
            value = float(ap.get(metric, math.nan))
            ap_rows.append({"target": name, "metric": metric, "count": len(images), "missing": 0, "nan": int(math.isnan(value)),
                            "mean": value, **{k: math.nan for k in SUMMARY_STATS if k not in ("count", "missing", "nan", "mean")}})
    summary = pd.concat([summary, pd.DataFrame(ap_rows, columns=summary.columns)], ignore_index=True) if ap_rows else summary
    return ObjectResult(frame, pd.DataFrame(object_rows), summary, settings)


def summarize_objects(frame: pd.DataFrame) -> pd.DataFrame:
    """Statistics per target x metric over the cases (NaN values, e.g. no lesion-wise metrics in 2D, left out)."""
    out = []
    for target, group in frame.groupby("target", sort=False):
        for metric in OBJECT_METRICS:
            values = group[metric].to_numpy(dtype=float)
            valid = values[~np.isnan(values)]
            if valid.size == 0 and metric.startswith("lesion"):
                continue
            out.append({"target": target, "metric": metric, "count": int(valid.size), "missing": 0,
                        "nan": int(values.size - valid.size), **_stats(valid)})
    return pd.DataFrame(out, columns=["target", "metric", *SUMMARY_STATS])


def write_objects(objects: ObjectResult, output: str | Path) -> list[Path]:
    """``object_metrics.csv`` (per case x target), ``objects.csv`` (per object) and ``object_summary.csv``, atomically."""
    from medseg.atomic import atomic_path

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in (("object_metrics.csv", objects.cases), ("objects.csv", objects.objects),
                        ("object_summary.csv", objects.summary)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        written.append(out / name)
    return written


def objects_dict(objects: ObjectResult) -> dict:
    """The object summary for ``summary.json``: per target, the mean of each metric and the pooled AP."""
    out: dict = {"settings": {k: getattr(objects.settings, k) for k in ("iou_threshold", "lesion_wise", "dilation",
                                                                        "min_volume", "hd_cap")}, "targets": {}}
    if objects.settings.lesion_wise is None:
        out["settings"]["lesion_wise"] = "auto (volumes yes, 2D images no)"
    for row in objects.summary.itertuples():
        value = None if isinstance(row.mean, float) and math.isnan(row.mean) else float(row.mean)
        out["targets"].setdefault(row.target, {})[row.metric] = value
    return out


def detection_plot(objects: pd.DataFrame) -> str | None:
    """Reference object size (log scale) against the IoU of its match (0 when missed), one colour per target, and
    the share detected per size bin: a PNG data URI, or None without reference objects."""
    from medseg.evaluation.report import _png
    from matplotlib.figure import Figure

    refs = objects[objects["kind"] == "reference"] if "kind" in objects else objects.iloc[:0]
    if refs.empty:
        return None
    size_col = "volume_ml" if "volume_ml" in refs and refs["volume_ml"].notna().any() else "voxels"
    fig = Figure(figsize=(9.0, 3.6))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for target, group in refs.groupby("target", sort=False):
        sizes = group[size_col].to_numpy(float)
        iou = group["iou"].fillna(0).to_numpy(float)
        ax1.scatter(sizes, iou, s=10, alpha=0.6, label=str(target))
        edges = np.unique(np.quantile(sizes, np.linspace(0, 1, 7))) if sizes.size > 1 else np.array([sizes[0], sizes[0] * 1.01])
        which = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, max(len(edges) - 2, 0))
        detected = group["detected"].astype(bool).to_numpy()
        centres = [np.sqrt(edges[i] * edges[i + 1]) if edges[i] > 0 else edges[i + 1] / 2 for i in range(len(edges) - 1)]
        rates = [detected[which == i].mean() if (which == i).any() else np.nan for i in range(len(edges) - 1)]
        ax2.plot(centres, rates, marker="o", label=str(target))
    unit = "mL" if size_col == "volume_ml" else "voxels (pixels in 2D)"
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel(f"reference object size ({unit})")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("IoU of the matched prediction (0: missed)")
    ax2.set_ylabel("share detected")
    ax2.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def objects_html(objects: ObjectResult) -> str:
    """The report's "Objects" section: per target the means (detection, PQ, AJI, lesion-wise) and pooled AP."""
    import html

    s = objects.settings
    shown = [m for m in ("precision", "recall", "f1", "pq", "aji", "lesion_dice", "lesion_hd95", *AP_METRICS)
             if (objects.summary["metric"] == m).any()]
    head = "<tr><th class=l>target</th>" + "".join(f"<th>{m}</th>" for m in shown) + "<th>objects (ref / pred)</th></tr>"
    body = []
    for target, group in objects.summary.groupby("target", sort=False):
        means = dict(zip(group["metric"], group["mean"]))
        counts = objects.cases[objects.cases["target"] == target]
        cells = "".join(f"<td>{'' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'}</td>"
                        for v in (means.get(m) for m in shown))
        body.append(f"<tr><td class=l>{html.escape(str(target))}</td>{cells}"
                    f"<td>{int(counts['n_reference'].sum())} / {int(counts['n_predicted'].sum())}</td></tr>")
    plot = detection_plot(objects.objects)
    note = (f"Objects match one-to-one at IoU &ge; {s.iou_threshold}; precision, recall, F1, PQ (= SQ &times; RQ) and "
            "AJI are means over cases; AP50/AP75/mAP (COCO-style, IoU 0.5:0.95) pool all cases' objects. "
            + (f"Lesion-wise Dice/HD95 follow BraTS 2023 (dilation {s.dilation}, lesions &le; {s.min_volume:g} mm&sup3; "
               f"dropped, {s.hd_cap:g} mm per missed or false lesion). " if (objects.summary["metric"] == "lesion_dice").any() else "")
            + "Per object: objects.csv; per case: object_metrics.csv.")
    figure = f'<div class=figs><img alt="object size vs detection" src="{plot}"></div>' if plot else ""
    return (f"<h2>Objects</h2>\n<p class=note>{note}</p>\n<table id=objects><thead>{head}</thead><tbody>{''.join(body)}"
            f"</tbody></table>\n{figure}")
