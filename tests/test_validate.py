"""``validate_manifest``: every check, through the Python API (the command line is in test_bad_inputs.py)."""
from __future__ import annotations

import numpy as np
import pytest

from medseg.data.io import write_volume
from medseg.data.manifest import Case, Manifest, read_manifest
from medseg.data.validate import check_manifest, validate_case, validate_manifest
from medseg.data.volume import Volume
from medseg.errors import ValidationError

SHAPE = (7, 6, 5)
AFFINE = np.array([[0.0, -1.2, 0.0, 4.0], [-0.9, 0.0, 0.0, 2.0], [0.0, 0.0, 1.5, -6.0], [0, 0, 0, 1]])


def _case(tmp_path, label_values=(0, 1, 2, 4), images=None, label_affine=AFFINE) -> Case:
    images = images or {"t1": np.ones(SHAPE, np.int16), "t2": np.ones(SHAPE, np.float32)}
    paths = {name: write_volume(Volume(a, AFFINE), tmp_path / f"{name}.nii.gz") for name, a in images.items()}
    label = np.zeros(SHAPE, np.int16)
    label.ravel()[: len(label_values)] = label_values
    return Case("c1", paths, write_volume(Volume(label, label_affine), tmp_path / "seg.nii.gz"))


def test_synthetic_dataset_is_valid(synthetic_dataset):
    assert validate_manifest(synthetic_dataset) == []
    check_manifest(read_manifest(synthetic_dataset))  # no error


def test_valid_case(tmp_path):
    assert validate_case(_case(tmp_path), None) == []


def test_scheme_from_manifest_or_argument(tmp_path):
    case = _case(tmp_path, label_values=(0, 3))
    m = Manifest(("t1", "t2"), (case,), "brats2023", tmp_path / "m.csv")
    assert validate_manifest(m) == []
    problems = validate_manifest(m, "brats")
    assert len(problems) == 1 and "label values [3] are not in scheme 'brats'" in problems[0]
    assert validate_manifest(m, "labels") == []  # generic: any non-negative integer


def test_labels_without_scheme_is_a_problem(tmp_path):
    m = Manifest(("t1", "t2"), (_case(tmp_path),), None, tmp_path / "m.csv")
    problems = validate_manifest(m)
    assert len(problems) == 1 and "no label scheme" in problems[0]


def test_check_manifest_raises_with_one_problem_per_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bad = np.ones(SHAPE, np.float32)
    bad[0, 0, 0] = np.inf
    cases = (_case(tmp_path / "a", label_values=(0, 7)), _case(tmp_path / "b", images={"t1": np.ones(SHAPE, np.int16), "t2": bad}))
    cases = (cases[0], Case("c2", cases[1].images, cases[1].label))
    with pytest.raises(ValidationError) as info:
        check_manifest(Manifest(("t1", "t2"), cases, "brats", tmp_path / "m.csv"))
    problems = info.value.problems
    assert len(problems) == 2 and str(info.value).splitlines() == problems
    assert "case c1" in problems[0] and "[7]" in problems[0]
    assert "case c2" in problems[1] and "1 voxels are NaN or infinite" in problems[1]


def test_affine_tolerance(tmp_path):
    shifted = AFFINE.copy()
    shifted[2, 3] += 0.01
    case = _case(tmp_path, label_affine=shifted)
    problems = validate_case(case, None, atol=1e-3)
    assert len(problems) == 1 and "label" in problems[0] and "affine differs from t1 by up to 0.01 mm" in problems[0]
    assert validate_case(case, None, atol=0.1) == []


def test_odd_first_channel_is_named(tmp_path):
    images = {"t1": np.ones((7, 6, 4), np.int16), "t2": np.ones(SHAPE, np.int16)}
    problems = validate_case(_case(tmp_path, images=images), None)
    assert len(problems) == 1 and "t1 " in problems[0] and "shape (7, 6, 4) differs from t2 (7, 6, 5)" in problems[0]


def test_channel_of_4d_file_is_accepted_and_plain_4d_is_not(tmp_path):
    four = write_volume(Volume(np.ones((*SHAPE, 2), np.int16), AFFINE), tmp_path / "four.nii.gz")
    case = Case("c4", {"a": f"{four}[0]", "b": f"{four}[1]"})
    assert validate_case(case, None) == []
    problems = validate_case(Case("c4", {"a": four}), None)
    assert len(problems) == 1 and "image is 4D" in problems[0]


def test_ndim_argument(tmp_path):
    case = _case(tmp_path)
    assert validate_case(case, None, ndim=3) == []
    problems = validate_case(case, None, ndim=2)
    assert len(problems) == 3 and all("where a 2D image is expected" in p for p in problems)
