"""The two-stage cascade (medseg.inference.cascade): a refiner's output kept within a margin (mm) of its localiser's
foreground, on the scan's own grid; a fold's refiner localised by the same fold; the pipeline's cascade section
reaching medseg predict through the checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.cli import main
from medseg.data.io import read_volume, write_volume
from medseg.data.labels import get_scheme
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.inference import loading
from medseg.checkpoint import for_fold
from medseg.inference.cascade import choose_mix, region_of, restrict, stage_mixes

SPACING = (1.0, 1.5, 3.0)
# a non-RAS grid (axes flipped and permuted): the refiner reorients to RAS and back, the region must not move
AFFINE = np.array([[0.0, -1.5, 0.0, 40.0], [-1.0, 0.0, 0.0, 30.0], [0.0, 0.0, 3.0, -20.0], [0, 0, 0, 1.0]])


class Constant(torch.nn.Module):
    """Region logits: WT where the first channel is bright (the localiser), or every region everywhere (the refiner;
    ``mild``: at probability 0.73), or nothing (a localiser that finds nothing)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.full((x.shape[0], 3, *x.shape[2:]), -20.0, device=x.device) + self.dummy
        if self.mode == "everything":
            return -out
        if self.mode == "mild":  # every region at probability sigmoid(1) = 0.73
            return out * 0 + 1.0
        if self.mode == "bright":
            out[:, 0] = torch.where(x[:, 0] > 2.0, 20.0, -20.0)
        return out


@pytest.fixture(autouse=True)
def constant_models(monkeypatch):
    monkeypatch.setattr(loading, "build_model", lambda cfg: Constant(cfg["kwargs"]["mode"]))


def checkpoint(path: Path, mode: str, fold: int | None = None, **inference) -> Path:
    scheme = get_scheme("brats")
    ckpt = {"format": "medseg-checkpoint", "model": {"name": "constant", "spatial_dims": 3, "in_channels": 4, "out_channels": 3,
                                                     "kwargs": {"mode": mode}},
            "state_dict": Constant(mode).state_dict(), "channels": ["flair", "t1", "t1ce", "t2"], "label_scheme": scheme.to_dict(),
            "target": "regions", "preprocessing": {}, "pipeline": {"data": {"val_fold": fold}},
            "inference": {"roi_size": [16, 16, 8], "overlap": 0.25, "sw_batch_size": 4, "tta": False, "amp": "off", **inference}}
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path / "checkpoints" / "last.pt")
    return path


@pytest.fixture
def scan(tmp_path) -> list[Path]:
    """A head (value 1) with one bright blob (value 6) in its first channel, on a non-RAS anisotropic grid."""
    rng = np.random.default_rng(0)
    head = np.zeros((40, 30, 14), np.float32)
    head[4:36, 3:27, 2:12] = 1.0 + 0.05 * rng.standard_normal((32, 24, 10))
    files = []
    for c in ("flair", "t1", "t1ce", "t2"):
        arr = head.copy()
        if c == "flair":
            arr[20:25, 10:14, 6:8] = 6.0
        files.append(write_volume(Volume(arr, AFFINE), tmp_path / "case" / f"case_{c}.nii.gz"))
    return files


def predict(model: Path, files, out: Path, *extra) -> np.ndarray:
    assert main(["predict", "--model", str(model), "--input", *map(str, files), "--output", str(out), "--id", "case",
                 "--no-progress", *extra]) == 0
    return read_volume(out / "case.nii.gz")


def probabilities(model: Path, files, out: Path, *extra) -> np.ndarray:
    predict(model, files, out, "--probabilities", *extra)
    return np.asarray(read_volume(out / "case_prob.nii.gz").array)


def test_region_of_is_the_distance_in_millimetres_on_the_scans_grid():
    labels = np.zeros((20, 20, 9), np.uint8)
    labels[10, 10, 4] = 2
    got = region_of(labels, SPACING, 4.5)
    idx = np.indices(labels.shape).astype(float)
    dist = np.sqrt(sum(((idx[a] - c) * s) ** 2 for a, (c, s) in enumerate(zip((10, 10, 4), SPACING))))
    np.testing.assert_array_equal(got, dist <= 4.5)
    assert got[10, 10, 5] and not got[10, 10, 6]  # 3 mm on the third axis, 6 mm too far
    assert not region_of(np.zeros((5, 5, 5)), SPACING, 10.0).any()


def test_restrict_sets_background_for_regions_and_for_classes():
    probs = np.full((3, 4, 4), 0.9, np.float32)
    region = np.zeros((4, 4), bool)
    region[1:3, 1:3] = True
    out = restrict(probs, region, "regions")
    assert (out[:, region] == 0.9).all() and (out[:, ~region] == 0).all() and (probs == 0.9).all()
    out = restrict(probs, region, "labels")
    assert (out[0, ~region] == 1).all() and (out[1:, ~region] == 0).all()
    with pytest.raises(MedsegError, match="one grid"):
        restrict(probs, region[:3], "regions")


def test_refiner_output_is_kept_within_the_margin_of_the_localisers_foreground(tmp_path, scan):
    localiser = checkpoint(tmp_path / "loc", "bright")
    refiner = checkpoint(tmp_path / "ref", "everything", localiser=str(localiser), localiser_margin_mm=4.0)
    found = predict(localiser, scan, tmp_path / "p_loc")
    assert found.array.any()
    out = predict(refiner, scan, tmp_path / "p_ref")
    assert out.shape == found.shape and np.allclose(out.affine, AFFINE, atol=1e-4)
    expected = region_of(found.array, SPACING, 4.0)
    np.testing.assert_array_equal(out.array != 0, expected)  # every region everywhere inside: ET (4)
    assert set(np.unique(out.array[expected]).tolist()) == {4} and expected.sum() > (found.array != 0).sum()
    # --localiser-margin overrides the checkpoint's margin; without a localiser the refiner covers the head
    wider = predict(refiner, scan, tmp_path / "p_wide", "--localiser-margin", "9")
    np.testing.assert_array_equal(wider.array != 0, region_of(found.array, SPACING, 9.0))
    plain = predict(checkpoint(tmp_path / "plain", "everything"), scan, tmp_path / "p_plain")
    assert (plain.array != 0).sum() > (wider.array != 0).sum()


def test_a_folds_refiner_is_localised_by_the_same_fold_and_an_ensemble_by_the_ensemble(tmp_path, scan):
    cv = tmp_path / "loc_cv"
    checkpoint(cv / "fold_0", "bright", fold=0)
    checkpoint(cv / "fold_1", "nothing", fold=1)
    assert for_fold(cv, 1) == cv / "fold_1" and for_fold(cv, None) == cv
    assert for_fold(cv / "fold_0", 1) == cv / "fold_0"  # a single run localises every fold
    r0 = checkpoint(tmp_path / "ref_cv" / "fold_0", "everything", fold=0, localiser=str(cv))
    r1 = checkpoint(tmp_path / "ref_cv" / "fold_1", "everything", fold=1, localiser=str(cv))
    assert predict(r0, scan, tmp_path / "p0").array.any()
    assert not predict(r1, scan, tmp_path / "p1").array.any()  # fold 1's localiser finds nothing: nothing kept
    # the refiner ensemble uses the localiser ensemble: the mean of "bright" and "nothing" is below 0.5 everywhere
    assert not predict(tmp_path / "ref_cv", scan, tmp_path / "p_ens").array.any()
    # an explicit --localiser replaces the checkpoint's
    assert predict(r1, scan, tmp_path / "p1b", "--localiser", str(cv / "fold_0")).array.any()
    with pytest.raises(MedsegError, match="first stage"):
        from medseg.inference.predictor import Predictor

        Predictor.from_checkpoint(r1, localiser=str(tmp_path / "not_trained"))


def test_stages_reading_other_channels_are_refused(tmp_path, scan):
    localiser = checkpoint(tmp_path / "loc", "bright")
    ckpt = torch.load(localiser / "checkpoints" / "last.pt", weights_only=False)
    ckpt["channels"] = ["t1", "flair", "t1ce", "t2"]
    torch.save(ckpt, localiser / "checkpoints" / "last.pt")
    refiner = checkpoint(tmp_path / "ref", "everything", localiser=str(localiser))
    with pytest.raises(MedsegError, match="reads channels"):
        from medseg.inference.predictor import Predictor

        Predictor.from_checkpoint(refiner)


def test_the_pipelines_cascade_section_reaches_the_checkpoint(tmp_path, capsys):
    from medseg.training.config import load_pipeline
    from medseg.training.trainer import train

    data = {"name": "refiner", "data": {"synthetic": {"cases": 3, "shape": [32, 32, 24], "seed": 1}, "workers": 0},
            "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
            "sampling": {"patch_size": [16, 16, 16], "batch_size": 2},
            "training": {"epochs": 1, "iterations_per_epoch": 1, "threads": 1}}
    data["cascade"] = {"localiser": "../runs/first_stage", "margin_mm": 5, "average": ["WT"]}
    (tmp_path / "pipelines").mkdir()
    path = tmp_path / "pipelines" / "refiner.yaml"
    path.write_text(yaml.safe_dump(data))
    p = load_pipeline(path)
    assert p.cascade.margin_mm == 5.0
    train(p, run_dir=tmp_path / "run", progress=False)
    # validation goes through the localiser (test below); before the first stage is trained it says it cannot
    assert "validation scores the refiner alone" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert Path(ckpt["inference"]["localiser"]) == (tmp_path / "runs" / "first_stage").resolve()
    assert ckpt["inference"]["localiser_margin_mm"] == 5.0 and ckpt["inference"]["localiser_average"] == ["WT"]
    data["cascade"] = {"margin_mm": -1}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MedsegError, match="cascade.margin_mm"):
        load_pipeline(path)


def test_averaged_regions_are_the_mean_of_both_stages_within_the_region(tmp_path, scan):
    localiser = checkpoint(tmp_path / "loc", "bright")
    refiner = checkpoint(tmp_path / "ref", "mild", localiser=str(localiser), localiser_margin_mm=4.0)
    p_loc = probabilities(localiser, scan, tmp_path / "p_loc")
    p_ref = probabilities(refiner, scan, tmp_path / "p_ref")
    p_avg = probabilities(refiner, scan, tmp_path / "p_avg", "--localiser-average", "WT")
    region = region_of(predict(localiser, scan, tmp_path / "l").array, SPACING, 4.0)
    assert (p_ref[region] > 0.7).all() and (p_avg[~region] == 0).all()
    np.testing.assert_allclose(p_avg[region][:, 0], 0.5 * (p_loc[region][:, 0] + p_ref[region][:, 0]), atol=1e-5)
    np.testing.assert_allclose(p_avg[region][:, 1:], p_ref[region][:, 1:], atol=1e-6)  # TC, ET: the refiner's
    # WT survives where the localiser found it (0.86), not in the margin around it (0.37)
    found = predict(refiner, scan, tmp_path / "avg", "--localiser-average", "WT", "TC", "ET").array
    np.testing.assert_array_equal(found != 0, predict(localiser, scan, tmp_path / "l2").array != 0)
    # the pipeline's choice is stored in the checkpoint; 'none' turns it off; a name outside the scheme is refused
    stored = checkpoint(tmp_path / "ref2", "mild", localiser=str(localiser), localiser_margin_mm=4.0, localiser_average=["WT"])
    np.testing.assert_allclose(probabilities(stored, scan, tmp_path / "p_st"), p_avg, atol=1e-6)
    np.testing.assert_allclose(probabilities(stored, scan, tmp_path / "p_no", "--localiser-average", "none"), p_ref, atol=1e-6)
    with pytest.raises(MedsegError, match="not regions"):
        from medseg.inference.predictor import Predictor

        Predictor.from_checkpoint(refiner, localiser_average=["edema"])


def test_stage_mixes_are_every_subset_of_the_regions_and_the_best_mean_is_chosen():
    assert stage_mixes(["WT", "TC", "ET"]) == [(), ("WT",), ("TC",), ("ET",), ("WT", "TC"), ("WT", "ET"), ("TC", "ET"),
                                              ("WT", "TC", "ET")]
    assert stage_mixes(["a", "b", "c"], per_region=False) == [(), ("a", "b", "c")]  # softmax classes: all or none
    assert len(stage_mixes([f"r{i}" for i in range(6)])) == 8  # past 16 subsets: none, each alone, all
    # the mix with the best mean wins although no region alone would choose it: TC averaged costs ET here
    scores = {(): {"WT": 0.80, "TC": 0.70, "ET": 0.60}, ("WT",): {"WT": 0.85, "TC": 0.70, "ET": 0.60},
              ("WT", "TC"): {"WT": 0.85, "TC": 0.75, "ET": 0.50}, ("WT", "ET"): {"WT": 0.85, "TC": 0.70, "ET": 0.62}}
    choice = choose_mix(scores)
    assert choice["average"] == ["WT", "ET"] and len(choice["mixes"]) == 4
    assert choose_mix({(): {"WT": 0.8}, ("WT",): {"WT": 0.8}})["average"] == []  # a tie: fewer regions averaged


def test_stage_mix_folders_have_safe_names():
    from medseg.training.crossval import _mix_tag

    assert [_mix_tag(m, ["WT", "TC", "ET"], i) for i, m in enumerate([(), ("WT", "TC"), ("WT", "TC", "ET")])] == \
        ["none", "WT_TC", "WT_TC_ET"]
    classes = ["liver", "tumor core", "a/b", "spleen"]
    assert _mix_tag(classes, classes, 1) == "all" and _mix_tag(("tumor core", "a/b"), classes, 2) == "tumor-core_a-b"
    assert _mix_tag(tuple(f"organ_{i:02d}" for i in range(8)), ["x"] * 9, 5) == "mix5"  # too long for a folder name


def _cv_of_constant_cascade(tmp_path, scan, margin: float, truth: np.ndarray) -> dict:
    """Two folds of a 'bright' localiser and a 'mild' refiner on two copies of the scan labelled ``truth``; the CV summary."""
    from medseg.data.manifest import read_manifest
    from medseg.training.crossval import summarize_cv

    label = write_volume(Volume(truth.astype(np.uint8), AFFINE), tmp_path / "case" / "case_seg.nii.gz")
    rows = ["id,flair,t1,t1ce,t2,label,fold"] + [f"c{k},{','.join(map(str, scan))},{label},{k}" for k in (0, 1)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    for k in (0, 1):
        checkpoint(tmp_path / "loc" / f"fold_{k}", "bright", fold=k)
        checkpoint(tmp_path / "ref" / f"fold_{k}", "mild", fold=k, localiser=str(tmp_path / "loc"), localiser_margin_mm=margin)
    return summarize_cv(tmp_path / "ref", read_manifest(tmp_path / "m.csv"), [0, 1])


def test_each_stage_mix_is_scored_as_predict_labels_it(tmp_path, scan):
    truth = np.zeros(read_volume(scan[0]).shape, np.uint8)
    truth[20:25, 10:14, 6:8] = 1  # the blob is necrotic core: no ET
    choice = _cv_of_constant_cascade(tmp_path, scan, 4.0, truth)
    mixes = {tuple(m["average"]): m["dice"] for m in choice["cascade"]["mixes"]}
    assert len(mixes) == 8
    # the refiner's TC covers the margin around the blob and a label map's WT holds its TC, so averaging WT alone
    # changes nothing (a map taking WT from the averaged map and TC/ET from the refiner's would score WT 1.0)
    assert mixes[("WT",)]["WT"] == mixes[()]["WT"] < 0.5
    assert mixes[("WT", "TC", "ET")]["WT"] == 1.0 and choice["cascade"]["average"] == ["WT", "TC", "ET"]
    # what the CV scored is what predict gives the fold ensemble (both folds are the same models)
    ensemble = predict(tmp_path / "ref", scan, tmp_path / "ens").array
    np.testing.assert_array_equal(ensemble, read_volume(tmp_path / "ref" / "cv" / "postprocessed" / "c0.nii.gz").array)
    assert choice["dice_after"] == mixes[("WT", "TC", "ET")]


def test_cross_validation_chooses_the_averaged_regions_on_the_out_of_fold_predictions(tmp_path, scan, capsys):
    blob = np.zeros(read_volume(scan[0]).shape, bool)
    blob[20:25, 10:14, 6:8] = True  # what the localiser finds
    region = region_of(blob, SPACING, 12.0)
    assert region.sum() > 1000  # more ET than the largest small-ET rule (1000 voxels) relabels
    choice = _cv_of_constant_cascade(tmp_path, scan, 12.0, np.where(region, 2, 0))
    # the truth is oedema over the whole region: the refiner alone has its WT (every region everywhere there), the
    # average has no TC and no ET (0.37 outside the blob, 0.5 in it) but only the blob as WT
    assert choice["cascade"]["average"] == ["TC", "ET"] and choice["postprocessing"]["localiser_average"] == ["TC", "ET"]
    mixes = {tuple(m["average"]): m["dice"] for m in choice["cascade"]["mixes"]}
    assert mixes[()]["WT"] == 1.0 > mixes[("WT", "TC", "ET")]["WT"]
    printed = capsys.readouterr().out  # the summary shows every mix and which was chosen
    assert "TC+ET        WT 1.000  TC 1.000  ET 1.000  <- chosen" in printed and printed.count("<- chosen") == 1
    assert mixes[("ET",)] == {"WT": 1.0, "TC": 0.0, "ET": 1.0}  # the refiner's TC is still everywhere
    # the predictions scored are the chosen mix's: WT from the refiner, no TC/ET: the truth itself
    refined = read_volume(tmp_path / "ref" / "cv" / "averaged_none" / "c0.nii.gz").array
    composed = read_volume(tmp_path / "ref" / "cv" / "predictions" / "c0.nii.gz").array
    np.testing.assert_array_equal(refined != 0, region)
    np.testing.assert_array_equal(composed, np.where(region, 2, 0))
    assert choice["dice_after"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    # medseg predict on the fold ensemble applies the choice: its probabilities are averaged for TC and ET only
    p_ref = probabilities(tmp_path / "ref", scan, tmp_path / "p_ref", "--localiser-average", "none")
    p_loc = probabilities(tmp_path / "loc", scan, tmp_path / "p_loc")
    capsys.readouterr()
    p_ens = probabilities(tmp_path / "ref", scan, tmp_path / "p_ens")
    said = capsys.readouterr().out  # predict says what predicts: both stages' fold ensembles and the chosen average
    assert "cascade, stage 1: 2 fold models" in said and "cascade, stage 2: 2 fold models" in said
    assert "averaged with stage 1: TC+ET" in said
    inside = p_ref[..., 0] > 0
    np.testing.assert_allclose(p_ens[inside][:, 1:], 0.5 * (p_ref[inside] + p_loc[inside])[:, 1:], atol=1e-5)
    np.testing.assert_allclose(p_ens[inside][:, 0], p_ref[inside][:, 0], atol=1e-6)


def test_a_refiners_validation_is_kept_within_its_localisers_region(tmp_path, scan):
    from medseg.data.dataset import CaseData
    from medseg.data.manifest import Case
    from medseg.data.preprocess import Preprocessing
    from medseg.inference.predictor import InferenceSettings, Segmenter
    from medseg.training.config import parse_pipeline
    from medseg.training.validation import ValidationCase, case_dice, localised

    checkpoint(tmp_path / "loc_cv" / "fold_1", "bright", fold=1)
    checkpoint(tmp_path / "loc_cv" / "fold_0", "nothing", fold=0)
    vols = [read_volume(f) for f in scan]
    prep = Preprocessing().apply(vols)
    blob = np.zeros(vols[0].shape, np.uint8)
    blob[20:25, 10:14, 6:8] = 4  # enhancing tumour exactly where the localiser finds it
    case = ValidationCase(CaseData("case", prep.image, None, {}, prep), blob, tuple(vols[0].spacing))
    manifest_case = Case("case", dict(zip(["flair", "t1", "t1ce", "t2"], scan)))
    base = {"data": {"synthetic": {"cases": 2}, "val_fold": 1}, "model": {"name": "unet", "spatial_dims": 3},
            "sampling": {"patch_size": [16, 16, 8]}}
    p = parse_pipeline({**base, "cascade": {"localiser": str(tmp_path / "loc_cv"), "margin_mm": 0.0}})
    [inside] = localised([case], [manifest_case], p)  # fold 1's localiser: the bright blob
    np.testing.assert_array_equal(inside.region, blob != 0)
    settings = InferenceSettings(roi_size=(16, 16, 8), overlap=0.25, sw_batch_size=4, tta=False, amp="off",
                                 device="cpu")  # the Constant models stay on the CPU
    segmenter = Segmenter((Constant("everything"),), Preprocessing(), get_scheme("brats"), "regions", settings)
    assert case_dice(segmenter, inside) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}  # within the region: exactly the blob
    assert case_dice(segmenter, case)["ET"] < 0.02  # alone: every region over the whole image (40 of 16,800 voxels)
    # fold 0's localiser finds nothing: nothing is kept; without a trained localiser, the refiner alone (a warning)
    p0 = parse_pipeline({**base, "data": {**base["data"], "val_fold": 0}, "cascade": {"localiser": str(tmp_path / "loc_cv")}})
    assert not localised([case], [manifest_case], p0)[0].region.any()
    missing = parse_pipeline({**base, "cascade": {"localiser": str(tmp_path / "not_trained")}})
    assert localised([case], [manifest_case], missing)[0].region is None
    assert localised([case], [manifest_case], parse_pipeline(base))[0].region is None


@pytest.mark.parametrize("localiser", ["bright", "nothing"])
def test_one_pass_gives_each_stage_mix_as_its_own_prediction_would(tmp_path, scan, localiser):
    from medseg.inference.predictor import Predictor

    checkpoint(tmp_path / "loc", localiser)
    ref = checkpoint(tmp_path / "ref", "mild", localiser=str(tmp_path / "loc"), localiser_margin_mm=4.0)
    mixes = [(), ("WT",), ("TC", "ET"), ("WT", "TC", "ET")]
    separate = [np.asarray(predict(ref, scan, tmp_path / f"m{i}", "--localiser-average", *(mix or ["none"])).array)
                for i, mix in enumerate(mixes)]
    assert (separate[0] != separate[3]).any() if localiser == "bright" else not any(s.any() for s in separate)
    variants = Predictor.from_checkpoint(ref, localiser_average=["WT", "TC", "ET"]).cascade_variants(
        [read_volume(f) for f in scan], mixes)
    for variant, alone in zip(variants, separate, strict=True):
        np.testing.assert_array_equal(variant.labels.array, alone)
    assert np.allclose(variants[0].labels.affine, read_volume(scan[0]).affine)
