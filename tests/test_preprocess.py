"""Preprocessing: exact inversion, world coordinates kept, orientation-independent, z-score, resampling."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data.io import read_volume
from medseg.data.manifest import read_manifest
from medseg.data.preprocess import Preprocessing
from medseg.data.resample import resample_label
from medseg.data.volume import Volume
from medseg.errors import MedsegError


def _load(case):
    return [read_volume(case.images[ch]) for ch in case.channels], read_volume(case.label)


@pytest.fixture(scope="module")
def synthetic_case(synthetic_dataset):
    return _load(read_manifest(synthetic_dataset).cases[0])


@pytest.fixture(scope="module")
def brats_case(shared_data):
    cid = "Brats18_2013_11_1"
    folder = shared_data / "brats18" / cid
    images = [read_volume(folder / f"{cid}_{ch}.nii.gz") for ch in ("flair", "t1", "t1ce", "t2")]
    return images, read_volume(folder / f"{cid}_seg.nii.gz")


def _check_inverse_is_identity(images, label, pre):
    prepared = pre.apply(images, label)
    assert prepared.label.shape == prepared.image.shape[1:]
    back = pre.invert(prepared.label[None], prepared, order="nearest")[0]
    assert back.shape == label.shape and back.dtype == label.array.dtype
    np.testing.assert_array_equal(back, label.array)
    return prepared


def test_inverse_is_identity_on_real_brats_labels(brats_case):
    images, label = brats_case
    assert images[0].orientation == ("L", "P", "S")
    prepared = _check_inverse_is_identity(images, label, Preprocessing())
    assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
    assert prepared.image.shape[1:] != label.shape  # cropped: the test is not trivial


def test_inverse_is_identity_on_synthetic_oblique_lps(synthetic_case):
    images, label = synthetic_case
    assert images[0].orientation == ("L", "P", "S")
    prepared = _check_inverse_is_identity(images, label, Preprocessing(margin=1))
    assert prepared.image.shape[1:] != label.shape
    # scores invert too, channel by channel, with background fill outside the crop
    scores = np.stack([prepared.label == v for v in (0, 1, 2, 4)]).astype(np.float32)
    back = Preprocessing(margin=1).invert(scores, prepared, fill=[1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray((0, 1, 2, 4))[back.argmax(0)], label.array)


@pytest.mark.parametrize("orientation", ["RAS", "LPI", "PSR"])
def test_prepared_grid_keeps_world_coordinates(synthetic_case, orientation):
    images, label = synthetic_case
    prepared = Preprocessing(orientation=orientation).apply(images, label)
    assert nib.aff2axcodes(prepared.affine) == tuple(orientation)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ijk = np.array([rng.integers(0, s) for s in prepared.label.shape])
        world = prepared.affine @ np.append(ijk, 1.0)
        original = np.linalg.solve(images[0].affine, world)[:3]  # the same point on the original grid
        np.testing.assert_allclose(original, np.round(original), atol=1e-6)
        assert label.array[tuple(np.round(original).astype(int))] == prepared.label[tuple(ijk)]


def test_ras_copy_gives_identical_prepared_arrays(brats_case):
    images, label = brats_case

    def as_ras(vol: Volume) -> Volume:
        img = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
        return Volume(np.asanyarray(img.dataobj), img.affine)

    ras_images, ras_label = [as_ras(v) for v in images], as_ras(label)
    assert ras_images[0].orientation == ("R", "A", "S") and not np.array_equal(ras_images[0].array, images[0].array)
    pre = Preprocessing()
    a, b = pre.apply(images, label), pre.apply(ras_images, ras_label)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_zscore_over_nonzero(synthetic_case):
    images, _ = synthetic_case
    prepared = Preprocessing(orientation=None, crop_foreground=False).apply(images)  # same grid as the input
    for c, vol in enumerate(images):
        nonzero = vol.array != 0
        assert 0 < nonzero.mean() < 1
        x = prepared.image[c][nonzero]
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
        assert np.all(prepared.image[c][~nonzero] == 0)  # background stays 0


def test_resample_to_spacing(synthetic_case):
    images, label = synthetic_case
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0), crop_foreground=False, normalize="none")
    prepared = pre.apply(images, label)
    oriented = Preprocessing(crop_foreground=False, normalize="none").apply(images, label)
    spacing_in = np.sqrt((oriented.affine[:3, :3] ** 2).sum(axis=0))
    expected = tuple(int(round(s * sp / 2.0)) for s, sp in zip(oriented.image.shape[1:], spacing_in))
    assert prepared.image.shape[1:] == expected and prepared.label.shape == expected
    assert expected != oriented.image.shape[1:]
    np.testing.assert_allclose(np.sqrt((prepared.affine[:3, :3] ** 2).sum(axis=0)), 2.0, rtol=0.03)
    # the grid still covers the same field of view: voxel centres of both grids share the first corner
    corner_in = oriented.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    corner_out = prepared.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner_in, corner_out, atol=1e-6)
    assert set(np.unique(prepared.label).tolist()) <= {0, 1, 2, 4}
    back = pre.invert(prepared.label[None], prepared, order="nearest")[0]
    assert back.shape == label.shape
    assert (back == label.array).mean() > 0.9  # nearest there and back: close, not exact


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return (affine @ np.append(ijk, 1.0))[:3]


@pytest.mark.parametrize("offset", [(10.0, 11.0, 12.0), (10.5, 11.3, 12.7), (9.2, 10.6, 11.9)])
def test_resampled_label_stays_on_the_image(offset):
    """Down-sampling 1 mm -> 2 mm keeps a label where the image puts it: the label's world centroid agrees with the
    resampled image's (the same object drawn in both) to a fraction of a millimetre. Nearest neighbour copies one
    corner of every 2x2x2 block and moves every label 0.5 mm along each axis."""
    grid = np.indices((40, 40, 40)).astype(np.float64)
    inside = sum((g - c) ** 2 for g, c in zip(grid, offset)) <= 6.0 ** 2
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image = Volume(inside.astype(np.float32), affine)
    label = Volume(inside.astype(np.uint8), affine)
    prepared = Preprocessing(spacing=(2.0, 2.0, 2.0), crop_foreground=False, normalize="none").apply([image], label)
    truth = _world_centroid(inside, affine)
    from_label = _world_centroid(prepared.label == 1, prepared.affine)
    from_image = _world_centroid(prepared.image[0] >= 0.5, prepared.affine)
    np.testing.assert_allclose(from_label, truth, atol=0.2)
    np.testing.assert_allclose(from_label, from_image, atol=0.2)


def test_resample_label_majority_ties_values_and_dtype():
    # 2 -> 1 along each axis: the majority of the covered voxels, a tie to the larger value
    block = np.array([[[0, 0], [0, 4]], [[4, 4], [2, 0]]], dtype=np.int16)  # 0 x4, 4 x3, 2 x1
    assert resample_label(block, (1, 1, 1)).tolist() == [[[0]]]
    tie = np.array([[[0, 0], [0, 0]], [[4, 4], [4, 4]]], dtype=np.int16)
    out = resample_label(tie, (1, 1, 1))
    assert out.tolist() == [[[4]]] and out.dtype == np.int16
    # any value is kept as a value (the ignore value 255 too); up-sampling never invents a value
    lab = np.random.default_rng(0).choice(np.array([0, 1, 255], np.uint8), size=(6, 7, 5))
    up = resample_label(lab, (12, 14, 10))
    assert set(np.unique(up).tolist()) <= {0, 1, 255} and up.dtype == np.uint8
    # 2D label maps (``size`` resizing of images) use the same rule
    assert resample_label(np.array([[0, 0, 1, 1], [0, 1, 1, 1]]), (1, 2)).tolist() == [[0, 1]]


def _shares(label: np.ndarray, shape) -> dict[int, np.ndarray]:
    """Reference: every value's mask interpolated by torch over the whole grid (float64)."""
    import torch
    import torch.nn.functional as F

    mode = {2: "bilinear", 3: "trilinear"}[label.ndim]
    return {int(v): F.interpolate(torch.from_numpy((label == v).astype(np.float64))[None, None], size=tuple(shape),
                                  mode=mode, align_corners=False)[0, 0].numpy() for v in np.unique(label)}


def test_resample_label_takes_the_largest_interpolated_share_everywhere():
    """Per bounding box and with the background as the remainder, the result is torch's interpolation of every
    value's mask over the whole grid, argmax: on random maps (noise and boxes, 2D and 3D, up and down, values
    sampled away between coarse samples) each voxel's value has the largest share, to float rounding."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        ndim = int(rng.integers(2, 4))
        old = tuple(int(n) for n in rng.integers(3, 16, ndim))
        new = tuple(int(n) for n in rng.integers(2, 20, ndim))
        values = np.sort(rng.choice(np.array([0, 1, 2, 4, 7, 255], np.uint8), int(rng.integers(2, 6)), replace=False))
        if rng.random() < 0.5:
            label = values[rng.integers(0, len(values), old)]
        else:
            label = np.full(old, values[0], np.uint8)
            for v in values[1:]:
                label[tuple(slice(int(a), int(a) + int(rng.integers(1, 6))) for a in rng.integers(0, np.array(old)))] = v
        out = resample_label(label, new)
        shares = _shares(label, new)
        top = np.max(np.stack(list(shares.values())), axis=0)
        got = np.choose(np.searchsorted(np.array(sorted(shares)), out), [shares[v] for v in sorted(shares)])
        np.testing.assert_allclose(got, top, atol=1e-6)
        checked += out.size
    assert checked > 10_000


def test_resample_label_many_objects_are_kept():
    # 300 boxes of 6 voxels (instance ids) at even offsets: halved, each is exactly 3 voxels, the rest background
    label = np.zeros((120, 100, 60), np.uint16)
    expected = np.zeros((60, 50, 30), np.uint16)
    for k in range(300):
        i, j, z = (k % 15) * 8, (k // 15 % 10) * 10, (k // 150) * 30
        label[i:i + 6, j:j + 6, z:z + 6] = k + 1
        expected[i // 2:i // 2 + 3, j // 2:j // 2 + 3, z // 2:z // 2 + 3] = k + 1
    out = resample_label(label, (60, 50, 30))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, expected)


def test_resampling_round_trip_keeps_thin_real_regions(brats_case):
    """A perfect model at 2 mm: the real label taken to 2 mm, its regions brought back to 1 mm by the inference path
    (linear, threshold 0.5). The enhancing rim of this case is a few voxels thick; an aligned down-sampling keeps
    Dice >= 0.8 (nearest neighbour: 0.68)."""
    images, label = brats_case
    from medseg.data.labels import get_scheme

    scheme = get_scheme("brats")
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0), margin=2)
    prepared = pre.apply(images, label)
    back = pre.invert(scheme.to_regions(prepared.label).astype(np.float32), prepared) > 0.5
    truth = scheme.to_regions(label.array).astype(bool)
    dice = [2 * (b & t).sum() / (b.sum() + t.sum()) for b, t in zip(back, truth)]
    assert dice[0] > 0.97 and dice[2] > 0.8, dice


def test_region_shares_are_resampled_with_the_image_and_cropped_with_the_label(synthetic_case):
    """``masks`` (soft targets) go through the images' reorientation and linear resampling, then the label's crop:
    the same as the masks given as images, and they change nothing else."""
    from medseg.data.labels import get_scheme

    images, label = synthetic_case
    masks = get_scheme("brats").to_regions(label.array).astype(np.float32)
    pre = Preprocessing(orientation="RAS", spacing=(2.0, 1.5, 1.7), margin=1)
    plain, soft = pre.apply(images, label), pre.apply(images, label, masks)
    assert soft.bbox == plain.bbox and np.array_equal(soft.image, plain.image) and np.array_equal(soft.label, plain.label)
    as_images = Preprocessing(orientation="RAS", spacing=(2.0, 1.5, 1.7), crop_foreground=False, normalize="none").apply(
        [Volume(m, label.affine) for m in masks])
    crop = tuple(slice(a, b) for a, b in soft.bbox)
    np.testing.assert_allclose(soft.masks, np.clip(as_images.image[(slice(None), *crop)], 0, 1), atol=1e-6)
    assert soft.masks.shape == (3, *soft.label.shape) and 0.0 < soft.masks[2][soft.masks[2] > 0].min() < 0.5  # shares


def test_region_shares_keep_more_of_thin_real_regions_than_labels(brats_case):
    """A perfect model at 2 mm trained on shares instead of the resampled label: brought back to 1 mm by the
    inference path, the enhancing rim of this case keeps more (measured ET Dice 0.840 against 0.812)."""
    from medseg.data.labels import get_scheme

    images, label = brats_case
    scheme = get_scheme("brats")
    truth = scheme.to_regions(label.array)
    pre = Preprocessing(spacing=(2.0, 2.0, 2.0), margin=2)
    prepared = pre.apply(images, label, truth.astype(np.float32))

    def dice(regions):
        back = pre.invert(regions.astype(np.float32), prepared) > 0.5
        return [2 * (b & t).sum() / (b.sum() + t.sum()) for b, t in zip(back, truth)]

    hard, soft = dice(scheme.to_regions(prepared.label)), dice(prepared.masks)
    assert soft[2] > hard[2] + 0.02 and all(s >= h for s, h in zip(soft, hard)), (soft, hard)


def test_settings_round_trip_and_validation():
    pre = Preprocessing(spacing=(1, 1, 2), margin=0)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(MedsegError, match="normalize"):
        Preprocessing(normalize="minmax")
    with pytest.raises(MedsegError, match="orientation"):
        Preprocessing(orientation="XYZ")
    with pytest.raises(MedsegError, match="unknown keys"):
        Preprocessing.from_dict({"spacingg": [1, 1, 1]})


def _photo_channels(dtype, top: int, seed: int = 0) -> list[Volume]:
    """Three channels (R, G, B) of a 2D image held as (W, H, 1), each reaching ``top``."""
    rng = np.random.default_rng(seed)
    channels = []
    for _ in range(3):
        a = rng.integers(0, top + 1, size=(9, 7, 1))
        a.flat[0] = top
        channels.append(Volume(a.astype(dtype), np.eye(4)))
    return channels


@pytest.mark.parametrize("dtype, top, divisor", [
    (np.uint8, 255, 255), (np.uint8, 40, 255),  # an 8-bit image: by 255 whatever its brightest pixel
    (np.uint16, 65535, 65535), (np.uint16, 200, 65535),  # the array type decides: a dark 16-bit image still by 65535
    (np.float32, 255, 255), (np.float32, 3000, 65535), (np.int32, 65535, 65535),  # other types: by value
    (np.float64, 100000, 100000),  # beyond 16 bits: the channel's own maximum
])
def test_normalize_rgb_divides_by_the_integer_range(dtype, top, divisor):
    images = _photo_channels(dtype, top)
    pre = Preprocessing(normalize="rgb", crop_foreground=False)
    prepared = pre.apply(images)
    assert prepared.image.dtype == np.float32 and prepared.image.shape == (3, 9, 7, 1)
    expected = np.stack([v.array.astype(np.float32) for v in images]) / np.float32(divisor)
    np.testing.assert_array_equal(prepared.image, expected)  # exactly x / divisor: no per-image statistics
    assert prepared.image.min() >= 0 and prepared.image.max() <= 1


def test_normalize_rgb_is_a_pipeline_choice():
    from medseg.training.config import parse_pipeline

    assert "rgb" in Preprocessing.NORMALIZERS
    p = parse_pipeline({"data": {"synthetic": {"cases": 2}}, "preprocessing": {"normalize": "rgb"}})
    assert p.preprocessing.normalize == "rgb" and Preprocessing.from_dict(p.preprocessing.to_dict()) == p.preprocessing
    uint8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).astype(np.float32)  # the float stack alone: by value
    np.testing.assert_array_equal(Preprocessing(normalize="rgb")._normalize(uint8), uint8 / np.float32(255))
