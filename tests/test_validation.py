"""Validation during training measures what 'medseg predict' + 'medseg evaluate' give for the same model."""
from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import yaml

import medseg
from medseg.data.manifest import read_manifest, write_manifest
from medseg.training import setup
from medseg.training.config import load_pipeline

TINY = {
    "name": "tiny",
    "data": {"synthetic": {"cases": 5, "shape": [40, 36, 32]}, "label_scheme": "brats", "workers": 0, "val_fold": 0},
    "preprocessing": {"spacing": [1.5, 1.5, 1.5]},  # a resampled grid: scores must still be on the scan's own grid
    "model": {"name": "unet", "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
    "sampling": {"patch_size": [16, 16, 16], "batch_size": 2},
    "training": {"epochs": 2, "iterations_per_epoch": 4, "amp": "off", "device": "cpu"},  # as predict below
    "inference": {"overlap": 0.25},
    "postprocessing": {"min_component_size": 20},
}


def test_logged_validation_dice_equals_predict_then_evaluate(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(TINY))
    pipeline = load_pipeline(path)
    result = medseg.train(pipeline, run_dir=tmp_path / "run", progress=False)
    manifest = read_manifest(tmp_path / "run" / "data" / "manifest.csv")
    _, val = setup.split_cases(manifest, pipeline)
    assert val.cases
    subset = write_manifest(replace(val, path=None), tmp_path / "val.csv")
    medseg.predict(tmp_path / "run", subset, tmp_path / "preds", amp="off", device="cpu")
    report = medseg.evaluate(tmp_path / "preds", subset)
    cases = report.cases[report.cases["kind"] == "region"]
    logged = result["history"][-1]
    for region in ("WT", "TC", "ET"):
        expected = float(cases.loc[cases["target"] == region, "dice"].mean())
        assert logged[f"dice_{region}"] == pytest.approx(expected, abs=1e-6), region
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["dice_WT"]) == pytest.approx(logged["dice_WT"], abs=1e-9)
