"""2D images through Pillow: (W, H, 1[, 3]) volumes, channels last, identity affine, exact values, atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.images2d import collapse_mask_channels, overlay_image, read_image_2d, write_image_2d, write_overlay
from medseg.data.io import read_mask, read_volume, write_volume
from medseg.errors import MedsegError

W, H = 37, 23  # odd, non-square: a swapped axis cannot go unnoticed


def _rgb(seed: int = 0) -> np.ndarray:
    """numpy (rows, cols, 3) as PIL wants it."""
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# ------------------------------------------------------------------ reading files written by PIL
def test_rgb_png_is_w_h_1_3_with_pixel_x_y_at_i_j(tmp_path):
    rows = _rgb()
    Image.fromarray(rows).save(tmp_path / "c.png")
    vol = read_volume(tmp_path / "c.png")
    assert vol.array.shape == (W, H, 1, 3) and vol.array.dtype == np.uint8
    pil = Image.open(tmp_path / "c.png")
    for x, y in [(0, 0), (W - 1, 0), (5, H - 1), (30, 11)]:
        assert tuple(vol.array[x, y, 0]) == pil.getpixel((x, y))
    np.testing.assert_array_equal(vol.array[:, :, 0, :], rows.transpose(1, 0, 2))
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.meta["image2d"] is True and vol.meta["format"] == "PNG" and vol.meta["mode"] == "RGB"


def test_grey_l(tmp_path):
    rows = _rgb()[..., 0]
    Image.fromarray(rows).save(tmp_path / "g.png")
    vol = read_image_2d(tmp_path / "g.png")
    assert vol.array.shape == (W, H, 1) and vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array[:, :, 0], rows.T)


def test_one_bit_bmp_reads_as_0_1(tmp_path):
    rows = _rgb()[..., 0] > 128
    Image.fromarray(rows).convert("1").save(tmp_path / "m.bmp")
    assert Image.open(tmp_path / "m.bmp").mode == "1"
    vol = read_volume(tmp_path / "m.bmp")
    assert vol.array.dtype == np.uint8 and set(np.unique(vol.array)) == {0, 1}
    np.testing.assert_array_equal(vol.array[:, :, 0], rows.T.astype(np.uint8))


def test_palette_png_keeps_indices_not_colours(tmp_path):
    rows = np.random.default_rng(1).integers(0, 4, (H, W), dtype=np.uint8)
    im = Image.fromarray(rows).convert("P")
    im.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (256 * 3 - 12))
    im.putdata(rows.ravel().tolist())
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    vol = read_volume(tmp_path / "p.png")
    assert vol.array.shape == (W, H, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], rows.T)


def test_16_bit_grey_png_exact(tmp_path):
    rows = np.random.default_rng(2).integers(0, 65536, (H, W)).astype(np.uint16)
    rows[0, 0] = 65535
    Image.fromarray(rows).save(tmp_path / "u16.png")
    vol = read_volume(tmp_path / "u16.png")
    assert vol.array.dtype == np.uint16 and vol.array.max() > 255
    np.testing.assert_array_equal(vol.array[:, :, 0], rows.T)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((H, W, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    vol = read_volume(tmp_path / "a.png")
    assert vol.array.shape == (W, H, 1, 3)
    np.testing.assert_array_equal(vol.array[:, :, 0, :], rgba[..., :3].transpose(1, 0, 2))


def test_multi_page_tiff_stacks_pages(tmp_path):
    pages = [np.full((H, W), v, np.uint8) + np.arange(W, dtype=np.uint8) for v in (10, 50, 90)]
    images = [Image.fromarray(p) for p in pages]
    images[0].save(tmp_path / "s.tif", save_all=True, append_images=images[1:])
    vol = read_volume(tmp_path / "s.tif")
    assert vol.array.shape == (W, H, 3)
    for n, page in enumerate(pages):
        np.testing.assert_array_equal(vol.array[:, :, n], page.T)


def test_jpeg_dpi_is_not_a_spacing(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "photo.jpg", dpi=(300, 300))
    vol = read_volume(tmp_path / "photo.jpg")
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert vol.array.shape == (W, H, 1, 3)


def test_damaged_file_names_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_rgb()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(MedsegError, match=r"bad\.png: cannot read as a 2D image.*re-export"):
        read_volume(bad)
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(MedsegError, match=r"junk\.jpg: cannot read"):
        read_volume(tmp_path / "junk.jpg")


# ------------------------------------------------------------------ channels
def test_channel_index_on_colour_and_grey(tmp_path):
    rows = _rgb()
    Image.fromarray(rows).save(tmp_path / "c.png")  # PNG: exact, unlike JPEG
    green = read_volume(f"{tmp_path / 'c.png'}[1]")
    assert green.array.shape == (W, H, 1) and green.meta["channel"] == 1
    np.testing.assert_array_equal(green.array[:, :, 0], rows[..., 1].T)

    Image.fromarray(rows).save(tmp_path / "c.jpg")
    assert read_volume(f"{tmp_path / 'c.jpg'}[1]").array.shape == (W, H, 1)

    grey = rows[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    vol = read_volume(f"{tmp_path / 'g.png'}[2]")
    assert vol.meta["channel"] == 2
    np.testing.assert_array_equal(vol.array[:, :, 0], grey.T)
    with pytest.raises(MedsegError, match=r"g\.png\[3\]"):
        read_volume(f"{tmp_path / 'g.png'}[3]")


def test_collapse_mask_channels(tmp_path):
    mask = (_rgb()[..., 0] > 100).astype(np.uint8) * 255
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(tmp_path / "m.png")
    vol = read_mask(tmp_path / "m.png")
    assert vol.array.shape == (W, H, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], mask.T)

    Image.fromarray(_rgb()).save(tmp_path / "photo.png")
    with pytest.raises(MedsegError, match=r"photo\.png: a mask must have one channel.*grey or palette PNG"):
        read_mask(tmp_path / "photo.png")
    with pytest.raises(MedsegError, match="labels/x.png"):
        collapse_mask_channels(read_image_2d(tmp_path / "photo.png"), "labels/x.png")

    grey = read_image_2d(tmp_path / "m.png").with_array(np.zeros((W, H, 1), bool))
    assert collapse_mask_channels(grey, "g").array.dtype == np.uint8


# ------------------------------------------------------------------ writing
def test_write_labels_8_and_16_bit(tmp_path):
    small = np.random.default_rng(3).integers(0, 4, (W, H, 1)).astype(np.int64)
    write_image_2d(small, tmp_path / "l8.png")
    with Image.open(tmp_path / "l8.png") as im:
        assert im.mode == "L" and im.size == (W, H)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "l8.png").array, small)

    big = small.copy()
    big[3, 4, 0] = 300
    write_volume(read_image_2d(tmp_path / "l8.png").with_array(big), tmp_path / "l16.png")
    with Image.open(tmp_path / "l16.png") as im:
        assert im.mode.startswith("I") and im.size == (W, H)
    back = read_volume(tmp_path / "l16.png")
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, big)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_write_round_trips_exactly(tmp_path, suffix):
    grey = np.random.default_rng(4).integers(0, 256, (W, H)).astype(np.uint8)
    write_image_2d(grey, tmp_path / f"g{suffix}")
    np.testing.assert_array_equal(read_image_2d(tmp_path / f"g{suffix}").array, grey[:, :, None])
    colour = np.random.default_rng(5).integers(0, 256, (W, H, 1, 3)).astype(np.uint8)
    write_image_2d(colour, tmp_path / f"c{suffix}")
    np.testing.assert_array_equal(read_image_2d(tmp_path / f"c{suffix}").array, colour)
    write_image_2d(grey > 100, tmp_path / f"b{suffix}")
    np.testing.assert_array_equal(read_image_2d(tmp_path / f"b{suffix}").array, (grey > 100)[:, :, None].astype(np.uint8))


def test_write_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(MedsegError, match="write volumes as .nii.gz"):
        write_image_2d(np.zeros((W, H, 2), np.uint8), tmp_path / "thick.png")
    with pytest.raises(MedsegError, match="negative"):
        write_image_2d(np.full((W, H), -1), tmp_path / "neg.png")
    with pytest.raises(MedsegError, match="70000"):
        write_image_2d(np.full((W, H), 70000), tmp_path / "big.png")
    with pytest.raises(MedsegError, match="non-integer"):
        write_image_2d(np.full((W, H), 0.5), tmp_path / "f.png")
    with pytest.raises(MedsegError, match="300"):
        write_image_2d(np.full((W, H), 300), tmp_path / "big.bmp")
    write_image_2d(np.full((W, H), 2.0), tmp_path / "ok.png")  # integral floats are labels
    assert read_image_2d(tmp_path / "ok.png").array.max() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out"
    write_image_2d(np.ones((W, H, 1), np.uint8), out / "a.png")
    write_image_2d(np.zeros((W, H, 1, 3), np.uint8), out / "b.jpg")
    write_image_2d(np.full((W, H, 1), 2, np.uint8), out / "a.png")  # overwrite
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    assert read_image_2d(out / "a.png").array.max() == 2


# ------------------------------------------------------------------ overlay
def test_overlay(tmp_path):
    image = np.random.default_rng(6).integers(0, 256, (W, H, 1)).astype(np.uint8)
    labels = np.zeros((W, H, 1), np.int64)
    labels[20:30, 5:15] = 1
    labels[22:26, 8:12] = 2
    out = overlay_image(image, labels)
    assert out.shape == (W, H, 1, 3) and out.dtype == np.uint8
    far = np.ones((W, H), bool)
    far[18:32, 3:17] = False
    for c in range(3):
        np.testing.assert_array_equal(out[..., 0, c][far], image[..., 0][far])
    inside = labels[..., 0] != 0
    assert (np.abs(out[..., 0, :].astype(int) - image[..., 0, None]).sum(axis=-1)[inside] > 0).mean() > 0.9
    assert not np.array_equal(out[21, 6, 0], out[23, 9, 0])  # different labels, different colours
    other = overlay_image(255 - image, labels)
    edge = np.zeros((W, H), bool)
    edge[20, 5:15] = edge[29, 5:15] = edge[20:30, 5] = edge[20:30, 14] = True  # label 1 next to the background
    edge[22, 8:12] = True  # label 2 next to label 1
    interior = np.zeros((W, H), bool)
    interior[23:25, 9:11] = True
    np.testing.assert_array_equal(out[edge], other[edge])  # boundaries are opaque: the image does not show through
    assert (out[interior] != other[interior]).any()  # interiors are blended: it does

    floats = overlay_image(np.random.default_rng(7).normal(size=(W, H, 1, 4)), labels)
    assert floats.shape == (W, H, 1, 3) and floats.dtype == np.uint8
    write_overlay(image, labels, tmp_path / "ov.png")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "ov.png").array, out)


# ------------------------------------------------------------------ real data
def _first(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    if not files:
        pytest.skip(f"no {pattern} in {folder}")
    return files[0]


def test_real_skin_bmp_masks(shared_data):
    masks = sorted((shared_data / "skin_ph2" / "masks").glob("IMD*_lesion.bmp"))
    if not masks:
        pytest.skip("no skin_ph2 masks")
    one_bit = 0
    for path in masks:
        vol = read_mask(path)
        assert vol.array.ndim == 3 and vol.array.shape[2] == 1 and vol.array.dtype == np.uint8
        values = set(np.unique(vol.array).tolist())
        if vol.meta["mode"] == "1":
            one_bit += 1
            assert values == {0, 1}
        else:  # IMD002 is an RGB 0/255 BMP
            assert values <= {0, 255}
    assert one_bit > 0


def test_real_polyp_masks_and_frames(shared_data):
    mask = read_mask(_first(shared_data / "polyp_endotect" / "masks", "*.png"))
    assert mask.array.ndim == 3 and mask.array.shape[2] == 1
    assert mask.array.dtype == np.uint8 and 0 <= mask.array.min() and mask.array.max() <= 255 and mask.array.max() > 0
    frame = read_volume(_first(shared_data / "polyp_endotect" / "images", "*.jpg"))
    with Image.open(frame.meta["path"]) as im:
        size = im.size
    assert frame.array.shape == (size[0], size[1], 1, 3) and size[0] > size[1]
    assert frame.spacing == (1.0, 1.0, 1.0)


def test_real_nuclei_images_and_labels(shared_data):
    image = read_volume(_first(shared_data / "nuclei_dsb2018" / "images", "*.png"))
    assert image.meta["mode"] == "RGBA" and image.array.shape == (256, 256, 1, 3)
    labels = read_mask(_first(shared_data / "nuclei_dsb2018" / "labels", "*.png"))
    assert labels.array.dtype == np.uint16 and labels.array.shape == (256, 256, 1) and labels.array.max() > 1


def test_real_pets_trimaps_and_em(shared_data):
    trimap = read_mask(_first(shared_data / "pets_trimaps" / "masks", "*.png"))
    assert trimap.array.shape[2] == 1 and set(np.unique(trimap.array).tolist()) <= {1, 2, 3}
    em = read_volume(_first(shared_data / "isbi2012_em" / "images", "*.png"))
    assert em.array.shape == (512, 512, 1) and em.array.dtype == np.uint8


def test_a_label_stack_is_written_as_a_multi_page_tiff(tmp_path):
    stack = np.zeros((W, H, 3), np.uint16)
    stack[1, 2, 0], stack[3, 1, 1] = 7, 300  # the second page needs 16 bits: every page is written with 16
    write_image_2d(stack, tmp_path / "labels.tif")
    back = read_volume(tmp_path / "labels.tif")
    assert back.shape == (W, H, 3) and np.array_equal(back.array, stack)
    small = (stack > 0).astype(np.uint8)
    write_image_2d(small, tmp_path / "small.tif")
    assert np.array_equal(read_volume(tmp_path / "small.tif").array, small)
    with pytest.raises(MedsegError, match="one 2D image"):
        write_image_2d(small, tmp_path / "labels.png")  # a PNG holds one page
