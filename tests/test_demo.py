"""`medseg demo`: the whole path (data -> validate -> train -> predict -> report) from the command line."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from medseg.cli import main
from medseg.data.io import read_volume
from medseg.data.manifest import read_manifest


def _check_outputs(out):
    validation = read_manifest(out / "validation.csv")
    assert validation.ids
    for case in validation.cases:  # every prediction sits on the grid of its scan
        scan = read_volume(case.images["flair"])
        pred = read_volume(out / "predictions" / f"{case.id}.nii.gz")
        assert pred.shape == scan.shape and (abs(pred.affine - scan.affine) < 1e-6).all()
        assert pred.array.dtype.name == "uint8" and set(pd.unique(pred.array.ravel())) <= {0, 1, 2, 4}
    for name in ("cases.csv", "summary.csv", "summary.json", "report.html"):
        assert (out / "report" / name).stat().st_size > 0
    return pd.DataFrame(json.loads((out / "report" / "summary.json").read_text())["summary"])


def test_demo_one_epoch_runs_the_whole_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "report.html"):
        assert step in printed
    _check_outputs(out)
    assert main(["demo", "--output", str(out), "--no-progress"]) == 1  # never overwrites a finished demo


@pytest.mark.slow
def test_demo_reaches_whole_tumour_dice_08(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--no-progress"]) == 0
    summary = _check_outputs(out)
    wt = summary[(summary["kind"] == "region") & (summary["target"] == "WT") & (summary["metric"] == "dice")]
    assert float(wt["mean"].iloc[0]) >= 0.8
