"""``evaluate`` and ``medseg evaluate`` on small synthetic NIfTI files: matching, geometry, conventions, bad input."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.io import read_volume, write_volume
from medseg.data.manifest import Case, Manifest, write_manifest
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.evaluation import evaluate

SHAPE = (20, 17, 12)
AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, -0.9, 0, 12.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])  # LPS-like, anisotropic


def _label(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    c = rng.integers(6, 11, 3)
    lab[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 4, 2:10] = 2
    lab[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 2, 3:8] = 1
    lab[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 1, 4:7] = 4
    return lab


@pytest.fixture
def dataset(tmp_path) -> dict:
    """Three cases: scan + brats label, predictions folder (``<id>.nii.gz``) with imperfect predictions."""
    preds = tmp_path / "preds"
    cases = []
    for i in range(3):
        cid = f"case{i}"
        ref = _label(i)
        scan = tmp_path / f"{cid}_t1.nii.gz"
        write_volume(Volume(np.random.default_rng(i).normal(size=SHAPE).astype(np.float32), AFFINE), scan)
        write_volume(Volume(ref, AFFINE), tmp_path / f"{cid}_seg.nii.gz")
        write_volume(Volume(np.roll(ref, i, axis=0), AFFINE), preds / f"{cid}.nii.gz")
        cases.append(Case(cid, {"t1": scan}, tmp_path / f"{cid}_seg.nii.gz"))
    manifest = write_manifest(Manifest(("t1",), tuple(cases), "brats"), tmp_path / "gt.csv")
    return {"root": tmp_path, "preds": preds, "manifest": manifest, "cases": cases}


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.nii.gz"))}


def test_cli_writes_reports_and_leaves_inputs_alone(dataset, capsys):
    before = _digest(dataset["root"])
    out = dataset["root"] / "report"
    rc = main(["evaluate", "--predictions", str(dataset["preds"]), "--manifest", str(dataset["manifest"]), "--output", str(out), "--no-progress"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"cases.csv", "summary.csv", "summary.json", "confusion.csv", "report.html"}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["cases"], summary["evaluated"], summary["missing"]) == (3, 3, 0)
    assert summary["ranking"][-1]["id"] == "case0" and summary["ranking"][-1]["score"] == 1.0  # the unshifted one
    assert "WT  Dice" in capsys.readouterr().out
    assert _digest(dataset["root"]) == before  # inputs unchanged (the report folder holds no NIfTI)


def test_missing_prediction_is_a_counted_row(dataset):
    (dataset["preds"] / "case1.nii.gz").unlink()
    res = evaluate(dataset["preds"], dataset["manifest"])
    missing = res.cases[res.cases["id"] == "case1"]
    assert len(missing) == 7  # 3 classes, 3 regions, the case row: an empty selection would pass the next line
    assert (missing["status"] == "missing").all() and missing["dice"].isna().all()
    dice_wt = res.summary.query("target == 'WT' and metric == 'dice'").iloc[0]
    assert (dice_wt["count"], dice_wt["missing"]) == (2, 1)


def test_prediction_on_another_grid(dataset):
    ref_path = dataset["cases"][0].label
    ref = read_volume(ref_path)
    flipped = AFFINE @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    write_volume(Volume(ref.array[::-1].copy(), flipped), dataset["preds"] / "case0.nii.gz")  # same world, flipped axis
    with pytest.raises(MedsegError, match="case case0.*not on the ground truth's grid.*--resample"):
        evaluate(dataset["preds"], dataset["manifest"])
    res = evaluate(dataset["preds"], dataset["manifest"], resample=True)
    rows = res.cases.query("id == 'case0' and kind != 'case'")
    assert len(rows) == 6 and (rows["dice"] == 1).all()
    write_volume(Volume(ref.array[:-2], AFFINE), dataset["preds"] / "case0.nii.gz")
    assert main(["evaluate", "--predictions", str(dataset["preds"]), "--manifest", str(dataset["manifest"]),
                 "--output", str(dataset["root"] / "r")]) == 1


def test_label_values_outside_the_scheme_and_conversion(dataset, capsys):
    for case in dataset["cases"]:  # predictions written with ET = 3 (BraTS 2023 convention)
        ref = read_volume(case.label).array
        write_volume(Volume(np.where(ref == 4, 3, ref).astype(np.uint8), AFFINE), dataset["preds"] / f"{case.id}.nii.gz")
    args = ["evaluate", "--predictions", str(dataset["preds"]), "--manifest", str(dataset["manifest"]), "--output", str(dataset["root"] / "r")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: case case0") and "label value(s) 3" in err and "--prediction-scheme" in err
    assert main(args + ["--prediction-scheme", "brats2023"]) == 0
    res = evaluate(dataset["preds"], dataset["manifest"], prediction_scheme="brats2023")
    rows = res.cases.query("kind != 'case'")
    assert len(rows) == 3 * 6 and (rows["dice"] == 1).all()


def test_duplicate_ids_and_ambiguous_predictions(dataset, capsys):
    text = dataset["manifest"].read_text()
    dup = dataset["root"] / "dup.csv"
    dup.write_text(text + text.strip().splitlines()[-1] + "\n")
    assert main(["evaluate", "--predictions", str(dataset["preds"]), "--manifest", str(dup), "--output", str(dataset["root"] / "r")]) == 1
    assert "appears more than once" in capsys.readouterr().err
    case = dataset["cases"][0]
    with pytest.raises(MedsegError, match="appear more than once"):
        evaluate(dataset["preds"], Manifest(("t1",), (case, case), "brats"))
    write_volume(read_volume(dataset["preds"] / "case0.nii.gz"), dataset["preds"] / "case0.nii")
    with pytest.raises(MedsegError, match="several predictions"):
        evaluate(dataset["preds"], dataset["manifest"])


def test_scheme_is_required(dataset):
    m = write_manifest(Manifest(("t1",), tuple(dataset["cases"]), None), dataset["root"] / "noscheme.csv")
    with pytest.raises(MedsegError, match="--scheme"):
        evaluate(dataset["preds"], m)
    assert len(evaluate(dataset["preds"], m, "brats").cases) == 3 * 7


def test_subfolders_prediction_manifest_and_workers(dataset):
    sub = dataset["root"] / "sub"
    for case in dataset["cases"]:
        (sub / case.id).mkdir(parents=True)
        (sub / case.id / "seg.nii.gz").symlink_to(dataset["preds"] / f"{case.id}.nii.gz")
    (sub / "stray").mkdir()
    pm = write_manifest(Manifest(("t1",), tuple(Case(c.id, c.images, dataset["preds"] / f"{c.id}.nii.gz") for c in dataset["cases"])),
                        dataset["root"] / "preds.csv")
    base = evaluate(dataset["preds"], dataset["manifest"])
    from_sub = evaluate(sub, dataset["manifest"])
    assert from_sub.unmatched == ("stray",)
    for other in (from_sub, evaluate(pm, dataset["manifest"]), evaluate(dataset["preds"], dataset["manifest"], workers=2)):
        cols = ["id", "kind", "target", "dice", "hd95", "nsd"]
        assert other.cases[cols].equals(base.cases[cols])


def test_side_files_of_predict_are_told_from_label_maps():
    from medseg.evaluation.evaluate import is_side_file

    for name in ("c1_prob.nii.gz", "c1_overlay.png", "c1_instances.png", "c1_instances.tif", "c1_instances.nii.gz",
                 "c1_instances.json"):
        assert is_side_file(name), name
    for name in ("c1.nii.gz", "c1.png", "c1.tif", "c1_probe.nii.gz", "c1_instance.png"):
        assert not is_side_file(name), name
