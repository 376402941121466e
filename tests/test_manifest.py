"""Manifest builders for every layout, CSV/JSON round trips and path resolution."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medseg.data.io import ImageRef, read_volume, write_volume
from medseg.data.layouts import build_manifest, detect_layout
from medseg.data.manifest import Case, Manifest, assign_folds, read_manifest, write_manifest
from medseg.data.volume import Volume
from medseg.errors import MedsegError

SHAPE = (6, 5, 4)
AFFINE = np.diag([-1.2, -1.0, 1.4, 1.0])


def _write(path: Path, value: int = 1, channels: int | None = None) -> Path:
    """A tiny NIfTI whose voxels all equal ``value`` (channel c of a 4D file holds ``value + c``)."""
    if channels is None:
        array = np.full(SHAPE, value, np.int16)
    else:
        array = np.stack([np.full(SHAPE, value + c, np.int16) for c in range(channels)], axis=-1)
    return write_volume(Volume(array, AFFINE), path)


def make_brats2018(root: Path, ids=("Brats18_A_1", "Brats18_B_1")) -> Path:
    for cid in ids:
        for k, suffix in enumerate(("flair", "t1", "t1ce", "t2", "seg")):
            _write(root / cid / f"{cid}_{suffix}.nii.gz", k)
    return root


def make_brats2021(root: Path, ids=("BraTS2021_00000", "BraTS2021_00002")) -> Path:
    return make_brats2018(root, ids)


def make_brats2023(root: Path, ids=("BraTS-GLI-00000-000", "BraTS-GLI-00003-001")) -> Path:
    values = {"t2f": 10, "t1n": 20, "t1c": 30, "t2w": 40, "seg": 0}  # a distinct value per file
    for cid in ids:
        for suffix, value in values.items():
            _write(root / cid / f"{cid}-{suffix}.nii.gz", value)
    return root


def make_msd(root: Path, ids=("BRATS_001", "BRATS_002")) -> Path:
    for cid in ids:
        _write(root / "imagesTr" / f"{cid}.nii.gz", 100, channels=4)  # channel c holds 100 + c
        _write(root / "labelsTr" / f"{cid}.nii.gz", 0)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # shipped in the MSD tarball
    meta = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(root: Path, ids=("case_a", "case_b")) -> Path:
    for cid in ids:
        for c in range(2):
            _write(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", 50 + c)
        _write(root / "labelsTr" / f"{cid}.nii.gz", 0)
    meta = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": len(ids), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_brats2018(tmp_path):
    m = build_manifest("brats2018", make_brats2018(tmp_path))
    assert m.channels == ("flair", "t1", "t1ce", "t2") and m.label_scheme == "brats"
    assert m.ids == ["Brats18_A_1", "Brats18_B_1"]
    case = m["Brats18_B_1"]
    assert [ref.path.name for ref in case.images.values()] == [f"Brats18_B_1_{c}.nii.gz" for c in m.channels]
    assert case.label.path.name == "Brats18_B_1_seg.nii.gz"


def test_brats2021(tmp_path):
    make_brats2021(tmp_path)
    (tmp_path / "notes").mkdir()  # a stray folder is not a case
    m = build_manifest("brats2021", tmp_path)
    assert m.ids == ["BraTS2021_00000", "BraTS2021_00002"] and m.label_scheme == "brats"
    assert m["BraTS2021_00000"].images["t1ce"].path.name == "BraTS2021_00000_t1ce.nii.gz"
    assert m["BraTS2021_00000"].label.path.name == "BraTS2021_00000_seg.nii.gz"


def test_brats2023_maps_channels(tmp_path):
    m = build_manifest("brats2023", make_brats2023(tmp_path))
    assert m.channels == ("flair", "t1", "t1ce", "t2") and m.label_scheme == "brats2023"
    case = m["BraTS-GLI-00003-001"]
    expected = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    for channel, suffix in expected.items():
        assert case.images[channel].path.name == f"BraTS-GLI-00003-001-{suffix}.nii.gz"
    assert read_volume(case.images["t1ce"]).array.flat[0] == 30  # the t1c file, read through the manifest
    assert case.label.path.name == "BraTS-GLI-00003-001-seg.nii.gz"


def test_msd_channels_select_the_right_4d_channel(tmp_path):
    m = build_manifest("msd", make_msd(tmp_path))
    assert m.ids == ["BRATS_001", "BRATS_002"] and m.label_scheme == "msd"
    assert m.channels == ("flair", "t1", "t1ce", "t2")
    case = m["BRATS_002"]
    for c, channel in enumerate(m.channels):
        assert str(case.images[channel]).endswith(f"BRATS_002.nii.gz[{c}]")
        vol = read_volume(case.images[channel])
        assert vol.array.shape == SHAPE and np.all(vol.array == 100 + c)
    assert case.label == ImageRef(tmp_path / "labelsTr" / "BRATS_002.nii.gz")
    assert case.images["t1"] == ImageRef(tmp_path / "imagesTr" / "BRATS_002.nii.gz", m.channels.index("t1"))


def test_nnunet(tmp_path):
    m = build_manifest("nnunet", make_nnunet(tmp_path))
    assert m.channels == ("ct", "pet") and m.ids == ["case_a", "case_b"]
    assert m["case_b"].images["pet"].path.name == "case_b_0001.nii.gz"
    assert m["case_b"].label.path.name == "case_b.nii.gz"
    assert m.label_scheme == {"name": tmp_path.name, "labels": {"liver": 1, "tumour": 2}, "regions": {}}


@pytest.mark.parametrize("layout, maker", [("brats2018", make_brats2018), ("brats2021", make_brats2021),
                                           ("brats2023", make_brats2023), ("msd", make_msd), ("nnunet", make_nnunet)])
def test_auto_detects_each_layout(tmp_path, layout, maker):
    maker(tmp_path)
    assert detect_layout(tmp_path) == layout
    assert build_manifest("auto", tmp_path) == build_manifest(layout, tmp_path)


def test_unknown_layouts(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(MedsegError, match="no known layout found"):
        build_manifest("auto", tmp_path)
    with pytest.raises(MedsegError, match=r"layout: 'nnunnet' is not valid \(did you mean 'nnunet'\?\); choose one of auto, "):
        build_manifest("nnunnet", tmp_path)
    with pytest.raises(MedsegError, match="not a folder"):
        build_manifest("auto", tmp_path / "missing")
    with pytest.raises(MedsegError, match="no brats2021 cases found"):
        build_manifest("brats2021", tmp_path)


@pytest.mark.parametrize("layout, maker, case, missing", [
    ("brats2018", make_brats2018, "Brats18_B_1", "Brats18_B_1_t1ce.nii.gz"),
    ("brats2023", make_brats2023, "BraTS-GLI-00003-001", "BraTS-GLI-00003-001-t2w.nii.gz"),
    ("nnunet", make_nnunet, "case_b", "case_b_0001.nii.gz"),
])
def test_missing_modality_names_the_case(tmp_path, layout, maker, case, missing):
    maker(tmp_path)
    next(tmp_path.rglob(missing)).unlink()
    with pytest.raises(MedsegError) as info:
        build_manifest(layout, tmp_path)
    message = str(info.value)
    assert f"case {case}" in message and missing.split(".")[0] in message and "\n" not in message


@pytest.mark.parametrize("layout, maker", [("brats2023", make_brats2023), ("msd", make_msd), ("nnunet", make_nnunet)])
def test_csv_and_json_read_back_equal(tmp_path, layout, maker):
    data = maker(tmp_path / "data")
    built = assign_folds(build_manifest(layout, data), n_folds=2)
    csv_path = write_manifest(built, tmp_path / "out" / "m.csv")
    json_path = write_manifest(built, tmp_path / "out" / "m.json")
    from_csv, from_json = read_manifest(csv_path), read_manifest(json_path)
    assert from_csv == from_json
    assert from_csv.channels == built.channels and from_csv.label_scheme == built.label_scheme
    assert [c.fold for c in from_csv] == [c.fold for c in built] and {c.fold for c in built} == {0, 1}
    for got, want in zip(from_csv, built):
        assert got.id == want.id and got.channels == want.channels
        for ch in built.channels:
            assert got.images[ch].channel == want.images[ch].channel
            assert got.images[ch].path.resolve() == want.images[ch].path.resolve()
        assert got.label.path.resolve() == want.label.path.resolve()
    # paths are stored relative to the manifest file
    assert "../data/" in csv_path.read_text() and str(tmp_path) not in csv_path.read_text()
    assert all(not Path(p).is_absolute() for p in json.loads(json_path.read_text())["cases"][0]["images"].values())


def test_relative_paths_resolve_from_another_working_directory(tmp_path, monkeypatch):
    make_brats2018(tmp_path / "data")
    write_manifest(build_manifest("brats2018", tmp_path / "data"), tmp_path / "manifests" / "m.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = read_manifest(Path("..") / "manifests" / "m.csv")
    vol = read_volume(m["Brats18_A_1"].images["t1"])
    assert np.all(vol.array == 1)  # t1 was written with value 1
    assert read_volume(m["Brats18_A_1"].label).array.shape == SHAPE


def test_hand_written_manifests(tmp_path):
    _write(tmp_path / "a" / "img.nii.gz")
    _write(tmp_path / "a" / "four.nii.gz", channels=2)
    (tmp_path / "m.csv").write_text(
        '# label_scheme: {"name": "x", "labels": {"fg": 1}, "regions": {}}\n'
        "id,ct,pet,split\n"
        "a,a/img.nii.gz,a/four.nii.gz[1],train\n"
    )
    m = read_manifest(tmp_path / "m.csv")
    assert m.channels == ("ct", "pet") and m.label_scheme == {"name": "x", "labels": {"fg": 1}, "regions": {}}
    assert m["a"].label is None and m["a"].split == "train" and m.select(split="val").cases == ()
    assert m["a"].images["pet"] == ImageRef(tmp_path / "a" / "four.nii.gz", 1)
    (tmp_path / "m.json").write_text(json.dumps({"channels": ["ct", "pet"], "cases": [
        {"id": "a", "images": ["a/img.nii.gz", "a/four.nii.gz[1]"], "split": "train"}]}))
    assert read_manifest(tmp_path / "m.json") == Manifest(("ct", "pet"), m.cases, None)


def test_write_manifest_refuses_duplicates(tmp_path):
    case = Case("x", {"t1": tmp_path / "x.nii.gz"})
    with pytest.raises(MedsegError, match="case id x appears more than once"):
        write_manifest(Manifest(("t1",), (case, case)), tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_stray_folder_is_ignored_but_incomplete_case_is_not(tmp_path):
    import nibabel as nib
    import numpy as np

    from medseg.data.layouts import build_manifest

    case = tmp_path / "Case_1"
    case.mkdir()
    for suffix in ("flair", "t1", "t1ce", "t2", "seg"):
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(case / f"Case_1_{suffix}.nii.gz"))
    (tmp_path / "notes").mkdir()  # no image named after it: not a case
    assert build_manifest("brats2018", tmp_path).ids == ["Case_1"]
    (tmp_path / "Case_2").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(tmp_path / "Case_2" / "Case_2_flair.nii.gz"))
    with pytest.raises(MedsegError, match="Case_2 has no t1 image"):
        build_manifest("brats2018", tmp_path)


def test_json_images_list_must_match_the_channels(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"channels": ["t1", "t2"], "cases": [{"id": "a", "images": ["a.nii.gz", "b.nii.gz", "c.nii.gz"]}]}))
    with pytest.raises(MedsegError, match="lists 3 images but the manifest has 2 channels"):
        read_manifest(path)


def test_csv_errors_name_the_file_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("# a comment without a colon\n# label_scheme: brats\nid,t1\na,a.nii.gz\n,b.nii.gz\n")
    with pytest.raises(MedsegError, match="row 5 has an empty id"):
        read_manifest(path)


# ----------------------------------------------------------------------------- the label scheme is a column
@pytest.mark.parametrize("scheme", ["msd", {"name": "x", "labels": {"fg": 1, "edge": 2}, "regions": {"all": [1, 2]}}])
def test_written_csv_is_a_plain_table(tmp_path, scheme):
    """pandas reads a written manifest as the case table: one row per case, the scheme an ordinary column."""
    import pandas as pd

    built = replace(assign_folds(build_manifest("msd", make_msd(tmp_path / "data")), n_folds=2), label_scheme=scheme)
    path = write_manifest(built, tmp_path / "m.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == ["id", *built.channels, "label", "fold", "label_scheme"]
    assert len(table) == len(built) and list(table["id"]) == built.ids
    assert list(table["t1"]) == [f"data/imagesTr/{i}.nii.gz[{built.channels.index('t1')}]" for i in built.ids]
    assert [json.loads(s) if s.startswith("{") else s for s in table["label_scheme"]] == [scheme] * len(built)
    assert read_manifest(path) == built


def test_old_manifest_with_a_scheme_comment_line_still_reads(tmp_path):
    data = make_brats2018(tmp_path / "data")
    new = write_manifest(build_manifest("brats2018", data), tmp_path / "new.csv")
    lines = new.read_text().splitlines()
    assert lines[0].endswith(",label_scheme") and all(line.endswith(",brats") for line in lines[1:])
    old = tmp_path / "old.csv"  # the format before the column: a comment line above the header
    old.write_text("\n".join(["# label_scheme: brats", *(line.rsplit(",", 1)[0] for line in lines)]) + "\n")
    assert read_manifest(old).label_scheme == "brats"
    assert read_manifest(old).cases == read_manifest(new).cases


def test_shipped_manifest_is_a_plain_table():
    import pandas as pd

    path = Path(__file__).parents[1] / "data_manifests" / "brats18.csv"
    table = pd.read_csv(path)
    assert len(table) == 10 and set(table["label_scheme"]) == {"brats"} and table["id"].is_unique
    assert all(p.startswith("../../shared/data/brats18/") for p in table["flair"])
    assert read_manifest(path).label_scheme == "brats"


@pytest.mark.parametrize("text, shown", [
    ("id,t1,label_scheme\na,a.nii.gz,brats\nb,b.nii.gz,brats2023\n", "'brats' in row 2, 'brats2023' in row 3"),
    ("id,t1,label_scheme\na,a.nii.gz,brats\nb,b.nii.gz,\n", "'brats' in row 2, an empty cell in row 3"),
    ("# label_scheme: msd\nid,t1,label_scheme\na,a.nii.gz,brats\n", "'brats' in row 3, 'msd' in the '# label_scheme:' line"),
])
def test_rows_with_different_schemes_are_an_error(tmp_path, text, shown):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(MedsegError, match="m.csv: label_scheme is not the same on every row") as info:
        read_manifest(path)
    assert shown in str(info.value) and "\n" not in str(info.value)


def test_scheme_column_agreeing_with_the_comment_line_and_json_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('# label_scheme: {"name": "x", "labels": {"fg": 1}}\nid,t1,label_scheme\n'
                    'a,a.nii.gz,"{""name"":""x"",""labels"":{""fg"":1}}"\nb,b.nii.gz,"{""labels"": {""fg"": 1}, ""name"": ""x""}"\n')
    assert read_manifest(path).label_scheme == {"name": "x", "labels": {"fg": 1}}
    path.write_text('id,t1,label_scheme\na,a.nii.gz,{"name": \n')
    with pytest.raises(MedsegError, match="label_scheme of row 2 is not valid JSON"):
        read_manifest(path)
