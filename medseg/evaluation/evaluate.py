"""Evaluate a set of predictions against a ground-truth manifest: matching, loading, workers, summary.

Predictions are matched to ground-truth cases by id. They come as

- a folder of ``<id>.nii.gz`` files (what ``medseg predict`` writes; ``.nii``, ``.nrrd``, ``.mha`` also work) or,
  for 2D images, ``<id>.png`` label maps (``.tif``, ``.bmp`` also work),
- a folder of per-case subfolders ``<id>/`` holding ``<id>.nii.gz`` or a single image file, or
- a manifest (CSV/JSON) whose ``label`` column points at the predictions.

References are read through the label scheme (:meth:`LabelScheme.decode`: 0/255 masks, 1-bit BMPs, inverted or
lossy masks, trimaps whose boundary is ignored); predictions are label maps in the scheme's values
(``decode(..., prediction=True)``: a 0/255 binary prediction reads as 0/1).

A prediction must lie on its ground truth's grid (shape and affine); otherwise the case stops with an error,
unless resampling (nearest neighbour) is asked for. A case without a prediction gives rows with
``status="missing"`` that the summary counts apart; it never enters a mean.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medseg.data.checks import value_problem
from medseg.data.images2d import IMAGE_2D_SUFFIXES
from medseg.data.io import ImageRef, read_mask
from medseg.data.labels import LabelScheme, get_scheme, list_schemes
from medseg.data.manifest import Manifest, read_manifest
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.evaluation.metrics import CASE_METRICS, METRICS, MetricSettings, compute_metrics_confusion, targets

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp")
SIDE_FILES = ("_prob", "_overlay", "_instances")  # what medseg predict writes beside <id>.nii.gz / <id>.png: never a prediction
MANIFEST_SUFFIXES = (".csv", ".json")
ID_COLUMNS = ("id", "status", "kind", "target")
SUMMARY_STATS = ("count", "missing", "nan", "mean", "std", "median", "q1", "q3", "min", "max")


@dataclass(frozen=True)
class CaseInput:
    """One case to evaluate: ground truth, prediction (``None`` when missing) and the scan shown in reports."""

    id: str
    reference: ImageRef
    prediction: ImageRef | None
    scan: ImageRef | None = None


@dataclass(frozen=True)
class EvaluationOptions:
    """Schemes, geometry handling and metric settings shared by all cases."""

    scheme: LabelScheme
    prediction_scheme: LabelScheme
    metrics: MetricSettings = MetricSettings()
    resample: bool = False
    atol: float = 1e-3
    objects: object | None = None  # medseg.evaluation.detection.ObjectSettings: also score objects, in the same pass


@dataclass(frozen=True)
class EvaluationResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        cases: one row per case x class/region (and one ``kind="case"`` row per case), columns ``id, status,
            kind, target``, the metrics and the file paths.
        summary: one row per class/region x metric: count, missing, nan, mean, std, median, q1, q3, min, max.
        inputs: the matched cases; options: the settings used; unmatched: predictions with no ground truth.
        confusion: voxel counts summed over the evaluated cases, index = reference class, columns = predicted
            class (names; ``background`` first), ignored voxels left out; ``None`` when no case was evaluated.
        objects: the per-object results (:class:`medseg.evaluation.detection.ObjectResult`) when asked for.
    """

    cases: pd.DataFrame
    summary: pd.DataFrame
    inputs: tuple[CaseInput, ...] = ()
    options: EvaluationOptions | None = None
    unmatched: tuple[str, ...] = field(default=())
    confusion: pd.DataFrame | None = None
    objects: object | None = None

    @property
    def distance_unit(self) -> str:
        """``"px"`` when every reference is a 2D image (spacing 1 pixel), ``"mm"`` when none is, else ``"mixed"``."""
        units = set(self.cases["unit"]) if "unit" in self.cases else {"mm"}
        return units.pop() if len(units) == 1 else "mixed"


# ----------------------------------------------------------------------------- matching
def match_predictions(predictions: str | Path, ids: Sequence[str]) -> tuple[dict[str, ImageRef | None], list[str]]:
    """Map each ground-truth id to its prediction file (``None`` when absent); also return unmatched names."""
    path = Path(predictions)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        pm = read_manifest(path)
        found = {c.id: c.label for c in pm.cases}
        return {i: found.get(i) for i in ids}, sorted(set(found) - set(ids))
    if not path.is_dir():
        raise MedsegError(f"{path}: predictions not found; give the folder 'medseg predict' wrote (<id>.nii.gz files) "
                          "or a manifest whose label column lists the predictions")
    files: dict[str, list[Path]] = {}
    folders: dict[str, Path] = {}
    known = set(ids)
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders[entry.name] = entry
        elif (suffix := _image_suffix(entry)) is not None:
            stem = entry.name[: -len(suffix)]
            if not any(stem.endswith(side) and stem[: -len(side)] in known for side in SIDE_FILES):
                files.setdefault(stem, []).append(entry)
    out: dict[str, ImageRef | None] = {}
    for case_id in ids:
        candidates = files.get(case_id, [])
        if len(candidates) > 1:
            raise MedsegError(f"{path}: case {case_id} has several predictions ({', '.join(p.name for p in candidates)}); keep one")
        found = candidates[0] if candidates else (_from_folder(folders[case_id], case_id) if case_id in folders else None)
        out[case_id] = None if found is None else ImageRef(found)
    return out, sorted((set(files) | set(folders)) - set(ids))


def is_side_file(name: str) -> bool:
    """True for a file ``medseg predict`` writes beside a label map: ``<id>_prob.nii.gz``, ``<id>_overlay.png``,
    ``<id>_instances.*`` (the instance map and its JSON)."""
    suffix = ".json" if name.endswith(".json") else _image_suffix(Path(name)) or ""
    stem = name[: len(name) - len(suffix)]
    return any(stem.endswith(side) for side in SIDE_FILES)


def _image_suffix(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def _from_folder(folder: Path, case_id: str) -> Path | None:
    images = [p for p in sorted(folder.iterdir()) if p.is_file() and _image_suffix(p) and not p.name.startswith(".")
              and not any(p.name[: -len(_image_suffix(p))] == case_id + side for side in SIDE_FILES)]
    named = [p for p in images if p.name[: -len(_image_suffix(p))] == case_id]
    if len(named) == 1:
        return named[0]
    if len(images) > 1:
        raise MedsegError(f"{folder}: holds {len(images)} images ({', '.join(p.name for p in images[:4])}...) and none is "
                          f"named {case_id}.nii.gz; name the prediction {case_id}.nii.gz or list predictions in a manifest")
    return images[0] if images else None


# ----------------------------------------------------------------------------- loading one case
def resample_nearest(volume: Volume, target: Volume) -> np.ndarray:
    """``volume``'s array resampled onto ``target``'s grid by nearest neighbour (zero outside)."""
    from scipy import ndimage

    nd = target.spatial_ndim
    m = np.linalg.inv(volume.affine) @ target.affine
    idx = list(range(nd))
    return ndimage.affine_transform(volume.array, m[np.ix_(idx, idx)], offset=m[idx, 3], output_shape=target.shape,
                                    order=0, mode="constant", cval=0)


def distance_unit(reference: ImageRef) -> str:
    """Unit of the distances of a case: ``"px"`` for a 2D image reference (spacing 1 pixel), else ``"mm"``."""
    name = reference.path.name.lower()
    return "px" if any(name.endswith(s) for s in IMAGE_2D_SUFFIXES) else "mm"


def is_image_2d(volume: Volume) -> bool:
    """True for a 2D image read as a volume one pixel thick ``(W, H, 1)`` (evaluated as a 2D array)."""
    return bool(volume.meta.get("image2d")) and volume.array.ndim == 3 and volume.array.shape[2] == 1


def load_case(case: CaseInput, options: EvaluationOptions) -> tuple[Volume, np.ndarray]:
    """Ground truth volume (decoded to label values, :data:`~medseg.data.labels.IGNORE` where ignored) and the
    prediction's array on its grid, in the ground truth's label convention."""
    ref = read_mask(case.reference)
    pred = read_mask(case.prediction)
    for what, path, vol in (("ground truth", case.reference, ref), ("prediction", case.prediction, pred)):
        _, bad = value_problem(vol.array)
        if bad:
            raise MedsegError(f"case {case.id}: {what} {path}: {bad} voxels are NaN or infinite; a label map holds integer "
                              "class values: fix or re-export it")
    try:
        if options.scheme.decodes:
            ref = ref.with_array(options.scheme.decode(ref.array, str(case.reference)))
        if options.prediction_scheme.decodes:
            pred = pred.with_array(options.prediction_scheme.decode(pred.array, str(case.prediction), prediction=True))
    except MedsegError as err:
        raise MedsegError(f"case {case.id}: {err}; if the prediction uses another label convention, pass --prediction-scheme") from None
    if pred.array.ndim != ref.array.ndim:
        raise MedsegError(f"case {case.id}: prediction {case.prediction} is {pred.array.ndim}D with shape {pred.array.shape} but the "
                          f"ground truth {case.reference} is {ref.array.ndim}D {ref.array.shape}; write one label map per case")
    array = pred.array
    if not pred.same_grid(ref, atol=options.atol):
        if not options.resample:
            diff = float(np.abs(pred.affine - ref.affine).max())
            what = f"shape {pred.shape} vs {ref.shape}" if pred.shape != ref.shape else f"affine differs by up to {diff:.4g} mm"
            raise MedsegError(f"case {case.id}: prediction {case.prediction} is not on the ground truth's grid ({what}, "
                              f"ground truth {case.reference}); write predictions in the scan's geometry (medseg predict does) "
                              "or pass --resample to resample them by nearest neighbour")
        array = resample_nearest(pred, ref)
    if options.prediction_scheme != options.scheme:
        try:
            array = options.prediction_scheme.convert_to(array, options.scheme)
        except MedsegError as err:
            raise MedsegError(f"case {case.id}: prediction {case.prediction}: {err}") from None
    return ref, array


def evaluate_case(case: CaseInput, options: EvaluationOptions) -> list[dict]:
    """Rows of one case (see :attr:`EvaluationResult.cases`); a missing prediction gives ``status="missing"`` rows."""
    return _evaluate_case(case, options)[0]


Confusion = tuple[list[int], np.ndarray]  # label values, counts [reference, prediction]


def _evaluate_case(case: CaseInput, options: EvaluationOptions) -> tuple[list[dict], Confusion | None, tuple | None]:
    base = {"id": case.id, "unit": distance_unit(case.reference), "prediction": str(case.prediction or ""),
            "reference": str(case.reference)}
    if not _has_prediction(case):
        names = [(k, n) for k, n, _ in targets(options.scheme, [], options.metrics.targets)] + [("case", "all")]
        return [{**base, "status": "missing", "kind": k, "target": n} for k, n in names], None, None
    ref, pred = load_case(case, options)
    objects = None
    if options.objects is not None:  # per-object scores on the arrays just read
        from medseg.evaluation.detection import evaluate_case_objects

        objects = evaluate_case_objects(case, ref, pred, options, options.objects)
    ref_array, spacing = ref.array, ref.spacing
    if is_image_2d(ref):  # (W, H, 1): surfaces and distances in the plane, not in a slab one voxel thick
        ref_array, pred, spacing = ref_array[:, :, 0], pred[:, :, 0], spacing[:2]
    try:
        df, values, counts = compute_metrics_confusion(pred, ref_array, spacing, options.scheme, options.metrics)
    except MedsegError as err:
        raise MedsegError(f"case {case.id}: {err} (prediction {case.prediction}, ground truth {case.reference}); if the "
                          f"prediction uses another label convention, pass --prediction-scheme") from None
    return [{**base, "status": "ok", **row} for row in df.to_dict("records")], (values, counts), objects


def _has_prediction(case: CaseInput) -> bool:
    return case.prediction is not None and case.prediction.path.exists()


def sum_confusions(confusions: Sequence[Confusion], scheme: LabelScheme) -> pd.DataFrame | None:
    """Per-case confusion matrices summed on the union of their label values, as a DataFrame of class names
    (index = reference, columns = prediction); ``None`` when there is none."""
    if not confusions:
        return None
    values = sorted(set().union(*[v for v, _ in confusions]))
    pos = {v: i for i, v in enumerate(values)}
    total = np.zeros((len(values), len(values)), dtype=np.int64)
    for vals, counts in confusions:
        idx = [pos[v] for v in vals]
        total[np.ix_(idx, idx)] += counts
    names = {v: n for n, v in scheme.labels.items()}
    labels = ["background" if v == 0 else names.get(v, str(v)) for v in values]
    frame = pd.DataFrame(total, index=pd.Index(labels, name="reference"), columns=pd.Index(labels, name="prediction"))
    frame.attrs["values"] = values
    return frame


# ----------------------------------------------------------------------------- the whole set
def evaluate(predictions: str | Path, manifest: str | Path | Manifest, scheme: str | dict | LabelScheme | None = None, *,
             prediction_scheme: str | dict | LabelScheme | None = None, settings: MetricSettings = MetricSettings(),
             resample: bool = False, workers: int = 1, progress: bool = False, objects=None) -> EvaluationResult:
    """Evaluate predictions against the labels of a ground-truth manifest.

    Args:
        predictions: folder of ``<id>.nii.gz`` (or ``<id>/`` subfolders), or a manifest listing predictions as labels.
        manifest: ground-truth manifest (path or :class:`Manifest`); its first channel is the scan shown in reports.
        scheme: label scheme of the ground truth (default: the manifest's ``label_scheme``).
        prediction_scheme: convention of the predictions when it differs (e.g. ``"brats2023"`` for ET = 3).
        settings: surface-Dice tolerance and empty-mask rule; resample: nearest-neighbour resampling of
            predictions that are not on the ground truth's grid; workers: processes; progress: a tqdm bar.
        objects: :class:`medseg.evaluation.detection.ObjectSettings` to also score objects (``result.objects``).

    Example:
        >>> res = evaluate("preds/", "cases.csv", "brats", workers=2)  # doctest: +SKIP
        >>> res.summary.query("target == 'WT' and metric == 'dice'")[["count", "mean"]]  # doctest: +SKIP
    """
    gt = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    if len(set(gt.ids)) != len(gt.ids):
        dup = sorted({i for i in gt.ids if gt.ids.count(i) > 1})
        raise MedsegError(f"{gt.path or 'manifest'}: case ids {dup} appear more than once; case ids must be unique")
    name = scheme or gt.label_scheme
    if not name:
        raise MedsegError(f"{gt.path or 'manifest'}: no label scheme given and the manifest names none; pass --scheme "
                          f"(one of {', '.join(list_schemes())})")
    options = EvaluationOptions(get_scheme(name), get_scheme(prediction_scheme or name), settings, resample, objects=objects)
    unlabelled = [c.id for c in gt.cases if c.label is None]
    if unlabelled:
        raise MedsegError(f"{gt.path or 'manifest'}: cases {unlabelled[:5]} have no label; evaluation needs ground truth "
                          "for every case: add their label paths or remove them from the manifest")
    found, unmatched = match_predictions(predictions, gt.ids)
    inputs = tuple(CaseInput(c.id, c.label, found[c.id], next(iter(c.images.values()), None)) for c in gt.cases)
    if inputs and not any(_has_prediction(c) for c in inputs):
        raise MedsegError(_no_predictions_message(predictions, inputs, unmatched))
    results = _run(inputs, options, workers, progress)
    cases = _frame([r for case_rows, _, _ in results for r in case_rows])
    confusion = sum_confusions([c for _, c, _ in results if c is not None], options.scheme)
    found_objects = None
    if objects is not None:
        from medseg.evaluation.detection import combine_objects

        found_objects = combine_objects([o for _, _, o in results if o is not None], objects)
    return EvaluationResult(cases, summarize(cases), inputs, options, tuple(unmatched), confusion, found_objects)


def _no_predictions_message(predictions: str | Path, inputs: Sequence[CaseInput], unmatched: Sequence[str]) -> str:
    first = inputs[0]
    suffix = ".png" if distance_unit(first.reference) == "px" else ".nii.gz"
    text = (f"{predictions}: no prediction for any of the {len(inputs)} ground-truth cases; expected files named by case id, "
            f"e.g. {first.id}{suffix} (a folder of <id>.nii.gz / <id>.png / <id>.tif / <id>.bmp files or <id>/ subfolders, "
            "or a manifest listing predictions)")
    if unmatched:
        text += f"; the predictions found ({', '.join(unmatched[:3])}{' ...' if len(unmatched) > 3 else ''}) match no case id"
    elif Path(predictions).is_file():
        text += "; the files the manifest lists do not exist"
    return text + ": check the folder and the manifest"


def _run(inputs: Sequence[CaseInput], options: EvaluationOptions, workers: int,
         progress: bool) -> list[tuple[list[dict], Confusion | None, tuple | None]]:
    from tqdm import tqdm

    bar = tqdm(total=len(inputs), desc="evaluate", unit="case", disable=not progress)
    results: list[tuple[list[dict], Confusion | None, tuple | None] | None] = [None] * len(inputs)
    try:
        if workers <= 1 or len(inputs) <= 1:
            for i, case in enumerate(inputs):
                results[i] = _evaluate_case(case, options)
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(inputs))) as pool:
                futures = {pool.submit(_evaluate_case, case, options): i for i, case in enumerate(inputs)}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in METRICS:
        if col not in df:
            df[col] = np.nan
    df[list(METRICS)] = df[list(METRICS)].astype(float)
    return df[[*ID_COLUMNS, *METRICS, "unit", "prediction", "reference"]]


def summarize(cases: pd.DataFrame) -> pd.DataFrame:
    """Statistics per class/region x metric over the evaluated cases.

    ``count`` is the number of values the statistics cover; ``missing`` the cases without a prediction; ``nan``
    the evaluated cases where the metric is undefined (e.g. both masks empty under ``empty="nan"``). Neither
    enters a statistic.
    """
    rows = []
    for (kind, target), group in cases.groupby(["kind", "target"], sort=False):
        ok = group[group["status"] == "ok"]
        missing = int((group["status"] == "missing").sum())
        for metric in METRICS:
            values = ok[metric].to_numpy(dtype=float)
            if (kind == "case") != (metric in CASE_METRICS):
                continue
            valid = values[~np.isnan(values)]
            rows.append({"kind": kind, "target": target, "metric": metric, "count": int(valid.size), "missing": missing,
                         "nan": int(values.size - valid.size), **_stats(valid)})
    return pd.DataFrame(rows, columns=["kind", "target", "metric", *SUMMARY_STATS])


def _stats(v: np.ndarray) -> dict[str, float]:
    if v.size == 0:
        return {k: math.nan for k in ("mean", "std", "median", "q1", "q3", "min", "max")}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "median": float(med),
            "q1": float(q1), "q3": float(q3), "min": float(v.min()), "max": float(v.max())}
