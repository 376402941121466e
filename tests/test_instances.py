"""Objects end to end: semantic label maps split into objects (components, watershed), instance models trained by the
trainer and applied by ``medseg predict --instances``, and ``medseg evaluate --objects`` (per-object rows, object
metrics on a constructed case, BraTS 2023 lesion-wise numbers through the command)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medseg.cli import main
from medseg.data.labels import get_scheme
from medseg.data.synthetic import generate_instances_2d
from medseg.errors import MedsegError
from medseg.inference.instances import InstanceSettings, object_scores, semantic_instances, watershed_split

pytest.importorskip("skimage", reason="the watershed needs scikit-image: pip install scikit-image")


def _discs(shape, centres, radius):
    grid = np.indices(shape)
    out = np.zeros(shape, bool)
    for c in centres:
        out |= sum((g - x) ** 2 for g, x in zip(grid, c)) <= radius ** 2
    return out


# ----------------------------------------------------------------------------- semantic -> objects
@pytest.mark.parametrize("shape,centres", [((40, 23), [(12, 11), (26, 11)]), ((36, 21, 19), [(10, 10, 9), (24, 10, 9)])])
def test_watershed_splits_touching_discs_that_components_merge(shape, centres):
    mask = _discs(shape, centres, 7)
    lab = mask.astype(np.uint8)
    merged, _ = semantic_instances(lab, InstanceSettings("components"))
    split, _ = semantic_instances(lab, InstanceSettings("watershed", min_distance=4))
    assert merged.max() == 1
    assert split.max() == 2
    assert set(np.unique(split[mask])) == {1, 2} and not split[~mask].any()  # every foreground voxel owned, nothing else
    for c in centres:  # each disc's centre belongs to a different object
        assert split[c] > 0
    assert split[centres[0]] != split[centres[1]]


def test_watershed_keeps_separate_objects_and_flat_components():
    mask = _discs((50, 30), [(10, 10)], 6) | _discs((50, 30), [(38, 15)], 4)
    mask[45:47, 2:4] = True  # a 2x2 square: a flat distance map, still one object
    out = watershed_split(mask, min_distance=5)
    assert out.max() == 3


def test_objects_of_one_region_min_size_and_scores():
    brats = get_scheme("brats")
    lab = np.zeros((30, 30, 10), np.uint8)
    lab[2:12, 2:12, 2:8] = 2  # edema with an enhancing core
    lab[5:8, 5:8, 4:6] = 4
    lab[20:26, 20:26, 3:6] = 1  # necrosis only (in TC, not in ET)
    lab[28, 28, 8] = 4  # one stray ET voxel
    et, _ = semantic_instances(lab, InstanceSettings("components", target="ET"), scheme=brats)
    assert et.max() == 2
    et, _ = semantic_instances(lab, InstanceSettings("components", target="ET", min_size=2), scheme=brats)
    assert et.max() == 1 and et[6, 6, 5] == 1
    wt, scores = semantic_instances(lab, InstanceSettings("components", target="WT"), scheme=brats)
    assert wt.max() == 3 and set(scores.values()) == {1.0}
    with pytest.raises(MedsegError, match="no class or region"):
        semantic_instances(lab, InstanceSettings("components", target="XX"), scheme=brats)
    probs = np.zeros((3, *lab.shape), np.float32)  # regions WT, TC, ET: the score is the mean WT probability
    probs[0][lab > 0] = 0.8
    probs[0][20:26, 20:26, 3:6] = 0.6
    _, scores = semantic_instances(lab, InstanceSettings("components", target="WT"), scheme=brats, probabilities=probs)
    assert sorted(round(v, 6) for v in scores.values()) == [0.6, 0.8, 0.8]


def test_object_scores_are_means_under_each_object():
    inst = np.array([[1, 1, 0], [2, 0, 2]])
    prob = np.array([[0.2, 0.4, 1.0], [0.5, 1.0, 0.7]])
    assert object_scores(inst, prob) == pytest.approx({1: 0.3, 2: 0.6})


# ----------------------------------------------------------------------------- training and prediction
@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    root = generate_instances_2d(tmp_path_factory.mktemp("cells"), n_images=6, size=(72, 56))
    assert main(["manifest", str(root), "-o", str(root / "m.csv"), "--folds", "3"]) == 0
    return root


def _pipeline(root: Path, name: str, model: str, kwargs: dict, target: str) -> Path:
    text = f"""name: {name}
seed: 0
data: {{manifest: m.csv, target: {target}, val_fold: 0, workers: 0}}
preprocessing: {{crop_foreground: false, normalize: rgb}}
model: {{name: {model}, spatial_dims: 2, kwargs: {json.dumps(kwargs)}}}
sampling: {{patch_size: [64, 32], batch_size: 2, sampler: uniform}}
optimizer: {{name: adamw, lr: 0.002}}
training: {{epochs: 1, iterations_per_epoch: 3, val_interval: 1}}
inference: {{roi_size: [64, 32]}}
"""
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def _reference_objects(root: Path, case: str) -> int:
    return len(list((root / "masks" / case).glob("*.png")))


def test_instance_model_trains_predicts_and_is_scored_through_the_commands(cells, tmp_path):
    from medseg.models import MODELS

    pipe = _pipeline(cells, "tiny_mrcnn", "maskrcnn", dict(MODELS["maskrcnn"].test_kwargs), "instances")
    run, preds, report = tmp_path / "run", tmp_path / "preds", tmp_path / "report"
    assert main(["train", str(pipe), "--output", str(run)]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["target"] == "instances" and ckpt["model"]["name"] == "maskrcnn"
    assert main(["predict", "--model", str(run), "--input", str(cells / "m.csv"), "--output", str(preds),
                 "--instances", "--score-threshold", "0.05"]) == 0
    for case in ("cell00", "cell03"):
        image = Image.open(cells / "images" / f"{case}.png")
        inst = Image.open(preds / f"{case}_instances.png")
        assert inst.size == image.size  # the input's width and height
        ids = set(np.unique(np.asarray(inst)).tolist()) - {0}
        table = json.loads((preds / f"{case}_instances.json").read_text())
        assert {o["id"] for o in table["objects"]} == ids
        assert all(0.05 <= o["score"] <= 1 for o in table["objects"])
        labels = np.asarray(Image.open(preds / f"{case}.png"))
        assert labels.shape == np.asarray(image).shape[:2]
        assert np.array_equal(np.asarray(inst) > 0, labels > 0)  # the label map is the objects, painted
        assert table["method"] == "model" and table["target"] is None
    assert main(["evaluate", "--predictions", str(preds), "--manifest", str(cells / "m.csv"), "--output", str(report),
                 "--objects"]) == 0
    objects = pd.read_csv(report / "objects.csv")
    refs = objects[(objects["kind"] == "reference") & (objects["id"] == "cell00")]
    assert len(refs) == _reference_objects(cells, "cell00")  # the reference's own objects, one row each
    assert "Objects" in (report / "report.html").read_text()
    assert "objects" in json.loads((report / "summary.json").read_text())
    found = objects[(objects["id"] == "cell00") & objects["pred_id"].notna()]["pred_id"].astype(int)
    ids = set(np.unique(np.asarray(Image.open(preds / "cell00_instances.png"))).tolist()) - {0}
    assert set(found) <= ids  # objects.csv names the objects by their ids in the instance file
    assert main(["predict", "--model", str(run), "--input", str(cells / "m.csv"), "--output", str(tmp_path / "p2"),
                 "--instances", "--instance-target", "foreground"]) == 1  # an instance model's objects are all its classes


def test_semantic_model_with_watershed_objects(cells, tmp_path, capsys):
    pipe = _pipeline(cells, "tiny_unet", "unet", {"channels": [4, 8], "strides": [2]}, "labels")
    run, preds = tmp_path / "run", tmp_path / "preds"
    assert main(["train", str(pipe), "--output", str(run)]) == 0
    assert main(["predict", "--model", str(run), "--input", str(cells / "images"), "--output", str(preds),
                 "--instances", "watershed", "--min-object-size", "3"]) == 0
    inst = np.asarray(Image.open(preds / "cell01_instances.png"))
    labels = np.asarray(Image.open(preds / "cell01.png"))
    assert inst.shape == labels.shape
    assert not (inst[labels == 0] > 0).any()  # objects only where the label map has foreground
    sizes = np.bincount(inst.ravel())[1:]
    assert (sizes[sizes > 0] >= 3).all()
    assert main(["predict", "--model", str(run), "--input", str(cells / "images"), "--output", str(tmp_path / "p2"),
                 "--instances", "model"]) == 1
    assert "is a semantic model" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()  # refused before anything was written


def test_target_and_model_kind_must_agree(cells, tmp_path, capsys):
    from medseg.models import MODELS

    assert main(["train", str(_pipeline(cells, "bad1", "unet", {"channels": [4, 8], "strides": [2]}, "instances")),
                 "--output", str(tmp_path / "a")]) == 1
    assert "needs an instance model" in capsys.readouterr().err
    assert main(["train", str(_pipeline(cells, "bad2", "yolact", dict(MODELS["yolact"].test_kwargs), "labels")),
                 "--output", str(tmp_path / "b")]) == 1
    assert "set data.target: instances" in capsys.readouterr().err
    one_class = _pipeline(cells, "bad3", "maskrcnn", dict(MODELS["maskrcnn"].test_kwargs), "instances")
    assert main(["train", str(one_class), "--output", str(tmp_path / "c"), "--set", "data.label_scheme=msd"]) == 1
    assert "one kind of object" in capsys.readouterr().err  # objects carry no class yet: a 3-class scheme is refused


def test_init_weights_loads_matching_tensors(tmp_path, capsys):
    from medseg.models import create_model
    from medseg.training.steps import load_initial_weights

    a = create_model("unet", 2, 1, 2, channels=(4, 8), strides=(2,))
    b = create_model("unet", 2, 1, 3, channels=(4, 8), strides=(2,))  # another head: its last layer does not fit
    torch.save(a.state_dict(), tmp_path / "w.pt")
    load_initial_weights(b, tmp_path / "w.pt")
    fitted = [k for k, v in b.state_dict().items() if k in a.state_dict() and a.state_dict()[k].shape == v.shape]
    assert fitted and all(torch.equal(b.state_dict()[k], a.state_dict()[k]) for k in fitted)
    assert "keep their initialisation" in capsys.readouterr().out
    with pytest.raises(MedsegError, match="not found"):
        load_initial_weights(b, tmp_path / "none.pt")


# ----------------------------------------------------------------------------- evaluate --objects
def _png(array_rows: np.ndarray, path: Path) -> None:
    Image.fromarray(array_rows.astype(np.uint16 if array_rows.max() > 255 else np.uint8)).save(path)


def test_object_metrics_on_a_constructed_case(tmp_path):
    """Reference: three discs, two of them touching. Prediction: the first disc exactly, the two touching ones as one
    blob (split correctly by its instance map), and a false positive."""
    h, w = 40, 60
    yy, xx = np.mgrid[:h, :w]
    discs = [((yy - 10) ** 2 + (xx - 10) ** 2 <= 36), ((yy - 25) ** 2 + (xx - 30) ** 2 <= 36),
             ((yy - 25) ** 2 + (xx - 42) ** 2 <= 36)]
    (tmp_path / "masks" / "c0").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for k, d in enumerate(discs):
        _png(d * 255, tmp_path / "masks" / "c0" / f"{k}.png")
    _png((sum(discs) > 0) * 120 + 20, tmp_path / "images" / "c0.png")
    assert main(["manifest", str(tmp_path), "-o", str(tmp_path / "m.csv")]) == 0
    preds = tmp_path / "preds"
    preds.mkdir()
    fp = (yy - 35) ** 2 + (xx - 55) ** 2 <= 4
    semantic = (sum(discs) > 0) | fp
    _png(semantic.astype(np.uint8), preds / "c0.png")  # labels of scheme foreground: 0/1
    inst = np.zeros((h, w), np.uint16)
    for k, d in reversed(list(enumerate([*discs, fp], start=1))):
        inst[d] = 10 * k  # ids need not be consecutive; where discs 2 and 3 touch, the first keeps the pixel, as in the reference
    _png(inst, preds / "c0_instances.png")
    objects = [{"id": 10 * k, "score": s} for k, s in zip(range(1, 5), (0.9, 0.8, 0.7, 0.6))]
    (preds / "c0_instances.json").write_text(json.dumps({"objects": objects}))

    def scores(out):
        assert main(["evaluate", "--predictions", str(preds), "--manifest", str(tmp_path / "m.csv"), "--output", str(out),
                     "--objects"]) == 0
        return pd.read_csv(out / "object_metrics.csv").iloc[0]

    row = scores(tmp_path / "r1")
    # 3 references all matched exactly (IoU 1), one false positive: P = 3/4, R = 1, F1 = 6/7, SQ = 1, PQ = RQ = F1
    assert (row["tp"], row["fp"], row["fn"]) == (3, 1, 0)
    assert row["precision"] == pytest.approx(0.75) and row["recall"] == pytest.approx(1.0)
    assert row["pq"] == pytest.approx(6 / 7) and row["sq"] == pytest.approx(1.0)
    # AJI: C = the pixels of the three discs (the shared pixel once); U = C + the false positive's pixels
    covered = int((sum(discs) > 0).sum())
    assert row["aji"] == pytest.approx(covered / (covered + int(fp.sum())))
    summary = pd.read_csv(tmp_path / "r1" / "object_summary.csv").set_index("metric")["mean"]
    # pooled AP: detections 0.9, 0.8, 0.7 hit (IoU 1 at every threshold), 0.6 misses: precision 1 up to recall 1
    assert summary["ap50"] == pytest.approx(1.0) and summary["map"] == pytest.approx(1.0)

    (preds / "c0_instances.png").unlink()  # without the instance map the touching pair is one component, whose IoU with
    row = scores(tmp_path / "r2")           # the first disc of the pair is just over 0.5 (it keeps the shared pixel)
    assert (row["n_predicted"], row["tp"], row["fn"], row["fp"]) == (3, 2, 1, 1)


def test_a_map_of_one_region_is_used_for_that_region_only(tmp_path):
    """A map written with --instance-target ET holds ET objects: WT and TC are scored on components of their masks."""
    from medseg.data.io import write_volume
    from medseg.data.volume import Volume

    ref = np.zeros((30, 20, 16), np.uint8)
    ref[4:14, 4:14, 4:12] = 2
    ref[6:9, 6:9, 6:9] = 4
    ref[10:13, 6:9, 6:9] = 4  # two ET foci inside one whole tumour
    for name in ("ref", "pred"):
        (tmp_path / name).mkdir()
    write_volume(Volume(ref, np.eye(4)), tmp_path / "ref" / "c.nii.gz")
    write_volume(Volume(ref, np.eye(4)), tmp_path / "pred" / "c.nii.gz")  # a perfect prediction
    et = np.zeros(ref.shape, np.uint16)
    et[6:9, 6:9, 6:9], et[10:13, 6:9, 6:9] = 3, 8
    write_volume(Volume(et, np.eye(4)), tmp_path / "pred" / "c_instances.nii.gz")
    body = {"method": "components", "target": "ET", "objects": [{"id": 3, "score": 0.9}, {"id": 8, "score": 0.8}]}
    (tmp_path / "pred" / "c_instances.json").write_text(json.dumps(body))
    write_volume(Volume(ref.astype(np.float32), np.eye(4)), tmp_path / "ref" / "img.nii.gz")
    (tmp_path / "m.csv").write_text("id,image,label,label_scheme\nc,ref/img.nii.gz,ref/c.nii.gz,brats\n")
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--manifest", str(tmp_path / "m.csv"), "--output",
                 str(tmp_path / "rep"), "--objects", "--no-overlays"]) == 0
    rows = pd.read_csv(tmp_path / "rep" / "object_metrics.csv").set_index("target")
    assert (rows["pq"] == 1.0).all() and (rows["aji"] == 1.0).all()  # perfect everywhere: no map misapplied
    objects = pd.read_csv(tmp_path / "rep" / "objects.csv")
    assert sorted(objects.loc[objects["target"] == "ET", "pred_id"].astype(int)) == [3, 8]  # the file's ids


def test_lesion_wise_through_evaluate_matches_the_array_function(tmp_path):
    from medseg.data.io import write_volume
    from medseg.data.volume import Volume
    from medseg.evaluation.lesionwise import lesion_wise

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = np.zeros((40, 36, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 2
    ref[8:12, 8:12, 8:12] = 4
    ref[25:32, 25:32, 20:26] = 1  # a second lesion, missed
    pred = np.zeros_like(ref)
    pred[6:15, 5:15, 5:15] = 2
    pred[8:12, 8:12, 8:11] = 4
    pred[30:34, 2:6, 2:6] = 2  # a false positive
    for name, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / name).mkdir()
        write_volume(Volume(arr, affine), tmp_path / name / "case1.nii.gz")
    write_volume(Volume(ref.astype(np.float32), affine), tmp_path / "ref" / "img.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,label,label_scheme\ncase1,ref/img.nii.gz,ref/case1.nii.gz,brats\n")
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--manifest", str(manifest), "--output",
                 str(tmp_path / "rep"), "--objects", "--no-overlays"]) == 0
    rows = pd.read_csv(tmp_path / "rep" / "object_metrics.csv").set_index("target")
    assert list(rows.index) == ["WT", "TC", "ET"]
    wt = lesion_wise(ref > 0, pred > 0, (1.0, 1.0, 1.0))
    assert rows.loc["WT", "lesion_dice"] == pytest.approx(wt.dice, abs=1e-5)  # the CSV keeps 6 digits
    assert rows.loc["WT", "lesion_hd95"] == pytest.approx(wt.hd95, rel=1e-5)
    assert (rows.loc["WT", "lesion_tp"], rows.loc["WT", "lesion_fn"], rows.loc["WT", "lesion_fp"]) == (1, 1, 1)
    assert wt.dice < 0.5  # one of three terms (a found lesion) is non-zero
