"""A corpus of bad inputs: each gives exactly one ``error:`` line naming the file or case, a non-zero exit,
and writes nothing (input files unchanged, no output created)."""
from __future__ import annotations

import hashlib
import json
import os
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


# ================================================================== issue 11: bad inputs against train, predict, evaluate
# A zero-determinant affine, a 4D file given as one channel, NaN voxels: validate, train and predict refuse the same
# files (one shared check, medseg.data.checks), before any compute.
def _singular_affine(m: Path) -> str:
    flat = AFFINE.copy()
    flat[:3, 2] = flat[:3, 1]  # the third voxel axis points along the second: determinant 0
    write_volume(Volume(_image(), flat), _file(m, "case_b", "t1ce"))
    return "case_b_t1ce.nii.gz"


DAMAGES["singular-affine"] = (_singular_affine, "not invertible")
INPUT_DAMAGES = {"nan": (_nan, "NaN"), "singular-affine": (_singular_affine, "not invertible"), "4d": (_four_d, "4D")}

TINY_MODEL = {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [2, 4], "strides": [2], "num_res_units": 0}}


def _tiny_pipeline(folder: Path, manifest: Path | None, **sections) -> Path:
    """A pipeline that trains one step on the 9x8x7 cases of the dataset (seconds), written to folder/p.yaml."""
    data = {"name": "tiny", "seed": 0,
            "data": {"manifest": None if manifest is None else str(manifest), "label_scheme": "brats", "val_fold": None, "workers": 0},
            "model": TINY_MODEL, "sampling": {"patch_size": [8, 8, 6], "batch_size": 1}, "augmentation": {"enabled": False},
            "training": {"epochs": 1, "iterations_per_epoch": 1, "threads": 1, "amp": "off", "device": "cpu"},
            "inference": {"roi_size": [8, 8, 6], "overlap": 0.0, "sw_batch_size": 1}}
    for key, value in sections.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.yaml").write_text(yaml.safe_dump(data))
    return folder / "p.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (untrained) 4-channel U-Net checkpoint for the dataset's scans."""
    import torch

    from medseg.checkpoint import save_checkpoint
    from medseg.data.labels import get_scheme
    from medseg.models import create_model, model_config

    torch.manual_seed(0)
    model = create_model("unet", 3, 4, 3, **TINY_MODEL["kwargs"])
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint({"model": model_config(model), "state_dict": model.state_dict(), "channels": list(CHANNELS),
                            "label_scheme": get_scheme("brats").to_dict(), "target": "regions", "preprocessing": {},
                            "inference": {"roi_size": [8, 8, 6], "overlap": 0.0, "sw_batch_size": 1, "tta": False, "amp": "off"}},
                           path)


def _inputs(m: Path, cid: str) -> list[str]:
    return [str(_file(m, cid, ch)) for ch in CHANNELS]


@pytest.mark.parametrize("name", INPUT_DAMAGES)
def test_predict_refuses_what_validate_refuses(dataset, checkpoint, tmp_path, capsys, name):
    damage, words = INPUT_DAMAGES[name]
    filename = damage(dataset)
    out = tmp_path / "preds"
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_b"),
                                       "--output", str(out), "--no-progress"])
    assert code == 1 and len(errors) == 1, text
    assert filename in errors[0] and words in errors[0], errors[0]
    assert "Traceback" not in text and not out.exists()


def test_predict_nan_policy_zero_warns_and_predicts(dataset, checkpoint, tmp_path, capsys):
    _nan(dataset)
    out = tmp_path / "preds"
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_b"),
                                       "--output", str(out), "--nan-policy", "zero", "--no-progress"])
    assert code == 0 and not errors, text
    assert "warning:" in text and "1 NaN or infinite voxel(s) set to 0" in text and "case_b_flair.nii.gz" in text
    from medseg.data.io import read_volume

    assert read_volume(out / "case_b.nii.gz").shape == SHAPE


def test_validate_nan_policy_zero_is_a_warning(dataset, capsys):
    _nan(dataset)
    code, errors, text = _run(capsys, ["validate", str(dataset), "--nan-policy", "zero"])
    assert code == 0 and not errors, text
    assert "warning:" in text and "case_b_flair.nii.gz" in text


def _textured(scale: float = 1.0) -> list[Volume]:
    rng = np.random.default_rng(0)
    images = []
    for _ in CHANNELS:
        array = np.zeros(SHAPE, np.float32)
        array[1:-1, 1:-1, 1:-1] = rng.uniform(50, 150, (7, 6, 5))
        images.append(Volume((array * np.float32(scale)).astype(np.float32), AFFINE))
    return images


def test_extreme_values_are_normalised_like_normal_ones(checkpoint):
    """Values scaled by 1e34 (finite in float32) give the probabilities of the unscaled scan, not an overflow."""
    from medseg.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, probabilities=True)
    normal = predictor.predict_volumes(_textured())
    huge = predictor.predict_volumes(_textured(1e34))
    assert np.isfinite(huge.probabilities.array).all()
    np.testing.assert_allclose(huge.probabilities.array, normal.probabilities.array, atol=1e-4)
    np.testing.assert_array_equal(huge.labels.array, normal.labels.array)


def test_a_few_extreme_voxels_do_not_flatten_the_scan():
    from medseg.data.preprocess import Preprocessing

    rng = np.random.default_rng(1)
    array = np.zeros((30, 28, 20), np.float32)
    array[2:-2, 2:-2, 2:-2] = rng.uniform(50, 150, (26, 24, 16))
    spoiled = array.copy()
    spoiled[4, 4, 3], spoiled[5, 4, 3] = 1e34, -1e34  # two corrupt voxels
    pre = Preprocessing(orientation=None, crop_foreground=False)
    a, b = pre.apply([Volume(array, AFFINE)]).image[0], pre.apply([Volume(spoiled, AFFINE)]).image[0]
    assert np.isfinite(b).all()
    keep = np.ones(array.shape, bool)
    keep[4, 4, 3] = keep[5, 4, 3] = False
    assert np.abs(a[keep] - b[keep]).max() < 0.2  # without the fence every other voxel would be ~0


def test_predict_4d_file_as_one_channel(tmp_path, capsys):
    from medseg.checkpoint import save_checkpoint
    from medseg.data.labels import get_scheme
    from medseg.models import create_model, model_config

    model = create_model("unet", 3, 1, 3, **TINY_MODEL["kwargs"])
    ckpt = save_checkpoint({"model": model_config(model), "state_dict": model.state_dict(), "channels": ["t2"],
                            "label_scheme": get_scheme("brats").to_dict(), "target": "regions", "preprocessing": {},
                            "inference": {"roi_size": [8, 8, 6], "overlap": 0.0, "tta": False, "amp": "off"}}, tmp_path / "one.pt")
    four = write_volume(Volume(np.stack([_image()] * 2, axis=-1), AFFINE), tmp_path / "scan.nii.gz")
    code, errors, text = _run(capsys, ["predict", "--model", str(ckpt), "--input", str(four), "--output", str(tmp_path / "o")])
    assert code == 1 and len(errors) == 1 and "scan.nii.gz" in errors[0] and "4D" in errors[0], text
    assert "Traceback" not in text and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ case ids stay inside --output
def _id_escapes(m: Path) -> tuple[str, str]:
    m.write_text(m.read_text().replace("\ncase_b,", "\n../../evil,"))
    return "../../evil", "path separator"


def _id_dotdot(m: Path) -> tuple[str, str]:
    m.write_text(m.read_text().replace("\ncase_b,", "\n..,"))
    return "'..'", "case id"


MANIFEST_DAMAGES["id-escapes"] = _id_escapes
MANIFEST_DAMAGES["id-dotdot"] = _id_dotdot


@pytest.mark.parametrize("case_id", ["../../evil", "..", "a/b", "x\ny"])
def test_predict_id_cannot_leave_output(dataset, checkpoint, tmp_path, capsys, case_id):
    out = tmp_path / "a" / "b" / "preds"
    before = _checksums(tmp_path)
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_a"),
                                       "--output", str(out), "--id", case_id])
    assert code == 1 and len(errors) == 1 and "--id" in errors[0] and "case id" in errors[0], text
    assert _checksums(tmp_path) == before and not out.exists()


def test_manifest_with_escaping_id_is_refused_by_predict(dataset, checkpoint, tmp_path, capsys):
    _id_escapes(dataset)
    before = _checksums(tmp_path)
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", str(dataset), "--output", str(tmp_path / "o")])
    assert code == 1 and len(errors) == 1 and "../../evil" in errors[0], text
    assert _checksums(tmp_path) == before and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ outputs checked before compute
def test_predict_output_is_an_existing_file(dataset, checkpoint, tmp_path, capsys):
    target = tmp_path / "preds.nii.gz"
    target.write_bytes(b"keep me")
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_a"),
                                       "--output", str(target)])
    assert code == 1 and len(errors) == 1 and "existing file" in errors[0] and str(target) in errors[0], text
    assert target.read_bytes() == b"keep me"
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_a"),
                                       "--output", str(target / "sub")])
    assert code == 1 and len(errors) == 1 and "is a file" in errors[0], text


def test_evaluate_output_is_an_existing_file_and_empty_predictions(dataset, tmp_path, capsys):
    target = tmp_path / "report"
    target.write_text("x")
    (tmp_path / "preds").mkdir()
    code, errors, text = _run(capsys, ["evaluate", "--predictions", str(tmp_path / "preds"), "--manifest", str(dataset),
                                       "--output", str(target)])
    assert code == 1 and len(errors) == 1 and "existing file" in errors[0], text
    code, errors, text = _run(capsys, ["evaluate", "--predictions", str(tmp_path / "preds"), "--manifest", str(dataset),
                                       "--output", str(tmp_path / "r2")])
    assert code == 1 and len(errors) == 1 and "no prediction for any" in errors[0], text
    assert not (tmp_path / "r2").exists()


def test_evaluate_nan_label_map(dataset, tmp_path, capsys):
    preds = tmp_path / "preds"
    for cid in IDS:
        label = _label().astype(np.float32)
        if cid == "case_b":
            label[0, 0, 0] = np.nan
        write_volume(Volume(label, AFFINE), preds / f"{cid}.nii.gz")
    code, errors, text = _run(capsys, ["evaluate", "--predictions", str(preds), "--manifest", str(dataset),
                                       "--output", str(tmp_path / "r"), "--no-overlays"])
    assert code == 1 and len(errors) == 1 and "case_b" in errors[0] and "NaN" in errors[0], text


# ------------------------------------------------------------------ leftovers: stale temporary files, corrupt outputs
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_predict_sweeps_stale_temp_files_and_repredicts_corrupt_output(dataset, checkpoint, tmp_path, capsys):
    from medseg.atomic import host_tag
    from medseg.data.io import read_volume

    out = tmp_path / "preds"
    out.mkdir()
    stale = out / f".case_a.nii.gz.{host_tag()}-{_dead_pid()}.abcd1234.part.nii.gz"
    stale.write_bytes(b"half a file")
    alive = out / f".case_x.nii.gz.{host_tag()}-{os.getpid()}.abcd1234.part.nii.gz"  # a running writer's (another shard)
    alive.write_bytes(b"in progress")
    (out / "case_b.nii.gz").write_bytes(b"corrupt")  # 7 bytes
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", str(dataset), "--output", str(out),
                                       "--no-progress"])
    assert code == 0 and not errors, text
    assert not stale.exists() and alive.exists()
    assert "removed 1 temporary file" in text and "case case_b: the existing output is unreadable" in text
    assert read_volume(out / "case_b.nii.gz").shape == SHAPE and "2 prediction(s) written" in text
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", str(dataset), "--output", str(out),
                                       "--no-progress"])
    assert code == 0 and "0 prediction(s) written" in text and "warning" not in text, text
    write_volume(Volume(np.zeros((3, 3, 3), np.uint8), AFFINE), out / "case_a.nii.gz")  # another scan's output
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", str(dataset), "--output", str(out),
                                       "--no-progress"])
    assert code == 0 and "1 prediction(s) written" in text and "not a label map of the scan's shape" in text, text


# ------------------------------------------------------------------ medseg manifest --folds
@pytest.mark.parametrize("folds", ["50", "-2", "1"])
def test_manifest_fold_count(tmp_path, capsys, folds):
    root = _brats_folder(tmp_path / "data")
    out = tmp_path / "m.csv"
    code, errors, text = _run(capsys, ["manifest", "--layout", "brats2018", str(root), "-o", str(out), "--folds", folds])
    assert code == 1 and len(errors) == 1 and f"--folds {folds}" in errors[0], text
    assert not out.exists()
    assert main(["manifest", "--layout", "brats2018", str(root), "-o", str(out), "--folds", "2"]) == 0


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("name", INPUT_DAMAGES)
def test_train_refuses_what_validate_refuses(dataset, tmp_path, capsys, name):
    damage, words = INPUT_DAMAGES[name]
    filename = damage(dataset)
    run = tmp_path / "run"
    code, errors, text = _run(capsys, ["train", str(_tiny_pipeline(tmp_path, dataset)), "--output", str(run), "--no-progress"])
    assert code == 1 and len(errors) == 1, text
    assert "case_b" in errors[0] and filename in errors[0] and words in errors[0], errors[0]
    assert "Traceback" not in text and not run.exists()


def test_train_nan_policy_zero(dataset, tmp_path, capsys):
    import torch

    _nan(dataset)
    run = tmp_path / "run"
    code, errors, text = _run(capsys, ["train", str(_tiny_pipeline(tmp_path, dataset)), "--output", str(run), "--no-progress",
                                       "--nan-policy", "zero"])
    assert code == 0 and not errors, text
    assert "1 NaN or infinite voxel(s) set to 0" in text
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert not (run / "train.lock").exists()
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[0]["event"] == "start" and history[0]["nan_policy"] == "zero"


def test_non_finite_loss_stops_before_any_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    import torch

    from medseg.training.steps import ModelStep

    monkeypatch.setattr(ModelStep, "loss", lambda self, x, y, fn: torch.tensor(float("nan"), requires_grad=True))
    run = tmp_path / "run"
    code, errors, text = _run(capsys, ["train", str(_tiny_pipeline(tmp_path, dataset)), "--output", str(run), "--no-progress"])
    assert code == 1 and len(errors) == 1, text
    assert "loss became nan" in errors[0] and "epoch 1, batch 1" in errors[0] and "case_" in errors[0], errors[0]
    assert not (run / "checkpoints").exists() and not (run / "train.lock").exists()


def test_non_finite_weights_are_never_checkpointed(dataset, tmp_path, capsys, monkeypatch):
    import torch

    from medseg.training import trainer

    original = trainer.train_epoch

    def poisoned(run, epoch, log):
        row = original(run, epoch, log)
        with torch.no_grad():
            next(run.step.bare_model.parameters()).fill_(float("inf"))
        return row

    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    run = tmp_path / "run"
    code, errors, text = _run(capsys, ["train", str(_tiny_pipeline(tmp_path, dataset)), "--output", str(run), "--no-progress"])
    assert code == 1 and len(errors) == 1 and "weights became NaN or infinite" in errors[0], text
    assert not (run / "checkpoints").exists()


@pytest.fixture
def trained(dataset, tmp_path) -> tuple[Path, Path]:
    """A finished 1-epoch run of the tiny pipeline: (pipeline folder, run folder)."""
    run = tmp_path / "run"
    assert main(["train", str(_tiny_pipeline(tmp_path / "p", dataset)), "--output", str(run), "--no-progress"]) == 0
    return tmp_path / "p", run


@pytest.mark.parametrize("change, key", [
    ({"model__kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}}, "model.kwargs.channels"),
    ({"optimizer__lr": 0.1}, "optimizer.lr"),
    ({"preprocessing__normalize": "zscore"}, "preprocessing.normalize"),
])
def test_resume_with_changed_pipeline_is_refused(dataset, trained, capsys, change, key):
    folder, run = trained
    before = _checksums(run)
    changed = _tiny_pipeline(folder / "changed", dataset, **change)
    code, errors, text = _run(capsys, ["train", str(changed), "--output", str(run), "--resume", "--no-progress"])
    assert code == 1, text
    assert "changes what the run trains (1 key(s))" in errors[0] and len(errors) == 2, text
    assert errors[1].startswith(f"error:   {key}: ") and "in the run" in errors[1] and "given" in errors[1], errors[1]
    assert "Traceback" not in text and "size mismatch" not in text
    assert _checksums(run) == before  # pipeline.yaml, history.jsonl, checkpoints untouched


def test_resume_with_safe_changes_is_recorded(dataset, trained, capsys):
    folder, run = trained
    pipeline_yaml = (run / "pipeline.yaml").read_text()
    changed = _tiny_pipeline(folder / "longer", dataset, training__epochs=2, training__val_interval=2)
    code, errors, text = _run(capsys, ["train", str(changed), "--output", str(run), "--resume", "--no-progress"])
    assert code == 0 and not errors, text
    assert "epoch 2/2" in text  # a changed training.epochs extends the run, as --extend-epochs 2 would
    assert (run / "pipeline.yaml").read_text() == pipeline_yaml  # what the run started with, never rewritten
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changes"] == {"training.epochs": {"run": 1, "given": 2}, "training.val_interval": {"run": 1, "given": 2}}
    assert history[1]["epoch"] == 1 and history[1]["epochs"] == 2


def test_second_training_into_a_locked_run_folder(dataset, tmp_path, capsys):
    from medseg.atomic import host_tag

    run = tmp_path / "run"
    run.mkdir()
    lock = run / "train.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host_tag(), "started": "now"}))
    pipeline = _tiny_pipeline(tmp_path, dataset)
    code, errors, text = _run(capsys, ["train", str(pipeline), "--output", str(run), "--no-progress"])
    assert code == 1 and len(errors) == 1 and f"another training (pid {os.getpid()}" in errors[0], text
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": host_tag(), "started": "then"}))  # killed: a stale lock
    code, errors, text = _run(capsys, ["train", str(pipeline), "--output", str(run), "--no-progress"])
    assert code == 0 and "is gone; taking the lock over" in text, text
    assert not lock.exists() and (run / "checkpoints" / "last.pt").exists()


def test_pipeline_errors_come_before_synthetic_data(tmp_path, capsys):
    pipeline = _tiny_pipeline(tmp_path, None, data__synthetic={"cases": 5, "shape": [40, 36, 32]},
                              model__kwargs={"channels": [2, 4], "strides": [2], "num_res_units": 0, "channelz": 3})
    run = tmp_path / "run"
    code, errors, text = _run(capsys, ["train", str(pipeline), "--output", str(run), "--no-progress"])
    assert code == 1 and len(errors) == 1 and "channelz" in errors[0], text
    assert not run.exists()
    code, errors, text = _run(capsys, ["train", str(pipeline), "--output", str(tmp_path / "cv"), "--folds", "all", "--no-progress"])
    assert code == 1 and len(errors) == 1 and "channelz" in errors[0], text
    assert not (tmp_path / "cv" / "data").exists()


def test_set_with_broken_yaml_and_output_that_is_a_file(dataset, tmp_path, capsys):
    pipeline = _tiny_pipeline(tmp_path, dataset)
    code, errors, text = _run(capsys, ["train", str(pipeline), "--set", "training.epochs=[1", "--output", str(tmp_path / "r")])
    assert code == 1 and len(errors) == 1 and "override 'training.epochs=[1'" in errors[0], text
    assert "Traceback" not in text and not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("x")
    code, errors, text = _run(capsys, ["train", str(pipeline), "--output", str(tmp_path / "file")])
    assert code == 1 and len(errors) == 1 and "existing file" in errors[0], text


def test_unwritable_output_is_refused_before_compute(dataset, checkpoint, tmp_path, capsys, monkeypatch):
    """(root may write anywhere, so the permission check itself is replaced here.)"""
    import medseg.atomic

    monkeypatch.setattr(medseg.atomic, "_writable", lambda folder: False)
    loaded = []
    monkeypatch.setattr("medseg.inference.predictor.load_model", lambda *a, **k: loaded.append(a))
    code, errors, text = _run(capsys, ["predict", "--model", str(checkpoint), "--input", *_inputs(dataset, "case_a"),
                                       "--output", str(tmp_path / "new" / "preds")])
    assert code == 1 and len(errors) == 1 and "not writable" in errors[0] and "where it would be created" in errors[0], text
    assert not loaded  # refused before the model was even loaded
