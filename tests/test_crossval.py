"""Cross-validation: folds, out-of-fold predictions, postprocessing chosen on them, fold ensembles."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from medseg.data.io import read_volume
from medseg.data.labels import get_scheme
from medseg.data.manifest import read_manifest
from medseg.inference.postprocess import PostprocessSettings, keep_largest_component, postprocess
from medseg.inference.loading import load_model, settings_for
from medseg.inference.predictor import Predictor
from medseg.training.crossval import choose_postprocessing, mean_dice

TINY = {
    "name": "tiny",
    "data": {"synthetic": {"cases": 4, "shape": [40, 36, 32]}, "label_scheme": "brats", "workers": 0},
    "model": {"name": "unet", "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
    "sampling": {"patch_size": [32, 32, 24], "batch_size": 2},
    "training": {"epochs": 1, "iterations_per_epoch": 2, "amp": "off"},
    "inference": {"overlap": 0.25},
}


def _pipeline(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    run = tmp / "run"
    done = _medseg("train", _pipeline(tmp), "--folds", "all", "--output", str(run), "--no-progress")
    assert done.returncode == 0, done.stderr
    return run


def test_folds_all_gives_fold_runs_out_of_fold_predictions_and_one_report(cv_run):
    manifest = read_manifest(cv_run / "data" / "manifest.csv")
    folds = [k for k in range(10) if (cv_run / "cv" / f"fold_{k}.csv").exists()]
    assert len(folds) > 1 and folds == [k for k in range(10) if (cv_run / f"fold_{k}" / "checkpoints" / "best.pt").exists()]
    held_out = [c.id for k in folds for c in read_manifest(cv_run / "cv" / f"fold_{k}.csv").cases]
    assert sorted(held_out) == sorted(manifest.ids)  # every case predicted once, by the fold that did not train on it
    for case in manifest.cases:  # out-of-fold predictions on each scan's own grid
        pred, scan = read_volume(cv_run / "cv" / "predictions" / f"{case.id}.nii.gz"), read_volume(next(iter(case.images.values())))
        assert pred.shape == scan.shape and np.allclose(pred.affine, scan.affine)
    choice = json.loads((cv_run / "postprocessing.json").read_text())
    assert set(choice["postprocessing"]) == {"largest_component", "et_min_voxels"} and choice["cases"] == len(manifest.cases)
    summary = (cv_run / "cv" / "report" / "summary.csv").read_text()
    assert "WT" in summary and "dice" in summary and (cv_run / "cv" / "report" / "report.html").exists()


def test_predict_with_the_cv_folder_averages_the_folds_and_applies_the_chosen_postprocessing(cv_run, tmp_path):
    predictor = Predictor.from_checkpoint(cv_run)
    folds = [d for d in cv_run.glob("fold_*") if (d / "checkpoints").is_dir()]
    assert len(predictor.segmenter.models) == len(folds) > 1
    chosen = json.loads((cv_run / "postprocessing.json").read_text())["postprocessing"]
    assert list(predictor.post.largest_component) == chosen["largest_component"]
    assert predictor.post.et_min_voxels == chosen["et_min_voxels"]
    single = Predictor.from_checkpoint(folds[0])
    assert len(single.segmenter.models) == 1 and single.post.largest_component == ()


def test_an_ensemble_of_two_identical_models_equals_one_model(cv_run):
    loaded = load_model(cv_run / "fold_0")
    settings, post = settings_for(loaded, {"device": "cpu", "amp": "off"})
    one, two = Predictor(loaded, settings, post), Predictor([loaded, loaded], settings, post)
    image = np.random.default_rng(0).normal(size=(4, 40, 36, 28)).astype(np.float32)
    np.testing.assert_allclose(two.segmenter.prepared_probabilities(image), one.segmenter.prepared_probabilities(image),
                               rtol=1e-6, atol=1e-7)
    other = load_model(cv_run / "fold_1")
    mixed = Predictor([loaded, other], settings, post).segmenter.prepared_probabilities(image)
    expected = (one.segmenter.prepared_probabilities(image) + Predictor(other, settings, post).segmenter.prepared_probabilities(image)) / 2
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6)  # the mean of the members' probabilities


def test_resume_skips_finished_folds_and_summarises_again(cv_run):
    """``--folds all --resume`` on a finished CV trains nothing (no run built, history untouched), says so per
    fold, and writes the CV summary again."""
    histories = {d.name: (d / "history.jsonl").read_text() for d in cv_run.glob("fold_*")}
    checkpoints = {d.name: (d / "checkpoints" / "last.pt").stat().st_mtime_ns for d in cv_run.glob("fold_*")}
    done = _medseg("train", str(cv_run / "fold_0" / "pipeline.yaml"), "--folds", "all", "--output", str(cv_run),
                   "--resume", "--no-progress", "--set", "data.val_fold=0")
    assert done.returncode == 0, done.stderr
    assert all(f"{cv_run / f'fold_{k}'}: the run has finished its 1 epochs" in done.stdout for k in range(len(histories)))
    assert {d.name: (d / "history.jsonl").read_text() for d in cv_run.glob("fold_*")} == histories
    assert {d.name: (d / "checkpoints" / "last.pt").stat().st_mtime_ns for d in cv_run.glob("fold_*")} == checkpoints
    assert "cross-validation" in done.stdout  # the summary ran again over the finished folds


def test_single_fold_trains_only_that_fold(tmp_path):
    done = _medseg("train", _pipeline(tmp_path), "--fold", "1", "--output", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert [d.name for d in sorted((tmp_path / "run").glob("fold_*"))] == ["fold_1"]
    assert not (tmp_path / "run" / "postprocessing.json").exists()  # the summary needs every fold
    bad = _medseg("train", _pipeline(tmp_path), "--folds", "7", "--output", str(tmp_path / "run2"), "--no-progress")
    assert bad.returncode == 1 and "--folds 7" in bad.stderr and "Traceback" not in bad.stderr


def test_folds_share_one_disk_cache(tmp_path):
    """data.cache: disk under --folds: the cases are prepared once into RUN/cache, not once per fold."""
    run = tmp_path / "run"
    done = _medseg("train", _pipeline(tmp_path), "--folds", "0,1", "--output", str(run), "--no-progress",
                   "--set", "data.cache=disk")
    assert done.returncode == 0, done.stderr
    folders = [f for f in (run / "cache").iterdir() if (f / "geometry.npz").exists()]
    assert len(folders) == TINY["data"]["synthetic"]["cases"] and len(list((run / "cache").iterdir())) == len(folders)
    assert not (run / "fold_0" / "cache").exists() and not (run / "fold_1" / "cache").exists()


# ------------------------------------------------------------------------------------------ postprocessing choice
def _blob(shape, centre, r):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r


def _case(spurious: bool, second_lesion: bool, small_et: bool):
    shape = (40, 40, 30)
    ref = np.zeros(shape, np.uint8)
    ref[_blob(shape, (12, 12, 15), 7)] = 2
    ref[_blob(shape, (12, 12, 15), 4)] = 1
    pred = ref.copy()
    if second_lesion:
        ref[_blob(shape, (30, 30, 15), 4)] = 2
        pred[_blob(shape, (30, 30, 15), 4)] = 2
    if spurious:
        pred[_blob(shape, (32, 8, 8), 3)] = 2
    if small_et:
        pred[11:13, 11:13, 14:16] = 4  # 8 voxels of ET where the reference has none
    return ("c", pred, ref, (1.0, 1.0, 1.0))


def test_choice_keeps_the_largest_component_only_where_it_raises_dice():
    scheme = get_scheme("brats")
    spurious = [_case(True, False, False), _case(True, False, False)]
    choice = choose_postprocessing(spurious, scheme)
    assert "WT" in choice["postprocessing"]["largest_component"]
    assert choice["dice_after"]["WT"] > choice["dice_before"]["WT"]
    two_lesions = [_case(False, True, False), _case(False, True, False)]
    choice = choose_postprocessing(two_lesions, scheme)
    assert "WT" not in choice["postprocessing"]["largest_component"]  # it would delete a real lesion
    assert choice["dice_after"] == choice["dice_before"]


def test_choice_sets_the_small_et_threshold_from_the_out_of_fold_cases():
    scheme = get_scheme("brats")
    pairs = [_case(False, False, True), _case(False, False, False)]
    choice = choose_postprocessing(pairs, scheme)
    n = choice["postprocessing"]["et_min_voxels"]
    assert n > 8  # the 8 false ET voxels are relabelled
    assert choice["dice_after"]["ET"] == 1.0 > choice["dice_before"]["ET"]
    assert mean_dice(pairs, scheme, PostprocessSettings(et_min_voxels=n))["ET"] == 1.0


def test_largest_component_of_a_region_takes_its_nested_regions_along():
    scheme = get_scheme("brats")
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:6, 1:6, 1:6] = 2
    lab[2:5, 2:5, 2:5] = 1
    lab[2:4, 2:4, 2:4] = 4  # 8 voxels of ET
    lab[9, 9:11, 9:11] = 4  # a second, separate lesion: 4 voxels of ET only
    out = keep_largest_component(lab, scheme, ("WT",))
    assert (out[9, 9:11, 9:11] == 0).all() and (out[1:6, 1:6, 1:6] == lab[1:6, 1:6, 1:6]).all()
    out = keep_largest_component(lab, scheme, ("ET",))  # the smaller ET component stays tumour core (NCR)
    assert (out[9, 9:11, 9:11] == 1).all() and (out[2:4, 2:4, 2:4] == 4).all()
    out = keep_largest_component(lab, scheme, ("TC",))  # TC cut away takes ET along and stays whole tumour (oedema)
    assert (out[9, 9:11, 9:11] == 2).all()
    assert np.array_equal(postprocess(lab, scheme, PostprocessSettings()), lab)
    with pytest.raises(Exception, match="not regions"):
        keep_largest_component(lab, scheme, ("XX",))
