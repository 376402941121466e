"""Patch augmentation: identity at zero strength, every transform present, image and label aligned, 2D and 3D."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.data.augment import Augmentation, Params, apply, augment_patch, draw, margin_for
from medseg.data.intensity import INTENSITY
from medseg.data.dataset import CaseData, _class_coords
from medseg.data.labels import get_scheme
from medseg.data.sampling import choose_centre, crop_patch
from medseg.errors import MedsegError
from medseg.training.config import parse_pipeline
from medseg.training.setup import PatchDataset

PROBABILITIES = [f.name for f in dataclasses.fields(Augmentation) if f.name.endswith("_p")]
OFF = Augmentation(**{name: 0.0 for name in PROBABILITIES})
SHAPES = {3: ((3, 30, 26, 22), (20, 16, 12)), 2: ((3, 30, 26), (20, 16))}  # (C, *volume), patch: a size per axis

# Every transform, turned on alone: a transform silently dropped from the chain fails its case here.
TRANSFORMS = {
    "rotation": {"rotation_p": 1.0},
    "scale": {"scale_p": 1.0, "scale": (0.7, 0.8)},
    "mirror": {"mirror_p": 1.0},
    "rot90": {"rot90_p": 1.0},
    "elastic": {"elastic": True, "elastic_p": 1.0, "elastic_magnitude": (1.0, 2.5)},
    "noise": {"noise_p": 1.0, "noise_variance": (0.05, 0.1)},
    "blur": {"blur_p": 1.0, "blur_channel_p": 1.0},
    "brightness": {"brightness_p": 1.0},
    "contrast": {"contrast_p": 1.0},
    "saturation": {"saturation_p": 1.0, "saturation": (0.3, 0.5)},
    "hue": {"hue_p": 1.0, "hue": (0.05, 0.1)},
    "lowres": {"lowres_p": 1.0, "lowres_channel_p": 1.0, "lowres_zoom": (0.5, 0.6)},
    "gamma": {"gamma_p": 1.0},
    "gamma_inverted": {"gamma_inverted_p": 1.0},
}
SPATIAL = ("rotation", "scale", "mirror", "elastic", "rot90")


def _only(*names: str, **extra) -> Augmentation:
    settings = {}
    for name in names:
        settings.update(TRANSFORMS[name])
    return dataclasses.replace(OFF, **{**settings, **extra})


def _volume(dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random image and a label of blobs with values 1 and 4 (BraTS-like), a different size on every axis."""
    shape, _ = SHAPES[dims]
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    grid = np.indices(shape[1:]).astype(float)
    label = np.zeros(shape[1:], np.uint8)
    for value, radius in ((1, 7.0), (4, 4.0)):
        centre = rng.uniform(0.35, 0.65, dims) * np.asarray(shape[1:])
        label[((grid - centre.reshape(-1, *[1] * dims)) ** 2).sum(0) < radius**2] = value
    return image, label


def test_the_transform_list_covers_every_probability():
    named = {key for settings in TRANSFORMS.values() for key in settings if key.endswith("_p")}
    assert named == set(PROBABILITIES)
    assert {name for name, _ in INTENSITY} | set(SPATIAL) == set(TRANSFORMS)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("aug", [OFF, Augmentation(enabled=False)], ids=["probabilities_0", "disabled"])
def test_zero_strength_is_exactly_the_plain_crop(dims, aug):
    image, label = _volume(dims)
    _, patch = SHAPES[dims]
    rng = np.random.default_rng(0)
    # inside, at a corner (the patch is kept inside), and a patch larger than the volume (zero-padded)
    for centre, size in (((15, 13, 11)[:dims], patch), ((0,) * dims, patch), ((15, 13, 11)[:dims], (34, 16, 26)[:dims])):
        img, lab = augment_patch(image, label, centre, size, aug, rng)
        ref_img, ref_lab = crop_patch(image, label, centre, size)
        assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab)
        assert img.dtype == np.float32 and lab.dtype == np.uint8


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_each_transform_changes_the_patch(name, dims):
    image, label = _volume(dims)
    _, patch = SHAPES[dims]
    centre = (15, 13, 11)[:dims]
    img, lab = augment_patch(image, label, centre, patch, _only(name), np.random.default_rng(1))
    ref_img, ref_lab = crop_patch(image, label, centre, patch)
    assert img.shape == ref_img.shape and lab.shape == ref_lab.shape
    assert np.abs(img - ref_img).max() > 1e-3
    if name in SPATIAL:
        assert not np.array_equal(lab, ref_lab)  # the label moves with the image
    else:
        assert np.array_equal(lab, ref_lab)  # intensity transforms leave the label alone


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("names", [("rotation",), ("scale",), ("mirror",), ("elastic",), ("rot90",), SPATIAL], ids="+".join)
def test_image_and_label_stay_aligned(names, dims):
    """Image channels = indicators of the label values: wherever the resampled indicator is exactly 0 or 1 (all
    interpolation neighbours agree), the nearest-neighbour label must say the same."""
    _, label = _volume(dims)
    image = np.stack([(label == 1), (label == 4), np.ones_like(label)]).astype(np.float32)
    _, patch = SHAPES[dims]
    rng = np.random.default_rng(2)
    changed = 0
    for _ in range(4):
        img, lab = augment_patch(image, label, (15, 13, 11)[:dims], patch, _only(*names), rng)
        changed += not np.array_equal(lab, crop_patch(image, label, (15, 13, 11)[:dims], patch)[1])
        for channel, value in enumerate((1, 4)):
            certain_in, certain_out = img[channel] > 1 - 1e-5, img[channel] < 1e-5
            assert np.all(lab[certain_in] == value) and np.all(lab[certain_out] != value)
            assert certain_in.sum() > 10  # the blob is in the patch: the check is not vacuous
        inside = img[2] > 1 - 1e-5  # the voxels that read the volume (not the padding outside it)
        assert np.all((lab != 0) <= inside)
    assert changed >= 3


@pytest.mark.parametrize("dims", [2, 3])
def test_labels_keep_only_their_values(dims):
    image, label = _volume(dims)
    _, patch = SHAPES[dims]
    rng = np.random.default_rng(3)
    aug = _only(*TRANSFORMS, scale=(0.7, 0.8))
    for _ in range(5):
        _, lab = augment_patch(image, label, (15, 13, 11)[:dims], patch, aug, rng)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 4} and (lab > 0).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_patch_and_input_untouched(dims):
    image, label = _volume(dims)
    before = image.copy(), label.copy()
    _, patch = SHAPES[dims]
    aug = _only(*TRANSFORMS)
    run = lambda seed: augment_patch(image, label, (15, 13, 11)[:dims], patch, aug, np.random.default_rng(seed))  # noqa: E731
    (a, la), (b, lb), (c, _) = run(5), run(5), run(6)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.allclose(a, c)
    assert np.array_equal(image, before[0]) and np.array_equal(label, before[1])  # the cached volume is never written
    for aug in (Augmentation(), OFF):  # in-place intensity transforms must not write through a plain crop either
        for seed in range(5):
            augment_patch(image, label, (0,) * dims, patch, dataclasses.replace(aug, brightness_p=1.0), np.random.default_rng(seed))
    assert np.array_equal(image, before[0])


@pytest.mark.parametrize("dims", [2, 3])
def test_margin_keeps_padding_out_of_rotated_and_zoomed_patches(dims):
    shape, patch = SHAPES[dims]
    big = tuple(4 * s for s in patch)
    image = np.ones((1, *big), np.float32)
    aug = _only("rotation", "scale", scale=(1.4, 1.4))
    margin = margin_for(patch, aug)
    assert all(m > 0 for m in margin)
    for seed in range(4):
        img, _ = augment_patch(image, None, tuple(s // 2 for s in big), patch, aug, np.random.default_rng(seed))
        assert img.min() > 1 - 1e-5  # nothing read from outside the margin crop


@pytest.mark.parametrize("dims", [2, 3])
def test_outside_the_volume_reads_zero_in_image_and_label(dims):
    """A patch larger than the volume, rotated and scaled: padding is 0 in both, and only there."""
    shape = (12, 10, 8)[:dims]
    image, label = np.ones((1, *shape), np.float32), np.full(shape, 4, np.uint8)
    patch = (16, 16, 12)[:dims]
    rng = np.random.default_rng(4)
    for _ in range(3):
        img, lab = augment_patch(image, label, tuple(s // 2 for s in shape), patch, _only("rotation", "scale"), rng)
        assert (img[0] < 1e-5).any() and (img[0] > 1 - 1e-5).any()
        assert np.all(lab[img[0] < 1e-5] == 0) and np.all(lab[img[0] > 1 - 1e-5] == 4)


def test_nnunet_probabilities_and_ranges():
    rng = np.random.default_rng(0)
    n = 3000
    drawn = [draw(Augmentation(), 3, 4, rng) for _ in range(n)]
    rate = lambda f: sum(f(p) for p in drawn) / n  # noqa: E731
    expected = {"rotation": 0.2, "scale": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15,
                "lowres": 0.25, "gamma": 0.3, "gamma_inverted": 0.1, "elastic": 0.0}
    for name, p in expected.items():
        assert abs(rate(lambda q: getattr(q, name) is not None) - p) < 0.025, name
    assert abs(rate(lambda q: 0 in q.mirror) - 0.5) < 0.04 and abs(rate(lambda q: 2 in q.mirror) - 0.5) < 0.04
    angles = np.concatenate([q.rotation for q in drawn if q.rotation])
    assert np.abs(angles).max() <= np.deg2rad(30) and np.abs(angles).max() > np.deg2rad(25)
    scales = np.array([q.scale for q in drawn if q.scale])
    assert 0.7 <= scales.min() < 0.75 and 1.35 < scales.max() <= 1.4 and abs((scales < 1).mean() - 0.5) < 0.05
    two_d = [draw(Augmentation(rotation_p=1.0), 2, 1, rng).rotation for _ in range(200)]
    assert all(len(r) == 1 for r in two_d) and np.abs(two_d).max() > np.deg2rad(150)
    assert draw(Augmentation(mirror_axes=(1,), mirror_p=1.0), 3, 1, rng).mirror == (1,)
    assert all(q.rot90 == 0 and q.saturation is None and q.hue is None for q in drawn)  # off by default


def test_intensity_properties():
    """Brightness multiplies; contrast keeps the channel's range; gamma keeps its mean and std; blur is scipy's."""
    x = np.random.default_rng(0).normal(size=(2, 12, 10, 8)).astype(np.float32)
    out, _ = apply(x, None, Params(brightness=(0.8, 1.2)), (12, 10, 8))
    np.testing.assert_allclose(out, x * np.array([0.8, 1.2], np.float32).reshape(2, 1, 1, 1), rtol=1e-6)
    out, _ = apply(x, None, Params(contrast=(1.25, 0.75)), (12, 10, 8))
    assert out[0].min() >= x[0].min() and out[0].max() <= x[0].max() and out[1].std() < x[1].std()
    for gamma in (Params(gamma=(0.7, 1.5)), Params(gamma_inverted=(0.7, 1.5))):
        out, _ = apply(x, None, gamma, (12, 10, 8))
        np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
        np.testing.assert_allclose(out.std(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), rtol=1e-4)
        assert not np.allclose(out, x, atol=1e-3)
    out, _ = apply(x, None, Params(blur=(None, 0.8)), (12, 10, 8))
    assert np.array_equal(out[0], x[0])  # per channel
    np.testing.assert_allclose(out[1], ndimage.gaussian_filter(x[1], 0.8), atol=1e-6)  # nnU-Net blurs with scipy


@pytest.mark.parametrize("dims", [2, 3])
def test_patch_dataset_applies_the_pipeline_augmentation(dims):
    """With augmentation off, sample i is the plain crop at the centre its (seed, epoch, i) generator chose."""
    image, label = _volume(3)
    case = CaseData("a", image, label, _class_coords(label))
    patch = [12, 10, 8][:dims]
    base = {"data": {"synthetic": {"cases": 2}}, "model": {"spatial_dims": dims}, "sampling": {"patch_size": patch}}
    off = parse_pipeline({**base, "augmentation": {"enabled": False}})
    on = parse_pipeline({**base, "augmentation": {"rotation_p": 1.0, "gamma_p": 1.0}})
    scheme = get_scheme("brats")
    for i in range(3):
        rng = np.random.default_rng([off.seed, 0, i])
        rng.integers(1)  # the case
        centre = choose_centre(off.sampling.sampler, case.shape, case.class_coords, rng, off.sampling.foreground_fraction)
        ref, _ = crop_patch(image, label, centre, (*patch, 1) if dims == 2 else patch)
        x, y = PatchDataset([case], off, scheme, 3)[i]
        assert torch.equal(x, torch.from_numpy(ref[..., 0] if dims == 2 else ref)) and y.shape == (3, *patch)
        assert not torch.equal(PatchDataset([case], on, scheme, 3)[i][0], x)


@pytest.mark.parametrize("data, fragment", [
    ({"sampling": {"flip": True}}, "sampling.flip: this key moved: mirroring is augmentation.mirror_p"),
    ({"sampling": {"intensity": False}}, "sampling.intensity: this key moved: intensity augmentation is in the augmentation section"),
    ({"augmentation": {"gamma_p": 1.5}}, "augmentation.gamma_p: 1.5 is a probability"),
    ({"augmentation": {"scale": [1.4, 0.7]}}, "augmentation.scale: [1.4, 0.7] must be a range [low, high]"),
    ({"augmentation": {"rotaton_p": 0.1}}, "augmentation.rotaton_p: unknown key (did you mean 'rotation_p'?)"),
    ({"augmentation": {"hue": [-0.6, 0.1]}}, "augmentation.hue: [-0.6, 0.1] must be within [-0.5, 0.5]"),
    ({"augmentation": {"saturation": [-0.1, 1.2]}}, "augmentation.saturation: [-0.1, 1.2] must not be negative"),
    ({"augmentation": {"mirror_axes": [0, 2]}, "model": {"spatial_dims": 2}, "sampling": {"patch_size": [8, 8]}},
     "augmentation.mirror_axes: [0, 2] must be distinct spatial axes among [0, 1] for a 2D model"),
])
def test_pipeline_augmentation_section(data, fragment):
    base = {"data": {"synthetic": {"cases": 2}}}
    with pytest.raises(MedsegError) as err:
        parse_pipeline({**base, **data})
    assert fragment in str(err.value) and "\n" not in str(err.value)
    p = parse_pipeline({**base, "augmentation": {"mirror_axes": [0, 1], "scale": [0.8, 1.2], "elastic": True,
                                                 "rot90_p": 0.5, "saturation_p": 0.2, "hue": [-0.1, 0.1]}})
    assert p.augmentation.mirror_axes == (0, 1) and p.augmentation.scale == (0.8, 1.2) and p.augmentation.elastic
    assert p.augmentation.rot90_p == 0.5 and p.augmentation.saturation_p == 0.2 and p.augmentation.hue == (-0.1, 0.1)
    assert parse_pipeline(p.to_dict()).augmentation == p.augmentation  # the stored copy of a run reads back


# ---------------------------------------------------------------------------------------------- photographs
def _photo(shape=(3, 40, 40), seed: int = 0, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """A smooth RGB image in [lo, hi] (values of a photograph normalized with normalize: rgb)."""
    noise = np.random.default_rng(seed).random(shape)
    smooth = np.stack([ndimage.gaussian_filter(c, 2.0) for c in noise])
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (lo + (hi - lo) * smooth).astype(np.float32)


def _luma(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def test_default_draws_are_unchanged_by_the_photograph_transforms():
    """Off by default, they draw nothing: the generator ends where it did before they existed (numbers pinned from
    the code without them). On, they are drawn last: every other choice stays the same."""
    for (dims, channels), expected in {(3, 4): 0.28402432611115014, (2, 3): 0.7895705098936474}.items():
        rng = np.random.default_rng(2024)
        drawn = [draw(Augmentation(), dims, channels, rng, (16,) * dims) for _ in range(50)]
        assert rng.random() == expected
        photo = Augmentation(rot90_p=0.5, saturation_p=0.5, hue_p=0.5)
        sample = lambda a, i: draw(a, dims, channels, np.random.default_rng([2024, i]), (16,) * dims)  # noqa: E731
        both = [sample(photo, i) for i in range(50)]  # a generator per sample, as PatchDataset does
        assert [dataclasses.replace(q, rot90=0, saturation=None, hue=None) for q in both] == [sample(Augmentation(), i) for i in range(50)]
        assert any(q.rot90 for q in both) and any(q.saturation for q in both) == (channels == 3)
    first = draw(Augmentation(), 3, 2, np.random.default_rng(3), (16, 16, 16))
    assert first.scale == pytest.approx(0.8437153894422502) and first.mirror == (0,)
    assert first.rotation == pytest.approx((-0.2756113929932375, 0.31549388220220337, 0.0860398829679325))


@pytest.mark.parametrize("dims", [2, 3])
def test_rot90_turns_image_and_label_together(dims):
    """A label drawn from the image (image > threshold) still equals the turned image > threshold; square patches
    get all three quarter turns, others only the half turn; never the identity."""
    image = _photo((3, 40, 40, 12)[: dims + 1])
    label = (image[0] > 0.5).astype(np.uint8)
    centre = (20, 20, 6)[:dims]
    for patch, turns in (((24, 24, 8)[:dims], {1, 2, 3}), ((24, 20, 8)[:dims], {2})):
        ref, ref_lab = crop_patch(image, label, centre, patch)
        seen = set()
        for seed in range(20):
            img, lab = augment_patch(image, label, centre, patch, _only("rot90"), np.random.default_rng(seed))
            assert img.shape == ref.shape and lab.shape == ref_lab.shape and img.flags.c_contiguous
            assert np.array_equal(lab, (img[0] > 0.5).astype(np.uint8))
            k = [k for k in range(4) if np.array_equal(img, np.rot90(ref, k, (1, 2)))]
            assert len(k) == 1 and k[0] != 0
            assert np.array_equal(lab, np.rot90(ref_lab, k[0], (0, 1)))
            seen.add(k[0])
        assert seen == turns


def test_rot90_after_mirroring_and_its_checks():
    x = _photo((2, 6, 6, 3))
    out, _ = apply(x, None, Params(mirror=(0,), rot90=1), (6, 6, 3))
    assert np.array_equal(out, np.rot90(np.flip(x, 1), 1, (1, 2)))
    with pytest.raises(ValueError, match="square"):
        apply(x[:, :, :4], None, Params(rot90=3), (6, 4, 3))
    assert draw(_only("rot90"), 2, 1, np.random.default_rng(0)).rot90 == 2  # no patch size: the half turn only


def test_saturation_blends_with_grey():
    x = _photo()
    grey, _ = apply(x, None, Params(saturation=0.0), x.shape[1:])
    assert np.allclose(grey[0], grey[1], atol=1e-6) and np.allclose(grey[1], grey[2], atol=1e-6)
    np.testing.assert_allclose(grey[0], _luma(x), atol=1e-6)
    same, _ = apply(x, None, Params(saturation=1.0), x.shape[1:])
    np.testing.assert_allclose(same, x, atol=1e-6)
    mid = _photo(lo=0.4, hi=0.6)  # no clipping
    more, _ = apply(mid, None, Params(saturation=1.5), mid.shape[1:])
    np.testing.assert_allclose(_luma(more), _luma(mid), atol=1e-5)
    assert np.abs(more - _luma(more)).mean() > 1.4 * np.abs(mid - _luma(mid)).mean()
    out, _ = apply(x, None, Params(saturation=3.0), x.shape[1:])
    assert out.min() >= 0.0 and out.max() <= 1.0  # clipped to [0, 1]


def test_hue_rotates_colours_and_keeps_luma():
    x = _photo()
    same, _ = apply(x, None, Params(hue=0.0), x.shape[1:])
    np.testing.assert_allclose(same, x, atol=1e-5)
    mid = _photo(lo=0.35, hi=0.65)  # colours with no clipping
    for turn in (0.05, -0.2, 0.5):
        out, _ = apply(mid, None, Params(hue=turn), mid.shape[1:])
        assert np.abs(out - mid).max() > 0.02  # the colours change
        np.testing.assert_allclose(_luma(out), _luma(mid), atol=1e-5)  # a rotation in YIQ keeps Y
        back, _ = apply(out, None, Params(hue=-turn), mid.shape[1:])
        np.testing.assert_allclose(back, mid, atol=1e-5)
    greys = np.repeat(np.linspace(0, 1, 25, dtype=np.float32).reshape(1, 5, 5), 3, axis=0)
    out, _ = apply(greys, None, Params(hue=0.3), (5, 5))
    np.testing.assert_allclose(out, greys, atol=1e-5)  # greys stay grey
    out, _ = apply(x, None, Params(hue=0.25), x.shape[1:])
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_colour_jitter_needs_three_channels():
    aug = _only("saturation", "hue")
    for channels in (1, 2, 4):
        q = draw(aug, 2, channels, np.random.default_rng(0))
        assert q.saturation is None and q.hue is None  # skipped
        with pytest.raises(MedsegError, match=f"saturation and hue need RGB images .* {channels} channel"):
            aug.check(2, channels)
    q = draw(aug, 2, 3, np.random.default_rng(0))
    assert 0.3 <= q.saturation <= 0.5 and 0.05 <= q.hue <= 0.1
    aug.check(2, 3)
    OFF.check(2, 1)
    dataclasses.replace(aug, enabled=False).check(2, 1)
    image = np.random.default_rng(0).normal(size=(1, 30, 26)).astype(np.float32)
    img, _ = augment_patch(image, None, (15, 13), (20, 16), aug, np.random.default_rng(0))
    assert np.array_equal(img, crop_patch(image, None, (15, 13), (20, 16))[0])


def test_photo_pipeline_on_2d_rgb_patches():
    """The transforms of a photograph pipeline together on (3, W, H) patches in [0, 1]: shapes, label values,
    the colour transforms within [0, 1], reproducible."""
    image = _photo((3, 60, 50))
    label = (image[1] > 0.6).astype(np.uint8) * 2
    aug = dataclasses.replace(OFF, rotation_p=0.5, scale_p=0.5, elastic=True, elastic_p=0.5, mirror_p=0.5, rot90_p=0.5,
                              blur_p=0.3, blur_channel_p=1.0, brightness_p=0.5, contrast_p=0.5, saturation_p=0.5, hue_p=0.5)
    for seed in range(8):
        img, lab = augment_patch(image, label, (30, 25), (32, 32), aug, np.random.default_rng(seed))
        assert img.shape == (3, 32, 32) and img.dtype == np.float32 and lab.shape == (32, 32)
        assert set(np.unique(lab)) <= {0, 2}
        again, _ = augment_patch(image, label, (30, 25), (32, 32), aug, np.random.default_rng(seed))
        assert np.array_equal(img, again)
    colour = dataclasses.replace(OFF, saturation_p=1.0, saturation=(0.0, 2.0), hue_p=1.0, hue=(-0.5, 0.5))
    for seed in range(8):
        img, _ = augment_patch(image, None, (30, 25), (32, 32), colour, np.random.default_rng(seed))
        assert img.min() >= 0.0 and img.max() <= 1.0


@pytest.mark.parametrize("dims", [2, 3])
def test_soft_targets_move_exactly_with_the_image(dims):
    """Soft targets (float region shares, ``data.soft_targets``) are resampled linearly like the image: with the
    image's channels copied as the target, every spatial transform (and the float16 store) gives the same patch."""
    image, _ = _volume(dims)
    soft = np.clip(image[:2] * 0.2 + 0.5, 0.0, 1.0).astype(np.float16)  # two region "shares" with a smooth range
    image = soft.astype(np.float32)
    _, patch = SHAPES[dims]
    rng = np.random.default_rng(4)
    changed = 0
    for _ in range(4):
        img, target = augment_patch(image, soft, (15, 13, 11)[:dims], patch, _only(*SPATIAL), rng)
        assert target.dtype == np.float32 and target.shape == (2, *patch)
        np.testing.assert_allclose(target, img, atol=1e-6)
        plain = crop_patch(image, None, (15, 13, 11)[:dims], patch)[0]
        changed += not np.allclose(img, plain)
    assert changed >= 3


def test_soft_targets_are_left_alone_by_intensity_transforms():
    image, _ = _volume(3)
    soft = np.clip(image[:2] * 0.2 + 0.5, 0.0, 1.0).astype(np.float32)
    _, patch = SHAPES[3]
    intensity = [n for n in TRANSFORMS if n not in SPATIAL and n not in ("saturation", "hue")]
    img, target = augment_patch(image, soft, (15, 13, 11), patch, _only(*intensity), np.random.default_rng(5))
    assert np.array_equal(target, crop_patch(soft, None, (15, 13, 11), patch)[0])
    assert not np.allclose(img, crop_patch(image, None, (15, 13, 11), patch)[0])
