"""A corpus of bad inputs: each gives exactly one ``error:`` line naming the file or case, a non-zero exit,
and writes nothing (input files unchanged, no output created)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.io import write_volume
from medseg.data.volume import Volume

SHAPE = (9, 8, 7)
AFFINE = np.array([[-1.1, 0.0, 0.0, 12.0], [0.0, -0.9, 0.0, -3.0], [0.0, 0.0, 1.3, 7.0], [0, 0, 0, 1]])
CHANNELS = ("flair", "t1", "t1ce", "t2")
IDS = ("case_a", "case_b")


def _image(value: float = 100.0, dtype=np.int16, shape=SHAPE) -> np.ndarray:
    array = np.zeros(shape, dtype)
    array[2:-2, 2:-2, 2:-2] = value
    return array


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[3:6, 3:6, 3:5] = 2
    label[4, 4, 3] = 4
    label[4, 5, 3] = 1
    return label


def _write_dataset(root: Path) -> Path:
    """A valid 2-case BraTS-like dataset with manifest ``root/m.csv``."""
    rows = ["id," + ",".join(CHANNELS) + ",label,label_scheme"]
    for cid in IDS:
        for k, ch in enumerate(CHANNELS):
            write_volume(Volume(_image(100 + k), AFFINE), root / cid / f"{cid}_{ch}.nii.gz")
        write_volume(Volume(_label(), AFFINE), root / cid / f"{cid}_seg.nii.gz")
        rows.append(",".join([cid, *(f"{cid}/{cid}_{ch}.nii.gz" for ch in CHANNELS), f"{cid}/{cid}_seg.nii.gz", "brats"]))
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("valid"))


@pytest.fixture
def dataset(valid_dataset, tmp_path) -> Path:
    """A fresh copy of the valid dataset, for one test to damage."""
    shutil.copytree(valid_dataset.parent, tmp_path / "d")
    return tmp_path / "d" / "m.csv"


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.startswith("error:")], out + err


def _file(manifest: Path, cid: str, channel: str) -> Path:
    suffix = "seg" if channel == "label" else channel
    return manifest.parent / cid / f"{cid}_{suffix}.nii.gz"


# ------------------------------------------------------------------ damages of one file of case_b
def _truncate(m: Path) -> str:
    p = _file(m, "case_b", "t1ce")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "case_b_t1ce.nii.gz"


def _junk(m: Path) -> str:
    _file(m, "case_b", "t2").write_bytes(b"this is a text file, not an image\n" * 10)
    return "case_b_t2.nii.gz"


def _four_d(m: Path) -> str:
    write_volume(Volume(np.stack([_image()] * 2, axis=-1), AFFINE), _file(m, "case_b", "t1"))
    return "case_b_t1.nii.gz"


def _shape_mismatch(m: Path) -> str:
    write_volume(Volume(_image(shape=(9, 8, 6)), AFFINE), _file(m, "case_b", "t2"))
    return "case_b_t2.nii.gz"


def _affine_mismatch(m: Path) -> str:
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    write_volume(Volume(_image(), shifted), _file(m, "case_b", "t1ce"))
    return "case_b_t1ce.nii.gz"


def _nan(m: Path) -> str:
    array = _image(dtype=np.float32)
    array[4, 4, 4] = np.nan
    write_volume(Volume(array, AFFINE), _file(m, "case_b", "flair"))
    return "case_b_flair.nii.gz"


def _label_7(m: Path) -> str:
    label = _label()
    label[5, 5, 4] = 7
    write_volume(Volume(label, AFFINE), _file(m, "case_b", "label"))
    return "case_b_seg.nii.gz"


def _file_missing(m: Path) -> str:
    _file(m, "case_b", "t1").unlink()
    return "case_b_t1.nii.gz"


DAMAGES = {"truncated": (_truncate, "truncated"), "not-an-image": (_junk, "not a NIfTI"), "4d": (_four_d, "4D"),
           "shape": (_shape_mismatch, "shape"), "affine": (_affine_mismatch, "affine"), "nan": (_nan, "NaN"),
           "label-7": (_label_7, "7"), "file-missing": (_file_missing, "not found")}


@pytest.mark.parametrize("name", DAMAGES)
def test_validate_reports_one_line(dataset, capsys, name):
    damage, words = DAMAGES[name]
    filename = damage(dataset)
    before = _checksums(dataset.parent)
    code, errors, text = _run(capsys, ["validate", str(dataset)])
    assert code == 1, text
    assert len(errors) == 1, text
    assert "case_b" in errors[0] and filename in errors[0] and words in errors[0], errors[0]
    assert _checksums(dataset.parent) == before


def test_validate_one_line_per_problem(dataset, capsys):
    """Two damaged cases, three problems: three lines, each naming its case."""
    _nan(dataset)
    _label_7(dataset)
    _file(dataset, "case_a", "t2").write_bytes(b"junk")
    code, errors, text = _run(capsys, ["validate", str(dataset)])
    assert code == 1
    assert len(errors) == 3, text
    assert sum("case_a" in e for e in errors) == 1 and sum("case_b" in e for e in errors) == 2


def test_first_channel_mismatch_is_one_problem(dataset, capsys):
    """When the odd file is the first channel, the report still names it, once."""
    write_volume(Volume(_image(shape=(9, 8, 6)), AFFINE), _file(dataset, "case_b", "flair"))
    code, errors, text = _run(capsys, ["validate", str(dataset)])
    assert code == 1 and len(errors) == 1, text
    assert "case_b_flair.nii.gz" in errors[0]


def test_valid_dataset_passes(valid_dataset, capsys):
    code, errors, text = _run(capsys, ["validate", str(valid_dataset)])
    assert code == 0 and not errors, text


# ------------------------------------------------------------------ bad manifests
def _empty_cell(m: Path) -> tuple[str, str]:
    lines = m.read_text().splitlines()
    cells = lines[-1].split(",")
    cells[2] = ""  # case_b has no t1
    m.write_text("\n".join([*lines[:-1], ",".join(cells)]) + "\n")
    return "case_b", "t1"


def _header_only(m: Path) -> tuple[str, str]:
    m.write_text(m.read_text().splitlines()[0] + "\n")
    return "m.csv", "no cases"


def _empty_file(m: Path) -> tuple[str, str]:
    m.write_text("")
    return "m.csv", "empty"


def _json_without_cases(m: Path) -> tuple[str, str]:
    j = m.with_suffix(".json")
    j.write_text(json.dumps({"channels": list(CHANNELS), "label_scheme": "brats", "cases": []}))
    m.unlink()
    return "m.json", "empty"


def _duplicate(m: Path) -> tuple[str, str]:
    lines = m.read_text().splitlines()
    m.write_text("\n".join([*lines, lines[-1]]) + "\n")
    return "case_b", "more than once"


def _unknown_scheme(m: Path) -> tuple[str, str]:
    m.write_text(m.read_text().replace(",brats\n", ",brats2032\n"))
    return "brats2032", "did you mean 'brats2023'"


def _schemes_disagree(m: Path) -> tuple[str, str]:
    lines = m.read_text().splitlines()
    m.write_text("\n".join([*lines[:-1], lines[-1].replace(",brats", ",brats2023")]) + "\n")
    return "m.csv", "label_scheme is not the same on every row ('brats' in row 2, 'brats2023' in row 3)"


def _not_found(m: Path) -> tuple[str, str]:
    m.unlink()
    return "m.csv", "not found"


def _binary(m: Path) -> tuple[str, str]:
    m.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x00binary")
    return "m.csv", "not a text file"


def _json_cases_not_objects(m: Path) -> tuple[str, str]:
    m.with_suffix(".json").write_text(json.dumps({"channels": list(CHANNELS), "cases": ["case_a", "case_b"]}))
    m.unlink()
    return "m.json", "list of objects"


MANIFEST_DAMAGES = {"binary": _binary, "json-cases-not-objects": _json_cases_not_objects, "empty-cell": _empty_cell, "header-only": _header_only, "empty-file": _empty_file,
                    "json-without-cases": _json_without_cases, "duplicate-id": _duplicate,
                    "unknown-scheme": _unknown_scheme, "schemes-disagree": _schemes_disagree, "not-found": _not_found}


@pytest.mark.parametrize("name", MANIFEST_DAMAGES)
def test_bad_manifest_one_line(dataset, capsys, name):
    what, words = MANIFEST_DAMAGES[name](dataset)
    target = dataset if dataset.exists() or name == "not-found" else dataset.with_suffix(".json")
    before = _checksums(dataset.parent)
    code, errors, text = _run(capsys, ["validate", str(target)])
    assert code == 1, text
    assert len(errors) == 1, text
    assert what in errors[0] and words in errors[0], errors[0]
    assert "Traceback" not in text
    assert _checksums(dataset.parent) == before


def test_unknown_scheme_option(valid_dataset, capsys):
    code, errors, text = _run(capsys, ["validate", str(valid_dataset), "--scheme", "bratz"])
    assert code == 1 and len(errors) == 1, text
    assert "label scheme: 'bratz' is not valid (did you mean 'brats'?)" in errors[0]


def test_wrong_scheme_option_reports_each_case(valid_dataset, capsys):
    """Labels 1, 2, 4 under brats2023: 4 is unknown, one line per label file."""
    code, errors, text = _run(capsys, ["validate", str(valid_dataset), "--scheme", "brats2023"])
    assert code == 1 and len(errors) == 2, text
    assert all("[4]" in e and "brats2023" in e for e in errors)


# ------------------------------------------------------------------ medseg manifest writes nothing on error
def _brats_folder(root: Path) -> Path:
    for cid in IDS:
        for ch in (*CHANNELS, "seg"):
            write_volume(Volume(_image(), AFFINE), root / cid / f"{cid}_{ch}.nii.gz")
    return root


@pytest.mark.parametrize("damage, words", [
    ("missing-modality", "case case_b has no t1ce"),
    ("no-cases", "no brats2018 cases found"),
    ("not-a-folder", "not a folder"),
])
def test_manifest_command_writes_nothing_on_error(tmp_path, capsys, damage, words):
    root = _brats_folder(tmp_path / "data")
    if damage == "missing-modality":
        (root / "case_b" / "case_b_t1ce.nii.gz").unlink()
    elif damage == "no-cases":
        for cid in IDS:
            shutil.rmtree(root / cid)
    else:
        root = root / "case_a" / "case_a_t1.nii.gz"
    before = _checksums(tmp_path)
    out = tmp_path / "out" / "m.csv"
    code, errors, text = _run(capsys, ["manifest", "--layout", "brats2018", str(root), "-o", str(out)])
    assert code == 1 and len(errors) == 1, text
    assert words in errors[0], errors[0]
    assert not out.exists() and not out.parent.exists()
    assert _checksums(tmp_path) == before


def test_manifest_command_keeps_previous_output_on_error(tmp_path, capsys):
    root = _brats_folder(tmp_path / "data")
    out = tmp_path / "m.csv"
    assert main(["manifest", "--layout", "brats2018", str(root), "-o", str(out)]) == 0
    previous = out.read_bytes()
    (root / "case_a" / "case_a_flair.nii.gz").unlink()
    code, errors, text = _run(capsys, ["manifest", "--layout", "brats2018", str(root), "-o", str(out)])
    assert code == 1 and len(errors) == 1 and "case case_a has no flair" in errors[0], text
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.csv"]
