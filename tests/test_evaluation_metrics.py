"""Metrics on synthetic arrays: golden values, empty-mask rules, surface definition, agreement with MONAI."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.errors import MedsegError
from medseg.evaluation import MetricSettings, compute_metrics, summarize
from medseg.evaluation import surface as surf
from medseg.evaluation.metrics import image_diagonal

SHAPE = (23, 19, 14)  # a different size on every axis
SPACING = (0.8, 1.1, 2.5)  # anisotropic


def _row(df, target, kind=None):
    sel = df["target"] == target
    if kind:
        sel &= df["kind"] == kind
    return df[sel].iloc[0]


def _blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two BraTS-like label maps (1 NCR, 2 ED, 4 ET) that overlap imperfectly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        grid = np.indices(SHAPE).astype(float)
        centre = np.array([11, 9, 7]) + rng.normal(0, 1.5, 3)
        r = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, SPACING)))
        noise = ndimage.gaussian_filter(rng.normal(0, 1, SHAPE), 1.5) * 3
        lab = np.zeros(SHAPE, np.uint8)
        lab[r + noise < 9] = 2
        lab[r + noise < 6] = 1
        lab[(r + noise < 4.5) & (r + noise > 2.5)] = 4
        out.append(lab)
    return out[0], out[1]


def test_perfect_prediction_is_perfect():
    _, ref = _blobs(0)
    df = compute_metrics(ref.copy(), ref, SPACING, "brats")
    targets = df[df["kind"] != "case"]
    assert (targets[["dice", "iou", "precision", "recall", "nsd", "accuracy"]] == 1).all().all()
    assert (targets[["hd95", "assd", "vol_diff_ml"]] == 0).all().all()
    assert _row(df, "all")["pixel_accuracy"] == 1


def test_golden_values_two_shifted_boxes():
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    ref[2:8, 3:9, 2:6] = 1  # 6 x 6 x 4 = 144 voxels
    pred[4:10, 3:9, 2:6] = 1  # shifted 2 voxels (1.6 mm) along axis 0: overlap 4 x 6 x 4 = 96
    df = compute_metrics(pred, ref, SPACING, "binary")
    row = _row(df, "foreground")
    assert row["dice"] == pytest.approx(2 * 96 / 288)
    assert row["iou"] == pytest.approx(96 / 192)
    assert row["precision"] == pytest.approx(96 / 144) and row["recall"] == pytest.approx(96 / 144)
    n = np.prod(SHAPE)
    assert row["specificity"] == pytest.approx((n - 192) / (n - 144))
    assert row["ref_ml"] == pytest.approx(144 * 0.8 * 1.1 * 2.5 / 1000)
    assert row["vol_diff_ml"] == 0
    # the far faces are 1.6 mm from the other surface; most surface voxels are shared or 1.6 mm away
    assert row["hd95"] == pytest.approx(1.6)
    assert row["nsd"] < 1
    assert _row(compute_metrics(pred, ref, SPACING, "binary", MetricSettings(tolerance_mm=1.6)), "foreground")["nsd"] == 1


def test_empty_rules_are_explicit():
    empty = np.zeros(SHAPE, np.uint8)
    some = empty.copy()
    some[3:6, 3:6, 3:6] = 1
    both = _row(compute_metrics(empty, empty, SPACING, "binary"), "foreground")
    assert (both["dice"], both["iou"], both["hd95"], both["assd"], both["nsd"]) == (1, 1, 0, 0, 1)
    nan = _row(compute_metrics(empty, empty, SPACING, "binary", MetricSettings(empty="nan")), "foreground")
    assert np.isnan([nan["dice"], nan["iou"], nan["hd95"], nan["assd"], nan["nsd"]]).all()
    diagonal = image_diagonal(SHAPE, SPACING)
    for pred, ref in ((some, empty), (empty, some)):
        one = _row(compute_metrics(pred, ref, SPACING, "binary"), "foreground")
        assert (one["dice"], one["iou"], one["precision"], one["recall"], one["nsd"]) == (0, 0, 0, 0, 0)
        assert one["hd95"] == one["assd"] == pytest.approx(diagonal)
    assert image_diagonal((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)
    with pytest.raises(MedsegError, match="empty"):
        MetricSettings(empty="zero")


def test_surface_is_mask_minus_erosion_and_bitflags_match():
    pred, ref = _blobs(1)
    for values in ((1, 2, 4), (1, 4), (4,)):
        mask = np.isin(ref, values)
        assert np.array_equal(surf.surface(mask), mask & ~ndimage.binary_erosion(mask))
    border = np.ones((4, 5, 3), bool)  # a mask filling the image: every voxel on the image border is surface
    assert surf.surface(border).sum() == border.size - 2 * 3 * 1
    bits = np.zeros(SHAPE, np.uint8)
    bits[np.isin(ref, (1, 2, 4))] |= 1
    bits[ref == 4] |= 2
    s = surf.surface(bits)
    assert np.array_equal((s & 1) > 0, surf.surface(np.isin(ref, (1, 2, 4))))
    assert np.array_equal((s & 2) > 0, surf.surface(ref == 4))


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_directed_distances_are_exact(radius):
    rng = np.random.default_rng(radius)
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(4, 25, 3))
        spacing = rng.uniform(0.3, 3.0, 3)
        a, b = rng.random(shape) < rng.uniform(0.02, 0.4), rng.random(shape) < rng.uniform(0.02, 0.4)
        sa, sb = surf.surface(a), surf.surface(b)
        got = surf.directed_distances(np.flatnonzero(sa), np.flatnonzero(sb), shape, spacing, radius_voxels=radius)
        want = cKDTree(np.argwhere(sb) * spacing).query(np.argwhere(sa) * spacing)[0]
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_agrees_with_monai_on_anisotropic_synthetic():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    pred, ref = _blobs(2)
    df = compute_metrics(pred, ref, SPACING, "brats", MetricSettings(targets=("regions",), tolerance_mm=1.5))
    regions = [(1, 2, 4), (1, 4), (4,)]
    p = torch.from_numpy(np.stack([np.isin(pred, v) for v in regions])[None]).float()
    r = torch.from_numpy(np.stack([np.isin(ref, v) for v in regions])[None]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=SPACING)[0].numpy()
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=SPACING)[0].numpy()
        nsd = compute_surface_dice(p, r, [1.5] * 3, include_background=True, spacing=SPACING)[0].numpy()
    rows = df[df["kind"] == "region"]
    np.testing.assert_allclose(rows["hd95"], hd, atol=1e-3)
    np.testing.assert_allclose(rows["assd"], asd, atol=1e-4)
    np.testing.assert_allclose(rows["nsd"], nsd, atol=1e-6)


def _brute_force(pm: np.ndarray, rm: np.ndarray, tolerance: float) -> dict[str, float]:
    """Overlap and surface metrics of two non-empty masks, from their definitions (set counts, k-d tree distances)."""
    tp = int((pm & rm).sum())
    a, b = (np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(SPACING) for m in (pm, rm))
    d_ab, d_ba = cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]
    both = np.concatenate([d_ab, d_ba])
    return {"dice": 2 * tp / (pm.sum() + rm.sum()), "iou": tp / (pm | rm).sum(), "precision": tp / pm.sum(),
            "recall": tp / rm.sum(), "hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
            "assd": both.mean(), "nsd": (both <= tolerance).mean()}


def test_classes_regions_and_case_row():
    pred, ref = _blobs(3)
    df = compute_metrics(pred, ref, SPACING, "brats")
    assert list(df["target"]) == ["NCR", "ED", "ET", "WT", "TC", "ET", "all"]
    # every class and region (ET twice: the class and the region share one computation) against its definition
    for (kind, target), values in {("class", "NCR"): (1,), ("class", "ED"): (2,), ("class", "ET"): (4,),
                                   ("region", "WT"): (1, 2, 4), ("region", "TC"): (1, 4), ("region", "ET"): (4,)}.items():
        pm, rm = np.isin(pred, values), np.isin(ref, values)
        assert pm.any() and rm.any() and not np.array_equal(pm, rm)  # an imperfect overlap: no metric at its limit
        want = _brute_force(pm, rm, MetricSettings().tolerance_mm)
        got = _row(df, target, kind)
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value, abs=1e-9), f"{kind} {target} {metric}"
    case = _row(df, "all")
    assert case["pixel_accuracy"] == pytest.approx((pred == ref).mean())
    recalls = [((pred == v) & (ref == v)).sum() / (ref == v).sum() for v in (0, 1, 2, 4) if (ref == v).any()]
    assert case["mean_pixel_accuracy"] == pytest.approx(np.mean(recalls))


def test_generic_scheme_and_bad_values():
    ref = np.zeros(SHAPE, np.int16)
    ref[2:6, 2:6, 2:6] = 7
    ref[8:12, 2:6, 2:6] = 3
    df = compute_metrics(ref.copy(), ref, SPACING, "labels")
    assert list(df["target"]) == ["3", "7", "all"]
    bad = ref.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(MedsegError, match="label value.*5.*brats"):
        compute_metrics(bad, np.where(ref == 7, 4, ref), SPACING, "brats")
    with pytest.raises(MedsegError, match="shape"):
        compute_metrics(ref[:-1], ref, SPACING, "labels")


def test_2d_arrays():
    ref = np.zeros((30, 22), np.uint8)
    ref[5:15, 4:12] = 1
    pred = np.roll(ref, 3, axis=1)
    row = _row(compute_metrics(pred, ref, (0.5, 2.0), "binary"), "foreground")
    assert row["hd95"] == pytest.approx(6.0)
    assert row["dice"] == pytest.approx(2 * 50 / 160)


def test_summary_leaves_nan_out_and_counts_it():
    empty = np.zeros(SHAPE, np.uint8)
    some = empty.copy()
    some[3:6, 3:6, 3:6] = 1
    rows = []
    for case_id, (pred, ref) in {"a": (some, some), "b": (empty, empty)}.items():
        df = compute_metrics(pred, ref, SPACING, "binary", MetricSettings(empty="nan"))
        rows.append(df.assign(id=case_id, status="ok"))
    import pandas as pd

    cases = pd.concat(rows + [pd.DataFrame([{"id": "c", "status": "missing", "kind": "class", "target": "foreground"}])])
    dice = summarize(cases).query("target == 'foreground' and metric == 'dice'").iloc[0]
    assert (dice["count"], dice["nan"], dice["missing"], dice["mean"]) == (1, 1, 1, 1.0)
