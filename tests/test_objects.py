"""Per-object metrics (``medseg.evaluation.objects``, ``.matching``, ``.precision``, ``.lesionwise``): hand-worked
cases, brute force, and pycocotools for AP."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medseg.errors import MedsegError
from medseg.evaluation import lesionwise
from medseg.evaluation import matching as mat
from medseg.evaluation import objects as obj
from medseg.evaluation import precision
from medseg.evaluation import surface as surf


@pytest.mark.parametrize("module", [obj, mat, precision, lesionwise], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------------ components

def test_components_connectivity_scan_order_and_relabel():
    m = np.zeros((5, 6, 7), bool)
    m[3, 4, 5] = True             # first in scan order? no: (1, 1, 1) comes first
    m[1, 1, 1] = m[2, 2, 2] = True  # touch at a corner only: one component with "full", two with "face"
    full = obj.label_components(m, "full")
    assert full.dtype == np.int32 and full[1, 1, 1] == full[2, 2, 2] == 1 and full[3, 4, 5] == 2
    face = obj.label_components(m, "face")
    assert (face[1, 1, 1], face[2, 2, 2], face[3, 4, 5]) == (1, 2, 3)
    assert obj.relabel_sequential(np.array([[0, 9, 4], [4, 0, 1000]])).tolist() == [[0, 2, 1], [1, 0, 3]]
    huge = np.array([[0, 2**40], [5, 2**40]], np.int64)  # ids far above the array size take the np.unique path
    assert obj.relabel_sequential(huge).tolist() == [[0, 2], [1, 2]]


def test_components_min_size_and_min_volume_ml():
    m = np.zeros((10, 12, 14), bool)
    m[0:2, 0:2, 0:2] = True      # 8 voxels
    m[5:10, 5:10, 5:7] = True    # 50 voxels
    assert obj.label_components(m).max() == 2
    assert obj.label_components(m, min_size=9).max() == 1
    assert obj.label_components(m, min_size=8).max() == 2  # "smaller than min_size" is removed; 8 stays
    spacing = (2.0, 2.0, 2.5)    # 10 mm^3 per voxel: 50 voxels = 500 mm^3 = 0.5 mL, 8 voxels = 0.08 mL
    kept = obj.label_components(m, spacing=spacing, min_volume_ml=0.5)
    assert kept.max() == 1 and kept[5, 5, 5] == 1 and kept[0, 0, 0] == 0
    assert obj.label_components(m, spacing=spacing, min_volume_ml=0.51).max() == 0
    with pytest.raises(MedsegError, match="pass spacing"):
        obj.label_components(m, min_volume_ml=0.5)
    with pytest.raises(MedsegError, match="did you mean 'face'"):
        obj.label_components(m, "faces")


# ------------------------------------------------------------------------------------------------- overlaps

def _random_instances(rng, shape, n, size=(2, 9)):
    out = np.zeros(shape, np.int64)
    for i in range(1, n + 1):
        lo = [rng.integers(0, s - 2) for s in shape]
        hi = [min(s, a + rng.integers(*size)) for a, s in zip(lo, shape)]
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = i * 3  # ids with gaps; later objects cover earlier ones
    return out


def test_overlap_table_against_brute_force():
    rng = np.random.default_rng(0)
    ref, pred = _random_instances(rng, (30, 26, 7), 12), _random_instances(rng, (30, 26, 7), 15)
    t = obj.overlap_table(ref, pred)
    assert t.ref_ids.tolist() == sorted(set(np.unique(ref)) - {0})
    for k, (i, j) in enumerate(zip(t.ref_ids[t.ref_index], t.pred_ids[t.pred_index])):
        a, b = ref == i, pred == j
        assert t.intersection[k] == np.count_nonzero(a & b) > 0
        assert t.iou[k] == np.count_nonzero(a & b) / np.count_nonzero(a | b)
    expected = sum(1 for i in t.ref_ids for j in t.pred_ids if ((ref == i) & (pred == j)).any())
    assert len(t.iou) == expected
    assert t.ref_sizes.tolist() == [np.count_nonzero(ref == i) for i in t.ref_ids]


# ------------------------------------------------------------------------------------------------- matching

def test_matching_is_one_to_one_at_exactly_half():
    ref = np.array([[1, 1, 1, 1, 1, 1, 1, 1]])
    pred = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])  # two halves: IoU 4/8 = 0.5 each, both pass ">= 0.5"
    m = mat.match_objects(ref, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0) and m.iou.tolist() == [0.5]


def test_matching_prediction_covering_two_references_and_swap():
    ref = np.array([[1, 1, 1, 1, 2, 2, 0, 0, 0]])
    pred = np.array([[5, 5, 5, 5, 5, 5, 5, 5, 0]])  # IoU with 1: 4/8 = 0.5, with 2: 2/8 = 0.25
    m = mat.match_objects(ref, pred, 0.2)
    assert (m.ref_ids.tolist(), m.pred_ids.tolist(), m.unmatched_ref.tolist(), m.unmatched_pred.tolist()) == ([1], [5], [2], [])
    s = mat.match_objects(pred, ref, 0.2)
    assert (s.ref_ids.tolist(), s.pred_ids.tolist(), s.unmatched_ref.tolist(), s.unmatched_pred.tolist()) == ([5], [1], [], [2])


def test_matching_takes_most_pairs_then_scores_use_coco_greedy():
    # G1 = 0..9, G2 = 10..13; S1 = 0..7 and 10 (9 px), S2 = 8..9.
    # IoU(G1,S1) = 8/11 = 0.727, IoU(G2,S1) = 1/12 = 0.083, IoU(G1,S2) = 2/10 = 0.2.
    ref = np.array([[1] * 10 + [2] * 4])
    pred = np.array([[1] * 8 + [2] * 2 + [1] + [0] * 3])
    m = mat.match_objects(ref, pred, 0.05)  # two pairs (total IoU 0.283) beat one pair of IoU 0.727
    assert list(zip(m.ref_ids.tolist(), m.pred_ids.tolist())) == [(1, 2), (2, 1)]
    assert np.allclose(m.iou, [0.2, 1 / 12])
    g = mat.match_objects(ref, pred, 0.05, scores={1: 0.9, 2: 0.1})  # S1 first takes G1; S2 finds G1 taken
    assert list(zip(g.ref_ids.tolist(), g.pred_ids.tolist())) == [(1, 1)] and (g.fp, g.fn) == (1, 1)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
def test_matching_properties_on_random_maps(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    for _ in range(5):
        ref, pred = _random_instances(rng, (24, 30), 14), _random_instances(rng, (24, 30), 14)
        t = obj.overlap_table(ref, pred)
        m = mat.match_objects(ref, pred, threshold)
        assert len(set(m.ref_ids)) == m.tp == len(set(m.pred_ids))  # one-to-one
        assert np.all(m.iou >= threshold)
        assert m.tp + m.fn == t.ref_ids.size and m.tp + m.fp == t.pred_ids.size
        cand = t.iou_matrix() >= threshold  # the most pairs possible, by an independent assignment
        cand &= t.iou_matrix() > 0
        r, c = linear_sum_assignment(cand, maximize=True)
        assert m.tp == int(cand[r, c].sum())
        s = mat.match_objects(pred, ref, threshold)
        assert (s.tp, s.fp, s.fn) == (m.tp, m.fn, m.fp)
        assert sorted(zip(s.pred_ids.tolist(), s.ref_ids.tolist())) == sorted(zip(m.ref_ids.tolist(), m.pred_ids.tolist()))


# ---------------------------------------------------------------------------------- detection, PQ and AJI

def _pq_case():
    ref = np.zeros((12, 20), np.int32)
    pred = np.zeros((12, 20), np.int32)
    ref[0:4, 0:4] = 1; pred[0:4, 0:4] = 1       # identical: IoU 1
    ref[6:10, 6:10] = 2                         # 16 px
    pred[6:8, 6:10] = 2; pred[8, 6:8] = 2       # 10 px inside it: IoU 10/16 = 0.625
    pred[0:3, 15:18] = 3                        # meets nothing: false positive
    return ref, pred


def test_detection_scores_and_empty_rules():
    ref, pred = _pq_case()
    ref[11, 19] = 4  # a missed reference object
    d = mat.detection_scores(mat.match_objects(ref, pred))
    # TP 2 (objects 1, 2), FP 1, FN 1: precision 2/3, recall 2/3, F1 = 4 / (4 + 1 + 1)
    assert (d["tp"], d["fp"], d["fn"]) == (2, 1, 1)
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3) and d["f1"] == pytest.approx(4 / 6)
    empty = np.zeros((3, 4), int)
    assert mat.detection_scores(mat.match_objects(empty, empty)) == {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    d = mat.detection_scores(mat.match_objects(ref, np.zeros_like(ref)))
    assert (d["precision"], d["recall"], d["f1"]) == (0.0, 0.0, 0.0)


def test_panoptic_quality_hand_case():
    ref, pred = _pq_case()
    q = mat.panoptic_quality(mat.match_objects(ref, pred, 0.5))
    # SQ = (1 + 0.625) / 2 = 0.8125; RQ = 2 / (2 + 1/2 + 0/2) = 0.8; PQ = 0.8125 * 0.8 = 0.65
    assert q == pytest.approx({"pq": 0.65, "sq": 0.8125, "rq": 0.8})
    empty = np.zeros((3, 4), int)
    assert mat.panoptic_quality(mat.match_objects(empty, empty)) == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    assert mat.panoptic_quality(mat.match_objects(ref, np.zeros_like(ref)))["pq"] == 0.0


def test_aggregated_jaccard_hand_case():
    ref = np.zeros((8, 12), np.int32)
    pred = np.zeros((8, 12), np.int32)
    ref[0:2, 0:5] = 1    # G1: 10 px
    pred[0:2, 1:7] = 1   # S1: 12 px; G1 n S1 = 8, G1 u S1 = 10 + 12 - 8 = 14
    ref[4:6, 0:3] = 2    # G2: 6 px
    pred[5:7, 0:3] = 2   # S2: 6 px;  G2 n S2 = 3, G2 u S2 = 9
    ref[4:6, 8:10] = 3   # G3: 4 px, meets no prediction: U += 4
    pred[7, 8:12] = 3    # S3: 4 px, never chosen: U += 4
    # C = 8 + 3 = 11; U = 14 + 9 + 4 + 4 = 31
    assert obj.aggregated_jaccard(ref, pred) == pytest.approx(11 / 31)
    assert obj.aggregated_jaccard(ref, pred, one_to_one=True) == pytest.approx(11 / 31)  # no shared prediction


def test_aggregated_jaccard_shared_prediction_and_aji_plus():
    ref = np.array([[1, 1, 1, 1, 0, 2, 2, 0]])
    pred = np.array([[7, 7, 7, 7, 7, 7, 7, 7]])  # S (8 px) contains Ga (4 px, IoU 0.5) and Gb (2 px, IoU 0.25)
    # AJI: S is chosen by both: C = 4 + 2 = 6, U = 8 + 8 = 16
    assert obj.aggregated_jaccard(ref, pred) == pytest.approx(6 / 16)
    # AJI+: S pairs with Ga only: C = 4, U = 8 + |Gb| = 10
    assert obj.aggregated_jaccard(ref, pred, one_to_one=True) == pytest.approx(4 / 10)
    empty = np.zeros_like(ref)
    assert obj.aggregated_jaccard(empty, empty) == 1.0 and obj.aggregated_jaccard(empty, pred) == 0.0
    ref = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    pred = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])  # IoU(G, S1) = 6/8, IoU(G, S2) = 2/10: G takes S1
    # C = 6, U = |G u S1| + |S2| (never chosen) = 8 + 4 = 12
    assert obj.aggregated_jaccard(ref, pred) == pytest.approx(6 / 12)


# ------------------------------------------------------------------------------------------ average precision

def test_average_precision_hand_case():
    ref, pred = _pq_case()                 # IoU 1 (object 1), 0.625 (object 2), object 3 a false positive
    scores = {1: 0.9, 3: 0.8, 2: 0.7}      # ranked: TP, FP, then object 2
    ap = precision.average_precision([(ref, pred, scores)])
    # thresholds 0.50-0.60 (object 2 a TP): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; envelope 1, 2/3, 2/3:
    #   recall points 0.00..0.50 (51) -> 1, 0.51..1.00 (50) -> 2/3: AP = (51 + 50 * 2/3) / 101 = 253/303
    # thresholds 0.65-0.95 (object 2 a FP): recall stops at 1/2: AP = 51/101 = 153/303
    assert ap["ap50"] == pytest.approx(253 / 303) and ap["ap75"] == pytest.approx(153 / 303)
    assert ap["map"] == pytest.approx((3 * 253 + 7 * 153) / 3030)
    assert ap["ap_by_threshold"][0.6] == pytest.approx(253 / 303) and ap["ap_by_threshold"][0.65] == pytest.approx(153 / 303)
    assert (ap["n_reference"], ap["n_prediction"]) == (2, 3)
    nothing = precision.average_precision([(np.zeros_like(ref), pred, None)])
    assert np.isnan(nothing["map"]) and np.isnan(nothing["ap50"])


def test_average_precision_greedy_follows_scores():
    ref = np.array([[1] * 10 + [0] * 2])
    pred = np.array([[1] * 6 + [2] * 4 + [0] * 2])  # IoU 0.6 (score 0.2) and 0.4 (score 0.9)
    ap = precision.average_precision([(ref, pred, {1: 0.2, 2: 0.9})], iou_thresholds=[0.3])
    # object 2 comes first and takes the reference (IoU 0.4 >= 0.3); object 1 is then a false positive:
    # ranked TP, FP -> precision 1 up to recall 1 -> AP 1 (taking object 1 first would rank FP, TP: AP 0.5)
    assert ap["map"] == 1.0 and np.isnan(ap["ap50"])


def _coco_images(seed):
    rng = np.random.default_rng(seed)
    images = []
    for shape, n in (((40, 50), 8), ((32, 36), 6), ((45, 30), 0), ((30, 30), 5)):
        ref = _random_instances(rng, shape, n, size=(4, 14))
        pred = np.zeros(shape, np.int64)
        for i in np.unique(ref)[1:]:  # shifted copies of most reference objects (IoU from 1 down), plus strays
            if rng.random() < 0.8:
                pred[np.roll(ref == i, tuple(rng.integers(-1, 2, 2) * (rng.random() < 0.6)), (0, 1))] = i + 1
                if rng.random() < 0.3:  # split the copy: two predictions compete for one reference object
                    rows = np.flatnonzero((pred == i + 1).any(axis=1))
                    pred[rows[: rows.size // 2]] = np.where(pred[rows[: rows.size // 2]] == i + 1, i + 500, pred[rows[: rows.size // 2]])
        strays = _random_instances(rng, shape, 2, size=(2, 6))
        pred[strays > 0] = strays[strays > 0] + 1000
        ids = np.unique(pred)[1:]
        images.append((ref, pred, {int(i): float(rng.random()) for i in ids}))
    return images


def _pycocotools_ap(images, thresholds):
    pytest.importorskip("pycocotools", reason="pycocotools is the independent reference for COCO AP")
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    dets = []
    for k, (ref, pred, scores) in enumerate(images, start=1):
        gt["images"].append({"id": k, "height": ref.shape[0], "width": ref.shape[1]})
        for i in np.unique(ref)[1:]:
            r = rle(ref == i)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": k, "category_id": 1, "segmentation": r,
                                      "area": float(mask_utils.area(r)), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
        dets += [{"image_id": k, "category_id": 1, "segmentation": rle(pred == i),
                  "score": 1.0 if scores is None else scores[int(i)]} for i in np.unique(pred)[1:]]
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "segm")
    ev.params.maxDets, ev.params.areaRng, ev.params.areaRngLbl = [10000], [[0, 1e10]], ["all"]
    ev.params.iouThrs = np.asarray(thresholds)
    ev.evaluate()
    ev.accumulate()
    return ev.eval["precision"][:, :, 0, 0, 0].mean(axis=1)  # (thresholds, recall points) -> AP per threshold


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_average_precision_matches_pycocotools(seed, capsys):
    images = _coco_images(seed)
    if seed == 3:  # equal scores everywhere: ties broken by image, then id, as pycocotools does
        images = [(r, p, None) for r, p, _ in images]
    expected = _pycocotools_ap(images, precision.COCO_IOU_THRESHOLDS)
    ap = precision.average_precision(images)
    assert 0 < ap["map"] < 1
    assert (ap["map"], ap["ap50"], ap["ap75"]) == pytest.approx((expected.mean(), expected[0], expected[5]), abs=1e-9)
    low = [0.1, 0.2, 0.3]  # split copies compete for one reference object: the score order decides
    ap = precision.average_precision(images, iou_thresholds=low)
    assert list(ap["ap_by_threshold"].values()) == pytest.approx(_pycocotools_ap(images, low), abs=1e-9)


# ----------------------------------------------------------------------------------------- lesion-wise (BraTS)

def _brats_literal(ref, pred, spacing, dilation, min_volume, cap):
    """The BraTS 2023 procedure written out literally: one dilation per lesion, full-volume masks."""
    struct = ndimage.generate_binary_structure(ref.ndim, 2)
    full = ndimage.generate_binary_structure(ref.ndim, ref.ndim)
    comps = ndimage.label(pred, full)[0]
    dil_cc = ndimage.label(ndimage.binary_dilation(ref, struct, iterations=dilation), full)[0]
    lesions = np.where(ref, dil_cc, 0)
    dices, hds, vols, matched_all = [], [], [], set()
    for lesion in np.unique(lesions)[1:]:
        gt = lesions == lesion
        hits = set(np.unique(comps[ndimage.binary_dilation(gt, struct, iterations=dilation)])) - {0}
        matched_all |= hits
        p = np.isin(comps, list(hits))
        dices.append(2 * np.count_nonzero(gt & p) / (gt.sum() + p.sum()))
        hds.append(surf.percentile_hausdorff(*surf.surface_distances(p, gt, spacing)) if p.any() else cap)
        vols.append(gt.sum() * np.prod(spacing))
    fp = len(set(np.unique(comps)) - {0} - matched_all)
    keep = np.array(vols) > min_volume
    den = keep.sum() + fp
    return (np.array(dices)[keep].sum() / den if den else 1.0, (np.array(hds)[keep].sum() + cap * fp) / den if den else 0.0)


def test_lesion_wise_hand_case():
    spacing = (2.0, 1.0, 1.0)
    ref = np.zeros((20, 24, 16), bool)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = True      # lesion 1: 64 voxels = 128 mm^3
    pred[3:7, 2:6, 2:6] = True     # shifted by one voxel on axis 0: 48 in common, Dice = 96 / 128 = 0.75
    # HD95: 16 of the 56 surface voxels of each cube lie one voxel (2 mm) from the other surface, 4 lie 1 mm from
    # it (the face centre, 1 mm from a side face) and 36 are on it: the 95th percentile of each direction is 2 mm
    ref[12:15, 12:15, 10:13] = True  # lesion 2: 27 voxels = 54 mm^3 > 50: kept, and missed: Dice 0, HD95 374
    pred[14:17, 2:5, 12:15] = True   # far from both (dilated) lesions: one false positive
    r = lesionwise.lesion_wise(ref, pred, spacing)
    assert (r.n_reference, r.tp, r.fn, r.fp, r.n_prediction, r.n_small) == (2, 1, 1, 1, 2, 0)
    assert r.dice == pytest.approx((0.75 + 0 + 0) / 3)        # (Dice 1 + Dice 2 + 0 per FP) / (2 lesions + 1 FP)
    assert r.hd95 == pytest.approx((2.0 + 374 + 374) / 3)     # (2 mm + cap for the miss + cap for the FP) / 3
    lesion1 = next(row for row in r.rows if row["kind"] == "lesion" and row["detected"])
    assert (lesion1["voxels"], lesion1["volume_ml"], lesion1["dice"], lesion1["hd95"]) == (64, 0.128, 0.75, 2.0)
    assert lesion1["prediction_ids"] == (int(r.components[3, 2, 2]),)
    fp_row = next(row for row in r.rows if row["kind"] == "false_positive")
    assert (fp_row["voxels"], fp_row["volume_ml"], fp_row["dice"], fp_row["hd95"]) == (27, pytest.approx(0.054), 0.0, 374.0)


def test_lesion_wise_dilation_widens_matching():
    ref = np.zeros((20, 12, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    near, far = np.zeros_like(ref), np.zeros_like(ref)
    near[8:10, 2:6, 2:6] = True  # a gap of 2 voxels: within the dilated lesion (which reaches index 8)
    far[10:12, 2:6, 2:6] = True  # a gap of 4 voxels: outside it
    r = lesionwise.lesion_wise(ref, near, (1.0, 1.0, 1.0), min_volume=0)
    assert (r.tp, r.fn, r.fp, r.dice) == (1, 0, 0, 0.0)  # detected, but Dice 0: no voxel in common
    assert r.hd95 < 374 and r.hd95 == pytest.approx(surf.percentile_hausdorff(*surf.surface_distances(near, ref, (1.0, 1.0, 1.0))))
    r = lesionwise.lesion_wise(ref, far, (1.0, 1.0, 1.0), min_volume=0)
    assert (r.tp, r.fn, r.fp, r.dice, r.hd95) == (0, 1, 1, 0.0, 374.0)


def test_lesion_wise_merges_close_blobs():
    ref = np.zeros((30, 8, 8), bool)
    ref[2:5, 2:5, 2:5] = True
    ref[7:10, 2:5, 2:5] = True    # 2 voxels from the first: one lesion after dilation
    ref[19:22, 2:5, 2:5] = True   # 9 voxels from the second: a lesion of its own
    r = lesionwise.lesion_wise(ref, np.zeros_like(ref), (1.0, 1.0, 1.0), min_volume=0)
    assert r.n_reference == 2 and [row["voxels"] for row in r.rows] == [54, 27]
    assert r.lesions[3, 3, 3] == r.lesions[8, 3, 3] != r.lesions[20, 3, 3]
    assert lesionwise.lesion_wise(ref, np.zeros_like(ref), (1.0, 1.0, 1.0), dilation=0, min_volume=0).n_reference == 3


def test_lesion_wise_min_volume_and_empty_cases():
    ref = np.zeros((10, 9, 8), bool)
    ref[2:5, 2:5, 2:5] = True            # 27 voxels; spacing (1, 1, 2): 54 mm^3
    pred = np.zeros_like(ref)
    pred[3:5, 3:5, 3:5] = True
    spacing = (1.0, 1.0, 2.0)
    small = lesionwise.lesion_wise(ref, pred, spacing, min_volume=54.0)  # <= min_volume: dropped
    assert (small.n_reference, small.n_small, small.fp, small.fn) == (0, 1, 0, 0)  # its match is no false positive
    assert (small.dice, small.hd95) == (1.0, 0.0)  # nothing counted on either side
    assert small.rows[0]["kind"] == "small_lesion"
    kept = lesionwise.lesion_wise(ref, pred, spacing, min_volume=53.9)
    assert (kept.n_reference, kept.tp) == (1, 1) and kept.dice == pytest.approx(2 * 8 / (27 + 8))
    empty = np.zeros_like(ref)
    both = lesionwise.lesion_wise(empty, empty, spacing)
    assert (both.dice, both.hd95, both.n_reference, both.fp, both.rows) == (1.0, 0.0, 0, 0, ())
    only_pred = lesionwise.lesion_wise(empty, pred, spacing)
    assert (only_pred.dice, only_pred.hd95, only_pred.fp) == (0.0, 374.0, 1)


@pytest.mark.parametrize("seed", [0, 2])
def test_lesion_wise_against_literal_procedure(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (30, 26, 18), (1.0, 1.2, 2.0)
    ref = ndimage.binary_dilation(rng.random(shape) < 0.0008, iterations=2)
    pred = ndimage.binary_dilation(rng.random(shape) < 0.0006, iterations=2)
    pred[:15] |= ndimage.binary_erosion(ref)[:15]  # lesions in the first half found, the others mostly missed
    r = lesionwise.lesion_wise(ref, pred, spacing, dilation=1, min_volume=70.0, hd_cap=100.0)
    assert r.n_reference >= 2 and r.n_small >= 1 and r.fp >= 1
    assert (r.dice, r.hd95) == pytest.approx(_brats_literal(ref, pred, spacing, 1, 70.0, 100.0))


# ------------------------------------------------------------------------------------------------ object rows

def test_object_rows():
    ref = np.zeros((6, 7, 8), np.int32)
    pred = np.zeros((6, 7, 8), np.int32)
    ref[0:2, 0:2, 0:2] = 4; pred[0:2, 0:2, 0:3] = 9     # 8 voxels vs 12: IoU 8/12
    ref[4:6, 5:7, 6:8] = 2                              # missed
    pred[3, 0, 7] = 1                                   # false positive
    m = mat.match_objects(ref, pred)
    rows = obj.object_rows(ref, pred, m, spacing=(1.0, 2.0, 3.0))  # 6 mm^3 per voxel
    assert [(r["kind"], r["ref_id"], r["pred_id"], r["detected"]) for r in rows] == [
        ("reference", 2, None, False), ("reference", 4, 9, True), ("false_positive", None, 1, False)]
    assert rows[1]["voxels"] == 8 and rows[1]["volume_ml"] == pytest.approx(8 * 6 / 1000)
    assert rows[1]["centre"] == (0.5, 0.5, 0.5) and rows[0]["centre"] == (4.5, 5.5, 6.5)
    assert rows[1]["iou"] == pytest.approx(2 / 3) and rows[1]["dice"] == pytest.approx(2 * 8 / 20)
    assert np.isnan(rows[0]["iou"]) and rows[2]["voxels"] == 1
    flat = obj.object_rows(ref[0], pred[0], mat.match_objects(ref[0], pred[0]), spacing=(1.0, 1.0))
    assert np.isnan(flat[0]["volume_ml"]) and flat[0]["voxels"] == 4  # 2D: pixel count, no mL
    with pytest.raises(MedsegError, match="does not belong"):
        obj.object_rows(ref, np.zeros_like(pred), m)


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_are_reported_and_inputs_untouched():
    ref = np.zeros((5, 6), np.int16); ref[1:3, 1:3] = 3
    pred = ref.copy(); pred[4, 5] = 7
    before = (ref.copy(), pred.copy())
    with pytest.raises(MedsegError, match="share one grid"):
        mat.match_objects(ref, pred[:, :5])
    with pytest.raises(MedsegError, match="non-negative"):
        obj.overlap_table(ref, -pred)
    with pytest.raises(MedsegError, match="2 or more axes"):
        obj.overlap_table(ref[0], pred[0])
    with pytest.raises(MedsegError, match="integers"):
        obj.overlap_table(ref + 0.5, pred)
    with pytest.raises(MedsegError, match=r"no score for predicted objects \[7\]"):
        mat.match_objects(ref, pred, scores={3: 0.5})
    with pytest.raises(MedsegError, match=r"images\[0\] scores: scores for ids \[8\]"):
        precision.average_precision([(ref, pred, {3: 0.5, 7: 0.1, 8: 0.2})])
    with pytest.raises(MedsegError, match="iou_threshold"):
        mat.match_objects(ref, pred, 1.5)
    with pytest.raises(MedsegError, match="np.isin"):
        lesionwise.lesion_wise(ref, pred > 0, (1.0, 1.0))
    with pytest.raises(MedsegError, match="spacing"):
        lesionwise.lesion_wise(ref > 0, pred > 0, (1.0, 1.0, 1.0))
    assert np.array_equal(ref, before[0]) and np.array_equal(pred, before[1])
