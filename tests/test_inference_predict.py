"""``medseg predict``: outputs in the input's exact geometry on real scans, reorientation invariance, bad input,
batch runs (skip existing, shards) and postprocessing."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.io import read_volume, write_volume
from medseg.data.labels import get_scheme
from medseg.data.volume import Volume
from medseg.inference import postprocess as pp
from medseg.inference import loading
from medseg.inference import batch as P
from medseg.inference.inputs import case_id_from_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="real scans in ../shared/data are not available (fresh checkout)")
BRATS = DATA / "brats18" / "Brats18_2013_11_1"
BRATS_FILES = [BRATS / f"Brats18_2013_11_1_{c}.nii.gz" for c in ("flair", "t1", "t1ce", "t2")]


class TinyNet(torch.nn.Module):
    """A deterministic test network: an asymmetric 3x3x3 convolution (so axis mix-ups change the output) + 1x1."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        self.a = conv(in_channels, 4, 3, padding=1)
        self.b = conv(4, out_channels, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch):
    monkeypatch.setattr(loading, "build_model", lambda cfg: TinyNet(cfg["spatial_dims"], cfg["in_channels"], cfg["out_channels"]))


def make_checkpoint(path: Path, channels=("flair", "t1", "t1ce", "t2"), target="regions", scheme="brats", roi=(32, 32, 32),
                    spatial_dims=3, **inference) -> Path:
    sch = get_scheme(scheme)
    out = len(sch.regions) if target == "regions" else len(sch.values)
    torch.manual_seed(0)
    net = TinyNet(spatial_dims, len(channels), out)
    with torch.no_grad():
        net.b.bias.fill_(-0.3)
    ckpt = {"format": "medseg-checkpoint", "model": {"name": "tiny", "spatial_dims": spatial_dims, "in_channels": len(channels),
                                                     "out_channels": out, "kwargs": {}},
            "state_dict": net.state_dict(), "channels": list(channels), "label_scheme": sch.to_dict(), "target": target,
            "preprocessing": {}, "inference": {"roi_size": list(roi), "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 4,
                                               "tta": False, "amp": "off", **inference}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def assert_same_geometry(out: Path, ref: Volume):
    vol = read_volume(out)
    assert vol.shape == ref.shape and vol.array.dtype == np.uint8
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.orientation == ref.orientation
    return vol


def canonical_copy(src: Path, dst: Path) -> Path:
    img = nib.as_closest_canonical(read_as_nifti(src))
    nib.save(img, str(dst))
    return dst


def read_as_nifti(src: Path) -> nib.Nifti1Image:
    vol = read_volume(src)
    return nib.Nifti1Image(np.asarray(vol.array), vol.affine)


def labels_in_ras(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


# ---------------------------------------------------------------- real scans: geometry and reorientation
@needs_data
def test_brats_lps_case_folder_and_ras_copy(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    written = P.predict(tmp_path / "run", BRATS, tmp_path / "out")
    assert [p.name for p in written] == ["Brats18_2013_11_1.nii.gz"]
    flair = read_volume(BRATS_FILES[0])
    assert flair.orientation == ("L", "P", "S")
    lps = assert_same_geometry(written[0], flair)
    values = set(np.unique(lps.array).tolist())
    assert values <= {0, 1, 2, 4} and len(values) > 1
    ras_files = [canonical_copy(f, tmp_path / f"ras_{f.name}") for f in BRATS_FILES]
    out = P.predict(ckpt, ras_files, tmp_path / "out_ras", case_id="ras")[0]
    ras = assert_same_geometry(out, read_volume(ras_files[0]))
    assert ras.orientation == ("R", "A", "S")
    np.testing.assert_array_equal(labels_in_ras(written[0]), ras.array)  # same labels at the same physical positions


@needs_data
@pytest.mark.parametrize("scan", ["spinal_cord/t2.nii.gz", "nrrd_brain_tumor/brain1_image.nrrd"])
def test_single_channel_real_scans_keep_geometry_and_survive_reorientation(tmp_path, scan):
    src = DATA / scan
    ckpt = make_checkpoint(tmp_path / "m.pt", channels=("image",), target="labels", scheme="binary", roi=(32, 32, 16))
    out = P.predict(ckpt, src, tmp_path / "out")[0]
    ref = read_volume(src)
    vol = assert_same_geometry(out, ref)
    assert set(np.unique(vol.array).tolist()) == {0, 1}
    copy = canonical_copy(src, tmp_path / "ras.nii.gz")
    out_ras = P.predict(ckpt, copy, tmp_path / "out_ras")[0]
    assert read_volume(copy).orientation == ("R", "A", "S") != ref.orientation  # PSR and LAS: the copy is reoriented
    np.testing.assert_array_equal(labels_in_ras(out), np.asarray(nib.load(str(out_ras)).dataobj))


# ---------------------------------------------------------------- small synthetic scans: CLI, batch, errors
@pytest.fixture
def synth(tmp_path):
    """Two small LPS oblique 4-channel cases in BraTS 2018 layout, a manifest and a checkpoint."""
    from medseg.data.synthetic import SyntheticSpec, make_case

    root = tmp_path / "data"
    spec = SyntheticSpec(shape=(40, 36, 28))
    rows = ["id,flair,t1,t1ce,t2"]
    for i in range(2):
        images, _, affine = make_case(spec, np.random.default_rng(i))
        cid = f"Case_{i}"
        paths = []
        for c, arr in zip(("flair", "t1", "t1ce", "t2"), images):
            paths.append(write_volume(Volume(arr, affine), root / cid / f"{cid}_{c}.nii.gz", dtype=np.float32))
        rows.append(",".join([cid, *(str(p.relative_to(root)) for p in paths)]))
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "manifest": root / "cases.csv", "ckpt": make_checkpoint(tmp_path / "m.pt", roi=(16, 16, 16)),
            "files": sorted((root / "Case_0").glob("*.nii.gz"), key=lambda p: ["flair", "t1", "t1ce", "t2"].index(p.name.split("_")[-1][:-7]))}


def run_cli(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def test_cli_files_probabilities_and_rerun_skip(synth, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", synth["ckpt"], "--input", *synth["files"], "--output", out, "--probabilities") == 0
    lab, prob = out / "Case_0.nii.gz", out / "Case_0_prob.nii.gz"
    ref = read_volume(synth["files"][0])
    assert_same_geometry(lab, ref)
    p = read_volume(prob)
    assert p.array.shape == (*ref.shape, 3) and p.array.dtype == np.float32 and 0 <= p.array.min() and p.array.max() <= 1
    stamp = lab.stat().st_mtime_ns
    assert run_cli("--model", synth["ckpt"], "--input", *synth["files"], "--output", out, "--probabilities") == 0
    assert lab.stat().st_mtime_ns == stamp and "0 prediction(s)" in capsys.readouterr().out


def test_manifest_batch_shards_and_dataset_folder(synth, tmp_path, monkeypatch):
    from medseg.cli.predict import parse_shard

    assert run_cli("--model", synth["ckpt"], "--input", synth["manifest"], "--output", tmp_path / "a", "--shard", "1/2") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["Case_1.nii.gz"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == (0, 2)
    assert run_cli("--model", synth["ckpt"], "--input", synth["manifest"], "--output", tmp_path / "a") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["Case_0.nii.gz", "Case_1.nii.gz"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    written = P.predict(synth["ckpt"], synth["root"], tmp_path / "b")  # dataset root in BraTS 2018 layout
    assert sorted(p.name for p in written) == ["Case_0.nii.gz", "Case_1.nii.gz"]
    a, b = (np.asarray(nib.load(str(d / "Case_1.nii.gz")).dataobj) for d in (tmp_path / "a", tmp_path / "b"))
    np.testing.assert_array_equal(a, b)


def test_case_id_from_file_names():
    assert case_id_from_file(Path("x/Brats18_A_1_flair.nii.gz"), ["flair", "t1"]) == "Brats18_A_1"
    assert case_id_from_file(Path("case_7_0000.nii.gz"), ["t2"]) == "case_7"
    assert case_id_from_file(Path("t2.nii.gz"), ["t2"]) == "t2"
    assert case_id_from_file(Path("brain1_image.nrrd"), ["image"]) == "brain1"


def _bad(capsys, tmp_path, *args, match: str):
    out = tmp_path / "never"
    assert run_cli(*args, "--output", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()


def test_bad_inputs_stop_with_one_line_and_write_nothing(synth, tmp_path, capsys):
    files, ckpt = synth["files"], synth["ckpt"]
    _bad(capsys, tmp_path, "--model", ckpt, "--input", *files[:3], match="needs 4 channels (flair, t1, t1ce, t2)")
    _bad(capsys, tmp_path, "--model", ckpt, "--input", files[0], match="needs 4 channels")
    one = make_checkpoint(tmp_path / "one.pt", channels=("t2",), target="labels", scheme="binary", roi=(16, 16, 16))
    _bad(capsys, tmp_path, "--model", one, "--input", *files[:2], match="needs 1 channel (t2)")
    _bad(capsys, tmp_path, "--model", ckpt, "--input", *files[:3], tmp_path / "missing.nii.gz", match="file not found")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    _bad(capsys, tmp_path, "--model", tmp_path / "other.pt", "--input", *files, match="is not a medseg run or checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    _bad(capsys, tmp_path, "--model", tmp_path / "text.pt", "--input", *files, match="is not a medseg run or checkpoint")
    (tmp_path / "emptyrun").mkdir()
    _bad(capsys, tmp_path, "--model", tmp_path / "emptyrun", "--input", *files, match="is not a medseg run or checkpoint")
    broken = tmp_path / "broken_t2.nii.gz"
    broken.write_bytes(files[3].read_bytes()[:500])
    _bad(capsys, tmp_path, "--model", ckpt, "--input", *files[:3], broken, match="cannot read")
    incomplete = tmp_path / "inc" / "Case_9"
    incomplete.mkdir(parents=True)
    for f in files[:3]:
        shutil.copy(f, incomplete / f.name.replace("Case_0", "Case_9"))
    _bad(capsys, tmp_path, "--model", ckpt, "--input", incomplete, match="no t2 image")
    other_grid = tmp_path / "small_t2.nii.gz"
    vol = read_volume(files[3])
    write_volume(Volume(vol.array[:-2], vol.affine), other_grid)
    _bad(capsys, tmp_path, "--model", ckpt, "--input", *files[:3], other_grid, match="must share one grid")
    _bad(capsys, tmp_path, "--model", ckpt, "--input", *files, "--shard", "2/2", match="--shard")


def test_2d_model_predicts_volume(synth, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m2d.pt", roi=(32, 32), spatial_dims=2)
    out = P.predict(ckpt, synth["files"], tmp_path / "out")[0]
    assert_same_geometry(out, read_volume(synth["files"][0]))


def test_a_2d_nifti_scan_gets_a_2d_nifti_prediction_on_its_grid(synth, tmp_path):
    import nibabel as nib

    affine = np.array([[0, -0.7, 0, 12.0], [0.5, 0, 0, -3.0], [0, 0, 2.0, 40.0], [0, 0, 0, 1]])
    files = []
    for f in synth["files"]:  # each channel's middle axial plane saved as a 2D array, on a rotated grid
        array = np.asarray(nib.load(str(f)).dataobj)
        files.append(tmp_path / Path(f).name)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array[:, :, array.shape[2] // 2]), affine), files[-1])
    ckpt = make_checkpoint(tmp_path / "m2d.pt", roi=(32, 32), spatial_dims=2)
    out = P.predict(ckpt, files, tmp_path / "out", case_id="plane")[0]
    written = nib.load(str(out))
    assert written.shape == nib.load(str(files[0])).shape == (40, 36)  # 2D in, 2D out
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert read_volume(out).shape == read_volume(files[0]).shape == (*written.shape, 1)


# ---------------------------------------------------------------- postprocessing
def test_postprocessing_rules():
    brats = get_scheme("brats")
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[1, 1, 1] = 2  # isolated voxel
    lab[5:15, 5:15, 5:15] = 2
    lab[8:12, 8:12, 8:12] = 1
    lab[9:11, 9:11, 9:11] = 4  # 8 ET voxels
    out = pp.postprocess(lab, brats, pp.PostprocessSettings(min_component_size=10, et_min_voxels=9))
    assert out[1, 1, 1] == 0 and (out[9:11, 9:11, 9:11] == 1).all() and (out[5, 5, 5] == 2)
    kept = pp.postprocess(lab, brats, pp.PostprocessSettings(min_component_size=1, et_min_voxels=8))
    np.testing.assert_array_equal(kept, lab)
    probs = brats.to_regions(lab).astype(np.float32)
    np.testing.assert_array_equal(pp.to_labels(probs, "regions", brats), lab)
    with pytest.raises(Exception, match="ET and NCR"):
        pp.relabel_small_enhancing(lab, get_scheme("binary"), 5)


def test_checkpoint_postprocess_defaults_and_cli_override(synth, tmp_path):
    ckpt = make_checkpoint(tmp_path / "pp.pt", roi=(16, 16, 16), min_component_size=100000)
    out = P.predict(ckpt, synth["files"], tmp_path / "a")[0]
    assert not np.asarray(nib.load(str(out)).dataobj).any()  # every component is smaller than the default
    assert run_cli("--model", ckpt, "--input", *synth["files"], "--output", tmp_path / "b", "--min-component-size", "0") == 0
    assert np.asarray(nib.load(str(tmp_path / "b" / "Case_0.nii.gz")).dataobj).any()
