"""Evaluation reports: ``cases.csv``, ``summary.csv``, ``summary.json``, ``confusion.csv`` and a self-contained
``report.html``.

The HTML page needs no network: its table sorting is a few lines of inline JavaScript and its images (box/strip
plots of Dice and HD95, the confusion matrix as a heat-map, overlays of the best, median and worst cases: an axial
slice for volumes, the whole picture in colour for 2D images) are PNGs embedded as data URIs, drawn with
matplotlib's Agg canvas (no pyplot, no global backend change).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.atomic import atomic_path, write_text_atomic
from medseg.data.labels import IGNORE
from medseg.evaluation.evaluate import EvaluationResult, is_image_2d, load_case
from medseg.evaluation.metrics import CASE_METRICS, semantic_metrics

PLOT_METRICS = ("dice", "hd95")
TABLE_METRICS = ("dice", "iou", "precision", "recall", "specificity", "hd95", "assd", "nsd", "ref_ml", "pred_ml", "vol_diff_ml")


def case_ranking(cases: pd.DataFrame) -> pd.DataFrame:
    """Evaluated cases ranked worst first by their mean Dice over regions (over classes when there are none).

    Returns columns ``id`` and ``score``; missing cases are left out.
    """
    ok = cases[cases["status"] == "ok"]
    kind = "region" if (ok["kind"] == "region").any() else "class"
    scores = ok[ok["kind"] == kind].groupby("id", sort=False)["dice"].mean()
    return scores.rename("score").reset_index().sort_values(["score", "id"], kind="stable").reset_index(drop=True)


def pick_cases(ranking: pd.DataFrame) -> dict[str, str]:
    """``{"worst": id, "median": id, "best": id}`` from :func:`case_ranking` (fewer when there are fewer cases)."""
    if ranking.empty:
        return {}
    ids = ranking["id"].tolist()
    out: dict[str, str] = {}
    for label, index in (("worst", 0), ("median", (len(ids) - 1) // 2), ("best", len(ids) - 1)):
        if ids[index] not in out.values():
            out[label] = ids[index]
    return out


def _plain(value):
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def summary_dict(result: EvaluationResult) -> dict:
    """What ``summary.json`` holds: settings, case counts, the ranking and the statistics (NaN as null)."""
    cases = result.cases
    status = cases.drop_duplicates("id")["status"]
    options = result.options
    return {
        "scheme": options.scheme.name if options else None,
        "prediction_scheme": options.prediction_scheme.name if options else None,
        "settings": {"tolerance_mm": options.metrics.tolerance_mm, "empty": options.metrics.empty,
                     "resample": options.resample} if options else {},
        "cases": int(status.size), "evaluated": int((status == "ok").sum()), "missing": int((status == "missing").sum()),
        "missing_ids": cases.loc[cases["status"] == "missing", "id"].drop_duplicates().tolist(),
        "unmatched_predictions": list(result.unmatched),
        "distance_unit": result.distance_unit,
        "ranking": [{k: _plain(v) for k, v in r.items()} for r in case_ranking(cases).to_dict("records")],
        "summary": [{k: _plain(v) for k, v in r.items()} for r in result.summary.to_dict("records")],
        "confusion": confusion_dict(result.confusion),
    }


def confusion_dict(confusion: pd.DataFrame | None) -> dict | None:
    """The summed confusion matrix (rows = reference, columns = prediction) and the scores pooled over all
    evaluated voxels of all cases: pixel accuracy, mean pixel accuracy, mean IoU, frequency-weighted IoU and the
    IoU of each class (:func:`~medseg.evaluation.metrics.semantic_metrics` on the summed counts)."""
    if confusion is None:
        return None
    counts = confusion.to_numpy()
    diag = np.diag(counts).astype(float)
    union = counts.sum(axis=0) + counts.sum(axis=1) - diag
    iou = {name: (float(d / u) if u else None) for name, d, u in zip(confusion.index, diag, union)}
    return {"classes": list(confusion.index), "values": list(confusion.attrs.get("values", [])),
            "rows": "reference", "columns": "prediction", "counts": counts.tolist(),
            "pooled": {**{k: _plain(v) for k, v in semantic_metrics(counts.T).items()}, "iou": iou}}


def write_report(result: EvaluationResult, output: str | Path, *, overlays: bool = True) -> Path:
    """Write ``cases.csv``, ``summary.csv``, ``summary.json``, ``confusion.csv`` and ``report.html`` into ``output``
    (atomically); ``confusion.csv`` holds the voxel counts summed over the evaluated cases (rows: reference class,
    columns: predicted class) and is left out when no case was evaluated.

    Args:
        result: from :func:`medseg.evaluation.evaluate`.
        output: report folder (created).
        overlays: draw overlays (scan + ground-truth and prediction contours) of the best, median and worst
            cases: an axial slice of the first channel for volumes, the whole image (in colour when it has three
            channels) for 2D images.

    With per-object results (``result.objects``: ``evaluate(..., objects=ObjectSettings())``) it also writes
    ``objects.csv``, ``object_metrics.csv``, ``object_summary.csv``, an "objects" entry in ``summary.json`` and an
    "Objects" section (detection summary, object size vs detected) in the page.

    Returns:
        The path of ``report.html``.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("cases.csv", result.cases), ("summary.csv", result.summary)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    if result.confusion is not None:
        with atomic_path(out / "confusion.csv") as tmp:
            result.confusion.to_csv(tmp, index_label="reference/prediction")
    data = summary_dict(result)
    sections = ""
    objects = result.objects
    if objects is not None:
        from medseg.evaluation.detection import objects_dict, objects_html, write_objects

        write_objects(objects, out)
        data["objects"] = objects_dict(objects)
        sections = objects_html(objects)
    write_text_atomic(out / "summary.json", json.dumps(data, indent=2) + "\n")
    write_text_atomic(out / "report.html", render_html(result, data, overlays=overlays, sections=sections))
    return out / "report.html"


# ----------------------------------------------------------------------------- figures
def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_distributions(cases: pd.DataFrame, unit: str = "mm") -> str:
    """Box plots with the case values as points, Dice and HD95 per region (or class); a PNG data URI."""
    from matplotlib.figure import Figure

    ok = cases[cases["status"] == "ok"]
    kind = "region" if (ok["kind"] == "region").any() else "class"
    ok = ok[ok["kind"] == kind]
    names = list(dict.fromkeys(ok["target"]))
    fig = Figure(figsize=(4.2 * len(PLOT_METRICS), 3.6))
    rng = np.random.default_rng(0)
    for i, metric in enumerate(PLOT_METRICS):
        ax = fig.add_subplot(1, len(PLOT_METRICS), i + 1)
        groups = [ok.loc[ok["target"] == n, metric].dropna().to_numpy() for n in names]
        ax.boxplot([g if g.size else [np.nan] for g in groups], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        for j, g in enumerate(groups):
            ax.plot(j + 1 + rng.uniform(-0.12, 0.12, g.size), g, "o", ms=3.5, alpha=0.7, color="tab:blue")
        ax.set_title(f"{metric} per {kind}" + (f" ({unit})" if metric == "hd95" else ""))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_confusion(confusion: pd.DataFrame) -> str:
    """Heat-map of the confusion matrix, rows (reference classes) normalised to 1, each cell labelled with its
    share of the row and its count; a PNG data URI."""
    from matplotlib.figure import Figure

    counts = confusion.to_numpy().astype(np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(confusion)
    size = min(2.2 + 1.0 * k, 12.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [str(n) for n in confusion.index]
    ax.set_xticks(range(k), [str(n) for n in confusion.columns], rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{share[i, j]:.1%}\n{counts[i, j]:,}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the reference class")
    ax.set_title("confusion matrix (row-normalised, counts summed over cases)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _axial_axis(orientation: tuple[str, ...]) -> int:
    return next((i for i, c in enumerate(orientation) if c in "SI"), len(orientation) - 1)


def plot_overlay(result: EvaluationResult, case_id: str, label: str) -> str | None:
    """Axial slice of the case's scan with ground-truth (green) and prediction (red) contours (a PNG data URI);
    for a 2D image, the whole picture (colour when it has three channels) upright, with the contours and the
    agreement filled in colour beside it."""
    from matplotlib.figure import Figure

    from medseg.data.io import read_volume

    case = next(c for c in result.inputs if c.id == case_id)
    ref, pred = load_case(case, result.options)
    ignored = ref.array == IGNORE if result.options.scheme.has_ignore else np.zeros(ref.array.shape, bool)
    fg_ref, fg_pred = (ref.array != 0) & ~ignored, pred != 0
    if is_image_2d(ref):
        return _plot_overlay_2d(case, fg_ref, fg_pred, ignored, label)
    scan = read_volume(case.scan).array if case.scan is not None and case.scan.path.exists() else None
    if scan is not None and tuple(scan.shape[: ref.array.ndim]) != ref.shape:
        scan = None
    if ref.array.ndim == 3:
        axis = _axial_axis(ref.orientation)
        area = np.moveaxis(fg_ref if fg_ref.any() else fg_pred, axis, 0).reshape(ref.shape[axis], -1).sum(axis=1)
        k = int(area.argmax()) if area.any() else ref.shape[axis] // 2
        take = lambda a: np.rot90(np.take(a, k, axis=axis))  # noqa: E731
        where = f"slice {k} of axis {axis}"
    else:
        take, where = np.rot90, "2D"
    fig = Figure(figsize=(3.6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(take(scan) if scan is not None else np.zeros(take(fg_ref).shape), cmap="gray")
    for mask, color in ((fg_ref, "lime"), (fg_pred, "red")):
        sl = take(mask).astype(float)
        if sl.any():
            ax.contour(sl, levels=[0.5], colors=color, linewidths=1.0)
    ax.set_title(f"{label}: {case_id}\n{where}", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    return _png(fig)


def _picture_2d(case, shape: tuple[int, int]) -> np.ndarray | None:
    """The case's 2D image for display, rows = y: ``(H, W, 3)`` colour or ``(H, W)`` grey in [0, 1]; the whole
    file is read (all colour channels), whatever channel the manifest names. ``None`` without a usable image."""
    from medseg.data.io import read_volume

    if case.scan is None or not case.scan.path.exists():
        return None
    array = read_volume(case.scan.path).array
    if tuple(array.shape[:2]) != tuple(shape) or array.ndim < 3 or array.shape[2] != 1:
        return None
    picture = array[:, :, 0].swapaxes(0, 1).astype(np.float64)  # (W, H[, 3]) -> (H, W[, 3])
    if picture.ndim == 3 and picture.shape[2] != 3:
        picture = picture[..., 0]
    lo, hi = (0.0, 255.0) if array.dtype == np.uint8 else tuple(np.percentile(picture, [0.5, 99.5]))
    return np.clip((picture - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def _plot_overlay_2d(case, fg_ref: np.ndarray, fg_pred: np.ndarray, ignored: np.ndarray, label: str) -> str:
    """A 2D case: the picture with ground-truth (green) and prediction (red) contours, and beside it the
    agreement filled in colour (yellow both, green missed, red false positive, grey ignored)."""
    from matplotlib.figure import Figure

    ref2, pred2, ign2 = (a[:, :, 0].T for a in (fg_ref, fg_pred, ignored))  # rows = y: the picture upright
    picture = _picture_2d(case, fg_ref.shape[:2])
    h, w = ref2.shape
    base = picture if picture is not None else np.zeros((h, w))
    panel = 3.6 * min(max(w / h, 0.5), 2.0)
    fig = Figure(figsize=(2 * panel + 0.3, 4.0))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.04)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax in (ax1, ax2):
        ax.imshow(base, cmap=None if base.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    for mask, color in ((ref2, "lime"), (pred2, "red")):
        if mask.any():
            ax1.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.2)
    fill = np.zeros((h, w, 4))
    for mask, rgba in (((ref2 & pred2), (1.0, 0.9, 0.0, 0.55)), ((ref2 & ~pred2), (0.0, 0.9, 0.0, 0.6)),
                       ((pred2 & ~ref2), (1.0, 0.0, 0.0, 0.6)), (ign2, (0.6, 0.6, 0.6, 0.75))):
        fill[mask] = rgba
    ax2.imshow(fill, interpolation="nearest")
    ax1.set_title(f"{label}: {case.id}\ncontours: ground truth green, prediction red", fontsize=8)
    ax2.set_title("yellow both, green missed, red false positive" + (", grey ignored" if ign2.any() else ""), fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------- HTML
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), asc = th.dataset.order !== 'asc';
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      th.dataset.order = asc ? 'asc' : 'desc';
    });
  });
  table.classList.add('sortable-ready');
});
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
"""

_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px} th{background:#eee;cursor:pointer}
td.l,th.l{text-align:left} .figs img{margin:4px;border:1px solid #ddd} .note{color:#555;font-size:13px}"""


def _cell(value, digits: int = 4, css: str = "") -> str:
    v = _plain(value)
    shown = "—" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else html.escape(str(v)))
    data = "" if v is None else html.escape(str(v))
    return f'<td{" class=" + css if css else ""} data-value="{data}">{shown}</td>'


def _table(header: list[str], rows: list[str], table_id: str) -> str:
    head = "".join(f'<th class="l">{html.escape(h)}</th>' if i < 2 else f"<th>{html.escape(h)}</th>" for i, h in enumerate(header))
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary_table(summary: pd.DataFrame, unit: str = "mm") -> str:
    rows = []
    for (kind, target), group in summary.groupby(["kind", "target"], sort=False):
        stats = group.set_index("metric")
        cells = [_cell(kind, css="l"), _cell(target, css="l")]
        n = int(stats["count"].max()) if len(stats) else 0
        cells += [_cell(n), _cell(int(stats["missing"].iloc[0]) if len(stats) else 0)]
        for metric in (*TABLE_METRICS, *CASE_METRICS):
            cells.append(_cell(stats.loc[metric, "mean"]) if metric in stats.index else _cell(None))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    named = [f"{m} ({unit})" if m in ("hd95", "assd") else m for m in TABLE_METRICS]
    header = ["kind", "target", "n", "missing", *named, *CASE_METRICS]
    return _table(header, rows, "summary")


def _pooled_table(confusion: dict) -> str:
    pooled = confusion["pooled"]
    cells = [_cell("all cases", css="l"), _cell("pooled", css="l")]
    cells += [_cell(pooled[m]) for m in CASE_METRICS] + [_cell(pooled["iou"][c]) for c in confusion["classes"]]
    header = ["cases", "", *CASE_METRICS, *[f"iou {c}" for c in confusion["classes"]]]
    head = "".join(f'<th class="l">{html.escape(h)}</th>' if i < 2 else f"<th>{html.escape(h)}</th>" for i, h in enumerate(header))
    return f'<table id="pooled"><thead><tr>{head}</tr></thead><tbody><tr>{"".join(cells)}</tr></tbody></table>'


def _cases_table(cases: pd.DataFrame, ranking: pd.DataFrame) -> str:
    ok = cases[cases["kind"] != "case"]
    kind = "region" if (ok["kind"] == "region").any() else "class"
    names = list(dict.fromkeys(ok.loc[ok["kind"] == kind, "target"]))
    score = dict(zip(ranking["id"], ranking["score"]))
    rows = []
    for case_id, group in cases.groupby("id", sort=False):
        g = group[group["kind"] == kind].set_index("target")
        cells = [_cell(case_id, css="l"), _cell(group["status"].iloc[0], css="l"), _cell(score.get(case_id))]
        for metric in PLOT_METRICS:
            cells += [_cell(g[metric].get(n)) for n in names]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = ["id", "status", f"mean dice ({kind}s)", *[f"{m} {n}" for m in PLOT_METRICS for n in names]]
    return _table(header, rows, "cases")


def render_html(result: EvaluationResult, data: dict, overlays: bool = True, sections: str = "") -> str:
    """The report page as a string (see :func:`write_report`)."""
    ranking = case_ranking(result.cases)
    unit = data.get("distance_unit", "mm")
    figures = []
    if not ranking.empty:
        figures.append(f'<img alt="distributions" src="{plot_distributions(result.cases, unit)}">')
    chosen = pick_cases(ranking) if overlays and result.options is not None else {}
    overlay_imgs = [f'<img alt="{k} case {html.escape(v)}" src="{src}">'
                    for k, v in chosen.items() if (src := plot_overlay(result, v, k)) is not None]
    s = data["settings"]
    notes = (f"scheme <b>{html.escape(str(data['scheme']))}</b> (predictions: {html.escape(str(data['prediction_scheme']))}); "
             f"{data['evaluated']} of {data['cases']} cases evaluated, <b>{data['missing']} missing</b>"
             + (f" ({html.escape(', '.join(data['missing_ids']))})" if data["missing_ids"] else "")
             + f"; surface Dice tolerance {s.get('tolerance_mm')} {'px' if unit == 'px' else 'mm'}; both-empty rule '{s.get('empty')}'. "
             "Means cover the n cases where the metric is defined; missing cases enter no mean. F1 (cases.csv) equals Dice "
             "for each class against the rest.")
    if unit == "px":
        notes += (" <b>Distances (HD95, ASSD) are in pixels (px)</b>: the references are 2D images, which have no "
                  "physical spacing (1 pixel); the *_ml columns are pixel counts / 1000.")
    elif unit == "mixed":
        notes += " Distances are in mm for volumes and in pixels for 2D images: see the unit column of cases.csv."
    if result.options is not None and result.options.scheme.has_ignore:
        notes += (f" Mask file values {list(result.options.scheme.ignore)} are ignored (scheme "
                  f"'{html.escape(result.options.scheme.name)}'): those pixels enter no metric.")
    confusion = data.get("confusion")
    confusion_html = ""
    if confusion is not None and result.confusion is not None:
        confusion_html = ("<h2>Confusion matrix</h2>\n<p class=note>Voxel counts summed over the evaluated cases "
                          "(confusion.csv: rows reference, columns prediction), colours normalised per reference class; "
                          "scores pooled over all those voxels:</p>\n" + _pooled_table(confusion)
                          + f'\n<div class=figs><img alt="confusion matrix" src="{plot_confusion(result.confusion)}"></div>')
    is_2d = unit == "px"
    overlay_note = ("Left: the image with ground truth (green) and prediction (red) contours (all non-zero labels); "
                    "right: agreement filled in colour (yellow both, green missed, red false positive, grey ignored)."
                    if is_2d else "Green: ground truth; red: prediction (all non-zero labels), on the axial slice with the most ground truth.")
    extra = (f"<p class=note>Predictions without ground truth (ignored): {html.escape(', '.join(data['unmatched_predictions']))}</p>"
             if data["unmatched_predictions"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medseg evaluation</title><style>{_STYLE}</style></head>
<body>
<h1>Segmentation evaluation</h1>
<p class=note>{notes}</p>{extra}
<h2>Summary (means; click a column to sort)</h2>
{_summary_table(result.summary, unit)}
<h2>Distributions</h2>
<div class=figs>{''.join(figures)}</div>
{confusion_html}
{sections}
<h2>Worst, median and best cases</h2>
<p class=note>{overlay_note}</p>
<div class=figs>{''.join(overlay_imgs)}</div>
<h2>Cases</h2>
{_cases_table(result.cases, ranking)}
<p class=note>Full statistics: summary.csv / summary.json; all values per case: cases.csv.</p>
<script>{_SCRIPT}</script>
</body></html>
"""
