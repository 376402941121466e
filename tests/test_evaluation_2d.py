"""Evaluation of 2D images: masks read through the label scheme, ignored pixels, semantic-segmentation scores
against scikit-learn on real masks (PH2 skin lesions, Oxford-IIIT Pet trimaps), units, confusion matrix, report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.cli import main
from medseg.data.images2d import write_image_2d
from medseg.data.io import ImageRef
from medseg.data.labels import IGNORE
from medseg.data.manifest import Case, Manifest, write_manifest
from medseg.errors import MedsegError
from medseg.evaluation import compute_metrics, evaluate, write_report

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is needed to check the metrics: pip install scikit-learn")


# ----------------------------------------------------------------------------- helpers
def _rows(path: Path) -> np.ndarray:
    """A mask file as PIL reads it: (rows = y, cols = x), one channel."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _write_pred(rows: np.ndarray, path: Path) -> None:
    """Write a (rows, cols) label map as a grey PNG (medseg arrays are (x, y, 1))."""
    write_image_2d(np.ascontiguousarray(rows.T)[:, :, None].astype(np.uint8), path)


def _manifest(cases: list[tuple[str, Path, Path]], scheme: str, path: Path) -> Path:
    """Manifest of (id, colour image, mask) with the R, G, B channels as file[0..2] (as the 2D layouts write it)."""
    items = tuple(Case(cid, {ch: ImageRef(img, i) for i, ch in enumerate("RGB")}, mask) for cid, img, mask in cases)
    return write_manifest(Manifest(("R", "G", "B"), items, scheme), path)


def _hd95(pred: np.ndarray, ref: np.ndarray) -> float:
    """Brute force: 4-connected surfaces (outside the image counts as outside), nearest-surface distances in px."""
    cross = ndimage.generate_binary_structure(2, 1)
    ps = np.argwhere(pred & ~ndimage.binary_erosion(pred, cross, border_value=0))
    rs = np.argwhere(ref & ~ndimage.binary_erosion(ref, cross, border_value=0))
    d_pr, d_rp = cKDTree(rs).query(ps)[0], cKDTree(ps).query(rs)[0]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def _check_against_sklearn(res, cid: str, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Compare the rows of case ``cid`` with scikit-learn on the flat (already unignored) labels y, p; return the
    scikit-learn confusion matrix."""
    rows = res.cases[res.cases["id"] == cid].set_index("kind")
    fg, case = rows.loc["class"], rows.loc["case"]
    assert case["pixel_accuracy"] == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
    assert case["mean_pixel_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, p), abs=1e-12)
    assert case["mean_iou"] == pytest.approx(sk.jaccard_score(y, p, average="macro"), abs=1e-12)
    assert case["fw_iou"] == pytest.approx(sk.jaccard_score(y, p, average="weighted"), abs=1e-12)
    assert fg["iou"] == pytest.approx(sk.jaccard_score(y, p, average=None)[1], abs=1e-12)
    assert fg["dice"] == pytest.approx(sk.f1_score(y, p, average=None)[1], abs=1e-12)
    assert fg["f1"] == pytest.approx(sk.f1_score(y, p), abs=1e-12)
    assert fg["precision"] == pytest.approx(sk.precision_score(y, p), abs=1e-12)
    assert fg["recall"] == pytest.approx(sk.recall_score(y, p), abs=1e-12)
    cm = sk.confusion_matrix(y, p, labels=[0, 1])
    assert fg["ref_ml"] == pytest.approx(cm[1].sum() / 1000) and fg["pred_ml"] == pytest.approx(cm[:, 1].sum() / 1000)
    return cm


def _perturb(mask: np.ndarray, i: int) -> np.ndarray:
    """Dilated, eroded, shifted (x and y) or dilated-then-holed copies of a (rows, cols) mask."""
    if i % 4 == 0:
        return ndimage.binary_dilation(mask, iterations=4 + i)
    if i % 4 == 1:
        return ndimage.binary_erosion(mask, iterations=3 + i)
    if i % 4 == 2:
        return ndimage.shift(mask.astype(np.uint8), (7 + i, -(5 + i)), order=0).astype(bool)
    out = ndimage.binary_dilation(mask, iterations=3)
    out[::9, ::9] = False
    return out


# ----------------------------------------------------------------------------- real masks against scikit-learn
def test_skin_lesion_masks_against_sklearn(shared_data, tmp_path):
    masks = sorted((shared_data / "skin_ph2" / "masks").glob("IMD*_lesion.bmp"))[:5]
    if len(masks) < 4:
        pytest.skip(f"fewer than 4 PH2 masks in {shared_data / 'skin_ph2' / 'masks'}")
    preds, cases, truth = tmp_path / "preds", [], {}
    preds.mkdir()
    for i, mask in enumerate(masks):  # 1-bit BMPs (True/False) and IMD002, an RGB 0/255 BMP
        cid = mask.name.replace("_lesion.bmp", "")
        ref = _rows(mask) > 0
        assert 0 < ref.mean() < 1
        pred = _perturb(ref, i)
        _write_pred(pred.astype(np.uint8) * (255 if i == 0 else 1), preds / f"{cid}.png")  # 0/255 read as 0/1
        cases.append((cid, shared_data / "skin_ph2" / "images" / f"{cid}.bmp", mask))
        truth[cid] = (ref, pred)
    res = evaluate(preds, _manifest(cases, "binary", tmp_path / "gt.csv"))
    assert (res.cases["status"] == "ok").all() and set(res.cases["unit"]) == {"px"} and res.distance_unit == "px"
    total = np.zeros((2, 2), np.int64)
    for cid, (ref, pred) in truth.items():
        total += _check_against_sklearn(res, cid, ref.ravel().astype(int), pred.ravel().astype(int))
        fg = res.cases.query("id == @cid and kind == 'class'").iloc[0]
        assert fg["hd95"] == pytest.approx(_hd95(pred, ref), abs=1e-9)  # in the image plane, in pixels
    assert res.confusion.to_numpy().tolist() == total.tolist()
    assert list(res.confusion.index) == list(res.confusion.columns) == ["background", "foreground"]
    # the summary means are the means of the per-case values
    miou = res.summary.query("kind == 'case' and metric == 'mean_iou'").iloc[0]
    assert miou["count"] == len(masks)
    assert miou["mean"] == pytest.approx(res.cases.query("kind == 'case'")["mean_iou"].mean())


def test_pet_trimaps_against_sklearn_on_unignored_pixels(shared_data, tmp_path):
    masks = sorted((shared_data / "pets_trimaps" / "masks").glob("*.png"))[:4]
    if len(masks) < 4:
        pytest.skip(f"fewer than 4 trimaps in {shared_data / 'pets_trimaps' / 'masks'}")
    preds, cases, truth = tmp_path / "preds", [], {}
    preds.mkdir()
    for i, mask in enumerate(masks):
        trimap = _rows(mask)
        assert set(np.unique(trimap).tolist()) == {1, 2, 3}
        pred = _perturb(trimap == 1, i + 1)
        _write_pred(pred, preds / f"{mask.stem}.png")
        cases.append((mask.stem, shared_data / "pets_trimaps" / "images" / f"{mask.stem}.jpg", mask))
        truth[mask.stem] = (trimap, pred)
    res = evaluate(preds, _manifest(cases, "trimap", tmp_path / "gt.csv"))
    total = np.zeros((2, 2), np.int64)
    sensitive = 0
    for cid, (trimap, pred) in truth.items():
        keep = trimap.ravel() != 3  # 3: boundary, ignored
        y, p = (trimap.ravel()[keep] == 1).astype(int), pred.ravel()[keep].astype(int)
        total += _check_against_sklearn(res, cid, y, p)
        # the test can tell: counting the boundary as background would give other values
        y_all = (trimap.ravel() == 1).astype(int)
        sensitive += sk.jaccard_score(y_all, pred.ravel().astype(int), average="macro") != pytest.approx(
            res.cases.query("id == @cid and kind == 'case'").iloc[0]["mean_iou"], abs=1e-6)
    assert sensitive == len(truth)
    assert res.confusion.to_numpy().tolist() == total.tolist()
    write_report(res, tmp_path / "report")
    saved = pd.read_csv(tmp_path / "report" / "confusion.csv", index_col=0)
    assert saved.to_numpy().tolist() == total.tolist() and list(saved.columns) == ["background", "foreground"]


# ----------------------------------------------------------------------------- synthetic: ignore rule, errors, report
W, H = 48, 36  # non-square: a swapped axis shows


def _trimap_case() -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) trimap with a wide boundary band (3) around a square, and the square itself."""
    fg = np.zeros((H, W), bool)
    fg[10:26, 12:30] = True
    ring = ndimage.binary_dilation(fg, iterations=6) & ~ndimage.binary_erosion(fg, iterations=3)
    trimap = np.where(fg, 1, 2).astype(np.uint8)
    trimap[ring] = 3
    return trimap, fg


def test_ignored_pixels_enter_no_metric(tmp_path):
    trimap, fg = _trimap_case()
    ring = trimap == 3
    decoded = np.where(ring, IGNORE, np.where(trimap == 1, 1, 0)).astype(np.uint8)
    metrics = ["dice", "iou", "precision", "recall", "accuracy", "specificity", "hd95", "assd", "nsd", "ref_ml", "pred_ml"]
    case = ["pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou"]
    tables = []
    for band in (0, 1):  # the ignored band predicted background, then foreground: nothing may change
        pred = np.where(ring, band, fg).astype(np.uint8)
        tables.append(compute_metrics(pred.T, decoded.T, (1.0, 1.0), "trimap"))
    a, b = (t.set_index("kind") for t in tables)
    assert a.loc["class", metrics].tolist() == b.loc["class", metrics].tolist()
    assert a.loc["case", case].tolist() == b.loc["case", case].tolist()
    # and the values are those of the unignored pixels, where the prediction is right
    assert a.loc["class", ["dice", "iou", "accuracy", "hd95"]].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert a.loc["case", "pixel_accuracy"] == 1.0 and a.loc["case", "mean_iou"] == 1.0
    assert a.loc["class", "ref_ml"] == pytest.approx((trimap == 1).sum() / 1000)
    # a prediction holding the ignore value where the reference is not ignored is an error, not a dropped pixel
    with pytest.raises(MedsegError, match="255"):
        compute_metrics(np.where(fg, IGNORE, 0).astype(np.uint8).T, decoded.T, (1.0, 1.0), "trimap")

    # through files: trimap PNG as reference, 0/1 PNG prediction wrong only in the band
    Image.fromarray(trimap).save(tmp_path / "t.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "t.jpg")
    preds = tmp_path / "preds"
    preds.mkdir()
    _write_pred(np.where(ring, 1, fg).astype(np.uint8), preds / "t.png")
    res = evaluate(preds, _manifest([("t", tmp_path / "t.jpg", tmp_path / "t.png")], "trimap", tmp_path / "gt.csv"))
    row = res.cases.query("kind == 'class'").iloc[0]
    assert (row["dice"], row["hd95"], row["accuracy"]) == (1.0, 0.0, 1.0)
    assert res.confusion.to_numpy().sum() == (~ring).sum()


def _dataset_2d(tmp_path: Path, n: int = 3) -> tuple[Path, Path, dict]:
    """n RGB images with 0/255 masks (binary scheme) and perturbed 0/1 PNG predictions; a red marker pixel."""
    preds = tmp_path / "preds"
    preds.mkdir()
    cases, truth = [], {}
    for i in range(n):
        rgb = np.full((H, W, 3), 40 + 20 * i, np.uint8)
        rgb[2, 5] = (255, 0, 0)  # row y = 2, column x = 5
        Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
        ref = np.zeros((H, W), bool)
        ref[8:28, 10 + i:34] = True
        Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / f"img{i}_mask.png")
        pred = np.roll(ref, 2 * i, axis=1)
        _write_pred(pred, preds / f"c{i}.png")
        cases.append((f"c{i}", tmp_path / f"img{i}.png", tmp_path / f"img{i}_mask.png"))
        truth[f"c{i}"] = (ref, pred)
    return preds, _manifest(cases, "binary", tmp_path / "gt.csv"), truth


def test_no_prediction_for_any_case_exits_non_zero(tmp_path, capsys):
    preds, manifest, _ = _dataset_2d(tmp_path, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report"
    assert main(["evaluate", "--predictions", str(empty), "--manifest", str(manifest), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no prediction for any of the 2" in err and "c0.png" in err
    assert not out.exists()
    for p in preds.iterdir():
        p.rename(empty / f"other_{p.name}")
    with pytest.raises(MedsegError, match="no prediction for any.*match no case id"):
        evaluate(empty, manifest)
    # one prediction is enough: the others are reported missing, as before
    (empty / "other_c0.png").rename(empty / "c0.png")
    res = evaluate(empty, manifest)
    assert res.cases.drop_duplicates("id")["status"].tolist() == ["ok", "missing"]


def test_2d_report_has_confusion_heatmap_overlays_and_pixel_units(tmp_path):
    preds, manifest, truth = _dataset_2d(tmp_path)
    Image.new("L", (W, H)).save(preds / "c0_overlay.png")  # a side file of medseg predict: neither a prediction nor unmatched
    out = tmp_path / "report"
    assert main(["evaluate", "--predictions", str(preds), "--manifest", str(manifest), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"cases.csv", "summary.csv", "summary.json", "confusion.csv", "report.html"}
    cases = pd.read_csv(out / "cases.csv")
    assert set(cases["unit"]) == {"px"} and {"f1", "mean_iou", "fw_iou"} <= set(cases.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_unit"] == "px" and summary["unmatched_predictions"] == []
    expected = sum(sk.confusion_matrix(r.ravel(), p.ravel(), labels=[False, True]) for r, p in truth.values())
    assert pd.read_csv(out / "confusion.csv", index_col=0).to_numpy().tolist() == expected.tolist()
    assert summary["confusion"]["counts"] == expected.tolist()
    y = np.concatenate([r.ravel() for r, _ in truth.values()])
    p = np.concatenate([q.ravel() for _, q in truth.values()])
    assert summary["confusion"]["pooled"]["mean_iou"] == pytest.approx(sk.jaccard_score(y, p, average="macro"))
    html = (out / "report.html").read_text()
    assert "<h2>Confusion matrix</h2>" in html and 'alt="confusion matrix" src="data:image/png;base64,' in html
    for label in ("worst", "median", "best"):
        assert f'alt="{label} case c' in html
    assert html.count('src="data:image/png;base64,') == 5  # distributions, heat-map, 3 overlays
    assert "hd95 (px)" in html and "in pixels (px)" in html


def test_2d_overlay_picture_is_upright_and_in_colour(tmp_path):
    from medseg.evaluation.evaluate import CaseInput
    from medseg.evaluation.report import _picture_2d

    _dataset_2d(tmp_path, 1)
    case = CaseInput("c0", ImageRef(tmp_path / "img0_mask.png"), None, ImageRef(tmp_path / "img0.png", 0))  # scan: channel R
    picture = _picture_2d(case, (W, H))
    assert picture.shape == (H, W, 3)  # rows = y, columns = x, the three colour channels of the file
    assert picture[2, 5].tolist() == [1.0, 0.0, 0.0] and picture[5, 2].tolist() != [1.0, 0.0, 0.0]


def test_mean_iou_skips_classes_absent_from_both_maps():
    """brats has classes 1, 2, 4; with 4 in neither map, mean IoU and mean accuracy are over the classes found,
    as scikit-learn scores the labels it finds (averaging a 0/0 class as 0 or 1 would differ)."""
    rng = np.random.default_rng(0)
    ref = ndimage.zoom(rng.integers(0, 3, (6, 5)), 8, order=0).astype(np.uint8)  # values 0, 1, 2
    pred = ref.copy()
    pred[rng.random(ref.shape) < 0.2] = 1
    row = compute_metrics(pred, ref, (1.0, 1.0), "brats").set_index("kind").loc["case"]
    y, p = ref.ravel(), pred.ravel()
    assert row["mean_iou"] == pytest.approx(sk.jaccard_score(y, p, average="macro"), abs=1e-12)
    assert row["fw_iou"] == pytest.approx(sk.jaccard_score(y, p, average="weighted"), abs=1e-12)
    assert row["mean_pixel_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, p), abs=1e-12)
