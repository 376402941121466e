"""2D image datasets: mask decoding by label schemes, the 2D layouts, the ignore label in losses and sampling,
and the whole path (manifest -> train -> predict PNG of the input's size -> evaluate) on a small synthetic set."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.data.io import read_label, read_mask
from medseg.data.labels import IGNORE, LabelScheme, get_scheme
from medseg.data.layouts import build_manifest, detect_layout
from medseg.data.layouts2d import infer_scheme
from medseg.data.manifest import assign_folds, write_manifest
from medseg.data.synthetic import generate_images_2d
from medseg.errors import MedsegError
from medseg.losses import create_loss


# ----------------------------------------------------------------------------------------------- schemes
def test_binary_scheme_reads_0_255_0_1_and_booleans_alike():
    s = get_scheme("binary")
    for mask in (np.array([0, 255, 255]), np.array([0, 1, 1]), np.array([False, True, True])):
        assert s.decode(mask, "m").tolist() == [0, 1, 1]


def test_lossy_values_are_thresholded_only_where_the_scheme_says_so():
    jpeg_like = np.array([0, 3, 127, 128, 252, 255])
    with pytest.raises(MedsegError, match="not in label scheme 'binary'"):
        get_scheme("binary").decode(jpeg_like, "mask.png")
    assert get_scheme("binary_lossy").decode(jpeg_like, "m").tolist() == [0, 0, 0, 1, 1, 1]


def test_em_membrane_is_inverted_and_trimap_boundary_is_ignored():
    em = get_scheme("em_membrane")
    assert em.decode(np.array([0, 255]), "m").tolist() == [1, 0]
    assert em.decode(np.array([0, 1]), "pred", prediction=True).tolist() == [0, 1]  # predictions are label values
    tri = get_scheme("trimap")
    decoded = tri.decode(np.array([1, 2, 3]), "m")
    assert decoded.tolist() == [1, 0, IGNORE]
    assert tri.to_indices(decoded).tolist() == [1, 0, -1]


def test_custom_scheme_round_trips_through_a_dict():
    spec = {"name": "pets", "labels": {"pet": 1}, "mask_values": {"2": 0}, "ignore": [3]}
    s = LabelScheme.from_dict(spec)
    assert LabelScheme.from_dict(s.to_dict()) == s
    with pytest.raises(MedsegError, match="threshold needs exactly one class"):
        LabelScheme.from_dict({"name": "x", "labels": {"a": 1, "b": 2}, "threshold": 128})
    with pytest.raises(MedsegError, match="mask_values map to"):
        LabelScheme.from_dict({"name": "x", "labels": {"a": 1}, "mask_values": {255: 7}})


# ----------------------------------------------------------------------------------------------- layouts
def test_images_masks_layout_matches_stems_and_infers_the_scheme(tmp_path):
    root = generate_images_2d(tmp_path / "set", 6)
    notes: list[str] = []
    m = build_manifest("auto", root, notes=notes)
    assert detect_layout(root) == "images-masks"
    assert m.channels == ("R", "G", "B") and m.label_scheme == "binary" and "binary" in notes[0]
    case = m["img03"]
    assert case.images["G"].channel == 1 and case.label.path.name == "img03_mask.png"
    # a mask that matches no image is an error naming it
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "stray_mask.png")
    with pytest.raises(MedsegError, match="stray_mask.png"):
        build_manifest("images-masks", root)


def test_infer_scheme_rules(tmp_path):
    def masks(values_list):
        refs = []
        for i, values in enumerate(values_list):
            p = tmp_path / f"m{i}.png"
            Image.fromarray(np.asarray(values, np.uint8).reshape(1, -1)).save(p)
            refs.append(p)
        return refs

    assert infer_scheme(masks([[0, 255, 255]]), "d")[0] == "binary"
    assert infer_scheme(masks([[1, 2, 3, 3]]), "d")[0] == "trimap"
    lossy = [0] * 200 + [255] * 200 + [3, 250]
    assert infer_scheme(masks([lossy]), "d")[0] == "binary_lossy"
    scheme, _ = infer_scheme(masks([[0, 1, 2, 5]]), "d")
    assert scheme == {"name": "d", "labels": {"class_1": 1, "class_2": 2, "class_5": 5}}


def test_instance_mask_folders_merge_into_one_label_map(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((6, 9), 100, np.uint8)).save(tmp_path / "images" / "a.png")
    objects = tmp_path / "masks" / "a"
    objects.mkdir(parents=True)
    for n, (r, c) in enumerate([(1, 1), (3, 5)]):
        mask = np.zeros((6, 9), np.uint8)
        mask[r:r + 2, c:c + 3] = 255
        Image.fromarray(mask).save(objects / f"{n}.png")
    m = build_manifest("auto", tmp_path)
    assert detect_layout(tmp_path) == "instance-masks" and m.label_scheme == "foreground"
    vol = read_mask(m["a"].label)
    assert vol.array.shape == (9, 6, 1) and set(np.unique(vol.array)) == {0, 1, 2}
    assert vol.array[1, 1, 0] == 1 and vol.array[5, 3, 0] == 2  # (x, y) indexing
    assert set(np.unique(read_label(m["a"].label, get_scheme("foreground")).array)) == {0, 1}


# ----------------------------------------------------------------------------------------------- ignore label
@pytest.mark.parametrize("name", ["dice", "dice_ce"])
def test_ignored_pixels_do_not_change_the_loss(name):
    torch.manual_seed(0)
    loss = create_loss(name, "labels")
    logits, target = torch.randn(2, 3, 12, 10), torch.randint(0, 3, (2, 1, 12, 10))
    target[:, :, :4] = -1
    base = loss(logits, target)
    other_logits, other_target = logits.clone(), target.clone()
    other_logits[:, :, :4] = torch.randn(2, 3, 4, 10) * 10
    assert torch.allclose(loss(other_logits, other_target), base)
    # an ignored band is not a band of background: counting it would change the value
    counted = target.clone()
    counted[:, :, :4] = 0
    assert not torch.allclose(loss(logits, counted), base)


def test_masked_loss_equals_monai_without_ignored_pixels():
    """With no ignored pixel the loss is MONAI's DiceCE exactly."""
    torch.manual_seed(1)
    loss = create_loss("dice_ce", "labels")
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    plain = loss(logits, target)
    from monai.losses import DiceCELoss

    ref = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=False, smooth_nr=1e-5, smooth_dr=1e-5)
    assert torch.allclose(plain, ref(logits, target))


def test_ignored_pixels_are_never_patch_centres():
    from medseg.data.dataset import _class_coords

    label = np.zeros((6, 6, 1), np.uint8)
    label[:2] = IGNORE
    label[4, 4] = 1
    coords = _class_coords(label, get_scheme("trimap"))
    assert list(coords) == [1]


# ----------------------------------------------------------------------------------------------- end to end
def _pipeline(tmp_path: Path, manifest: Path) -> Path:
    text = f"""
name: tiny2d
seed: 0
data: {{manifest: {manifest}, target: labels, val_fold: 0, workers: 1}}
preprocessing: {{crop_foreground: false, normalize: rgb}}
model: {{name: unet, spatial_dims: 2, kwargs: {{channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}}}}
sampling: {{patch_size: [32, 32], batch_size: 4, sampler: foreground, foreground_fraction: 0.5}}
augmentation: {{enabled: true, rot90_p: 0.5, hue_p: 0.2, saturation_p: 0.2}}
loss: {{name: dice_ce}}
optimizer: {{name: adamw, lr: 0.01}}
training: {{epochs: 4, iterations_per_epoch: 15, threads: 1}}
inference: {{roi_size: [32, 32], overlap: 0.25, sw_batch_size: 4}}
"""
    path = tmp_path / "tiny2d.yaml"
    path.write_text(text)
    return path


def test_2d_images_train_predict_png_of_input_size_and_evaluate(tmp_path):
    root = generate_images_2d(tmp_path / "set", 10, sizes=((61, 47), (50, 58), (37, 41)))
    manifest = write_manifest(assign_folds(build_manifest("auto", root), 5, 0), tmp_path / "m.csv")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medseg"]
    subprocess.run([*cmd, "train", str(_pipeline(tmp_path, manifest)), "--output", str(run)], check=True, timeout=600)
    preds = tmp_path / "preds"
    subprocess.run([*cmd, "predict", "--model", str(run), "--input", str(manifest), "--output", str(preds), "--overlay"],
                   check=True, timeout=600)
    for image in sorted((root / "images").iterdir()):
        out = preds / f"{image.stem}.png"
        with Image.open(image) as src, Image.open(out) as pred:
            assert pred.size == src.size and pred.mode == "L"
        assert (preds / f"{image.stem}_overlay.png").exists()
    # a folder of images (no manifest) gives the same predictions
    folder_preds = tmp_path / "folder_preds"
    subprocess.run([*cmd, "predict", "--model", str(run), "--input", str(root / "images"), "--output", str(folder_preds)],
                   check=True, timeout=600)
    for out in preds.glob("img??.png"):
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(folder_preds / out.name)))
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in preds.glob("img??.png")])
    assert set(np.unique(labels)) <= {0, 1}
    # a multi-page TIFF: one label page per image page, each as the page predicted alone (rgb scaling is per pixel)
    pages = [Image.open(p).convert("RGB").crop((0, 0, 36, 40)) for p in sorted((root / "images").iterdir())[:3]]
    stack_dir, single_dir = tmp_path / "stack", tmp_path / "single"
    stack_dir.mkdir(), single_dir.mkdir()
    pages[0].save(stack_dir / "stack.tif", save_all=True, append_images=pages[1:])
    for n, page in enumerate(pages):
        page.save(single_dir / f"page{n}.png")
    for source in (stack_dir / "stack.tif", single_dir):
        subprocess.run([*cmd, "predict", "--model", str(run), "--input", str(source), "--output", str(tmp_path / "stack_preds")],
                       check=True, timeout=600)
    with Image.open(tmp_path / "stack_preds" / "stack.tif") as stack:
        assert stack.n_frames == 3 and stack.size == (36, 40)
        for n in range(3):
            stack.seek(n)
            assert np.array_equal(np.asarray(stack), np.asarray(Image.open(tmp_path / "stack_preds" / f"page{n}.png")))
    report = tmp_path / "report"
    subprocess.run([*cmd, "evaluate", "--predictions", str(preds), "--manifest", str(manifest), "--output", str(report)], check=True, timeout=600)
    import pandas as pd

    cases = pd.read_csv(report / "cases.csv")
    dice = cases[(cases.target == "foreground")]["dice"]
    assert len(dice) == 10 and dice.mean() > 0.7  # red discs on green: learnt in a minute


def test_2d_nifti_and_nrrd_files_are_read_as_one_slice_and_written_back_as_2d(tmp_path):
    import nibabel as nib

    from medseg.data.dataset import load_case
    from medseg.data.io import read_volume, write_volume
    from medseg.data.manifest import Case
    from medseg.data.preprocess import Preprocessing

    image = np.arange(120, dtype=np.float32).reshape(12, 10)
    nib.save(nib.Nifti1Image(image, np.diag([0.5, 0.8, 3.0, 1.0])), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image((image > 60).astype(np.uint8), np.diag([0.5, 0.8, 3.0, 1.0])), tmp_path / "seg.nii.gz")
    vol = read_volume(tmp_path / "flat.nii.gz")
    assert vol.shape == (12, 10, 1) and vol.meta["plane"] and vol.spacing[:2] == pytest.approx((0.5, 0.8))
    np.testing.assert_array_equal(vol.array[:, :, 0], image)
    case = Case("flat", {"image": str(tmp_path / "flat.nii.gz")}, str(tmp_path / "seg.nii.gz"))
    loaded = load_case(case, Preprocessing(crop_foreground=False), get_scheme("binary"))
    assert loaded.image.shape == (1, 12, 10, 1) and int(loaded.label.sum()) == int((image > 60).sum())
    written = write_volume(vol.with_array((vol.array > 60).astype(np.uint8)), tmp_path / "out.nii.gz")
    assert nib.load(str(written)).shape == (12, 10)  # written back as it came
    pytest.importorskip("SimpleITK")
    import SimpleITK as sitk

    plane = sitk.GetImageFromArray(image)  # a 2D NRRD: size (10, 12), oblique in-plane direction, an origin
    plane.SetSpacing((0.4, 0.9)), plane.SetOrigin((5.0, -7.0)), plane.SetDirection((0.6, -0.8, 0.8, 0.6))
    sitk.WriteImage(plane, str(tmp_path / "flat.nrrd"))
    vol = read_volume(tmp_path / "flat.nrrd")
    assert vol.shape == (10, 12, 1) and vol.meta["plane"] and vol.spacing[:2] == pytest.approx((0.4, 0.9))
    np.testing.assert_array_equal(vol.array[:, :, 0], image.T)
    back = sitk.ReadImage(str(write_volume(vol.with_array((vol.array > 60).astype(np.uint8)), tmp_path / "out.nrrd")))
    assert back.GetDimension() == 2 and back.GetSize() == plane.GetSize()  # written back as it came
    for got, want in ((back.GetSpacing(), plane.GetSpacing()), (back.GetOrigin(), plane.GetOrigin()),
                      (back.GetDirection(), plane.GetDirection())):
        assert got == pytest.approx(want)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), (image > 60).astype(np.uint8))
