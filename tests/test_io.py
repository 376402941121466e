"""Reading and writing volumes keeps the exact grid: shape, affine, orientation and voxels."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.io import ImageRef, read_volume, write_volume
from medseg.data.volume import Volume
from medseg.errors import MedsegError

sitk = pytest.importorskip("SimpleITK")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique_affine(spacing=(0.8, 0.9, 2.5), degrees=10.0, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """RAS affine: LPS-like flips, a rotation about z, anisotropic spacing, an offset origin."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _assert_same_volume(a: Volume, b: Volume) -> None:
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert a.orientation == b.orientation
    assert a.array.dtype == b.array.dtype
    np.testing.assert_array_equal(a.array, b.array)


# ------------------------------------------------------------------ synthetic round trips, every format
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_oblique_anisotropic(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    vol = Volume((rng.random((7, 6, 5)) * 100).astype(dtype), _oblique_affine())
    out = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(out)
    _assert_same_volume(vol, back)
    assert back.orientation == ("L", "P", "S")
    assert not list(tmp_path.glob(".*part*")), "temporary files left behind"


def test_round_trip_4d_channels_and_channel_selection(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 1000, (6, 5, 4, 3)).astype(np.int16)
    vol = Volume(array, _oblique_affine())
    path = write_volume(vol, tmp_path / "four.nii.gz")
    assert read_volume(path).array.shape == (6, 5, 4, 3)
    for c in range(3):
        sel = read_volume(f"{path}[{c}]")
        np.testing.assert_array_equal(sel.array, array[..., c])
        np.testing.assert_allclose(sel.affine, vol.affine, atol=1e-6)
    with pytest.raises(MedsegError, match=r"has 3 channels"):
        read_volume(f"{path}[3]")
    write_volume(Volume(array[..., 0], vol.affine), tmp_path / "three.nii.gz")
    with pytest.raises(MedsegError, match=r"not 4D"):
        read_volume(f"{tmp_path / 'three.nii.gz'}[0]")


@pytest.mark.parametrize("text, path, channel", [
    ("a/b.nii.gz[2]", "a/b.nii.gz", 2),
    ("a/b.nii.gz", "a/b.nii.gz", None),
    ("a/b.nii.gz[12]", "a/b.nii.gz", 12),
    ("scan[1]v2.nii.gz", "scan[1]v2.nii.gz", None),  # brackets inside a name are part of the path
])
def test_image_ref_parse_and_text_round_trip(text, path, channel):
    ref = ImageRef.parse(text)
    assert (ref.path, ref.channel) == (Path(path), channel)
    assert str(ref) == text and ImageRef.parse(str(ref)) == ref
    assert ImageRef.parse(text, base="/data") == ImageRef(Path("/data") / path, channel)  # relative to a manifest's folder
    assert ImageRef.parse(f"/abs/{text}", base="/data").path == Path("/abs") / path


def test_image_ref_rejects_a_negative_channel():
    with pytest.raises(MedsegError, match="non-negative integer"):
        ImageRef(Path("a.nii.gz"), -1)


def test_read_volume_of_an_image_ref_selects_its_channel(tmp_path):
    array = np.arange(6 * 5 * 4 * 3, dtype=np.int16).reshape(6, 5, 4, 3)
    path = write_volume(Volume(array, _oblique_affine()), tmp_path / "four.nii.gz")
    for c in range(3):
        np.testing.assert_array_equal(read_volume(ImageRef(path, c)).array, array[..., c])
    assert read_volume(ImageRef(path)).array.shape == (6, 5, 4, 3)
    with pytest.raises(MedsegError, match=r"four.nii.gz\[3\]: the 4D image has 3 channels"):
        read_volume(ImageRef(path, 3))


def test_int64_and_bool_arrays_are_writable(tmp_path):
    """argmax outputs are int64 and masks are bool; both must write (bool as uint8)."""
    affine = _oblique_affine()
    lab = np.arange(60, dtype=np.int64).reshape(5, 4, 3) % 5
    back = read_volume(write_volume(Volume(lab, affine), tmp_path / "l.nii.gz"))
    np.testing.assert_array_equal(back.array, lab)
    mask = lab > 2
    back = read_volume(write_volume(Volume(mask, affine), tmp_path / "m.nii.gz"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.astype(np.uint8))


def test_written_files_are_deterministic(tmp_path):
    """The same volume gives the same bytes (no temporary file name or time stamp in the gzip header)."""
    vol = Volume(np.arange(60, dtype=np.int16).reshape(5, 4, 3), _oblique_affine())
    a = write_volume(vol, tmp_path / "a" / "v.nii.gz").read_bytes()
    b = write_volume(vol, tmp_path / "b" / "v.nii.gz").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert not a[3] & 0x08 and b"part" not in a[:64], "a (temporary) file name is stored in the gzip header"
    assert a[4:8] == b"\0\0\0\0", "a time stamp is stored in the gzip header"
    assert gzip.decompress(a)  # still a valid gzip stream


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "v.xyz").write_bytes(b"abc")
    with pytest.raises(MedsegError, match=r"v\.xyz: unknown image format"):
        read_volume(tmp_path / "v.xyz")
    with pytest.raises(MedsegError, match=r"nope\.nii\.gz: file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    with pytest.raises(MedsegError, match=r"cannot write format"):
        write_volume(Volume(np.zeros((2, 2, 2)), np.eye(4)), tmp_path / "v.xyz")
    assert not (tmp_path / "nope.nii.gz").exists()


def test_unreadable_files_are_one_line_errors(tmp_path):
    good = write_volume(Volume(np.ones((30, 30, 30), np.int16), np.eye(4)), tmp_path / "g.nii.gz")
    raw = good.read_bytes()
    cases = {"trunc.nii.gz": raw[: len(raw) // 2], "junk.nii.gz": b"not an image at all " * 20,
             "empty.nii.gz": b"", "junk.nrrd": b"NRRD0004\ngarbage\n", "junk.nii": b"\x00" * 10}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MedsegError) as info:
            read_volume(tmp_path / name)
        message = str(info.value)
        assert name in message and "\n" not in message, message


# ------------------------------------------------------------------ real scans
REAL = [
    ("brats18/Brats18_2013_11_1/Brats18_2013_11_1_t1.nii.gz", ".nii.gz", ("L", "P", "S")),
    ("brats18/Brats18_2013_11_1/Brats18_2013_11_1_seg.nii.gz", ".nii.gz", ("L", "P", "S")),
    ("spinal_cord/t2.nii.gz", ".nii.gz", ("P", "S", "R")),
    ("spinal_cord/t2.nii.gz", ".mha", ("P", "S", "R")),
    ("nrrd_brain_tumor/brain1_image.nrrd", ".nrrd", None),
    ("nrrd_brain_tumor/brain1_image.nrrd", ".mha", None),
    ("nrrd_brain_tumor/brain1_label.nrrd", ".nii.gz", None),
]


@pytest.mark.parametrize("rel, suffix, orientation", REAL, ids=[f"{r.split('/')[-1]}->{s}" for r, s, _ in REAL])
def test_real_round_trip(shared_data, tmp_path, rel, suffix, orientation):
    source = shared_data / rel
    vol = read_volume(source)
    if orientation is not None:
        assert vol.orientation == orientation
    if "seg" in rel:
        assert vol.array.dtype == np.int16
    out = write_volume(vol, tmp_path / f"out{suffix}")
    back = read_volume(out)
    _assert_same_volume(vol, back)
    # an independent reader agrees with the original file
    if suffix.startswith(".nii") and source.name.endswith(".nii.gz"):
        a, b = nib.load(str(source)), nib.load(str(out))
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
        assert nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
        assert a.get_data_dtype() == b.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    else:
        a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_nrrd_geometry_matches_simpleitk(shared_data):
    """The RAS affine read by medseg is SimpleITK's LPS geometry with x and y negated."""
    path = shared_data / "nrrd_brain_tumor" / "brain1_image.nrrd"
    vol = read_volume(path)
    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ lps, atol=1e-6)
    assert vol.array.shape == image.GetSize()  # (i, j, k) order
    assert vol.spacing[2] > 3 * vol.spacing[0]  # strongly anisotropic


def test_nifti_geometry_matches_nibabel_world_coordinates(shared_data):
    """A voxel index maps to the same world point through medseg's and nibabel's affines (LPS BraTS)."""
    path = shared_data / "brats18" / "Brats18_2013_11_1" / "Brats18_2013_11_1_t1.nii.gz"
    vol = read_volume(path)
    img = nib.load(str(path))
    ijk = np.array([17, 200, 90, 1.0])
    np.testing.assert_allclose(vol.affine @ ijk, img.affine @ ijk, atol=1e-6)
    assert vol.spacing == pytest.approx((1.0, 1.0, 1.0))


# ------------------------------------------------------------------ DICOM series
def _write_dicom_series(vol: Volume, folder) -> None:
    """One file per slice, geometry in the standard tags, written with SimpleITK (independent of medseg)."""
    folder.mkdir()
    lps = LPS_TO_RAS @ vol.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing[None, :]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.array.shape[2]):
        sl = sitk.GetImageFromArray(np.ascontiguousarray(vol.array[:, :, k].T))  # (j, i) -> image (i, j)
        sl.SetSpacing((float(spacing[0]), float(spacing[1])))  # the writer takes pixel spacing from the image
        position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{x:.6f}" for x in position),
            "0020|0037": "\\".join(f"{x:.6f}" for x in (*direction[:, 0], *direction[:, 1])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # row spacing (j), column spacing (i)
            "0018|0050": f"{spacing[2]:.6f}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_reads_with_geometry(tmp_path):
    rng = np.random.default_rng(2)
    vol = Volume(rng.integers(0, 2000, (12, 10, 6)).astype(np.int16), _oblique_affine())
    _write_dicom_series(vol, tmp_path / "series")
    back = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.orientation == vol.orientation == ("L", "P", "S")


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match=r"empty: a folder was given but it holds no DICOM series"):
        read_volume(tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_header_and_data_pairs_keep_final_names(tmp_path, suffix):
    """Two-file formats: the data file the header names exists under its final name; nothing temporary is left."""
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([-1.5, 1.0, 2.0, 1.0]))
    out = write_volume(vol, tmp_path / f"scan{suffix}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(not n.startswith(".") for n in names), names
    assert len(names) == 2 and all(n.startswith("scan.") for n in names)
    back = read_volume(out)
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-6)
