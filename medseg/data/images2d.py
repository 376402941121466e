"""2D images (PNG, JPEG, BMP, TIFF, GIF) read and written with Pillow, as volumes one voxel thick.

A 2D image becomes a :class:`~medseg.data.volume.Volume` like any scan: the array is indexed (i, j, k[, c])
with i the column (x), j the row (y) and channels last, so ``array[i, j, 0]`` is the pixel at (x=i, y=j):

* grey, palette or 1-bit: ``(W, H, 1)``; colour: ``(W, H, 1, 3)``; a multi-page TIFF stacks its N pages
  on the third axis, ``(W, H, N)`` or ``(W, H, N, 3)``;
* the affine is the identity: a pixel is 1 x 1 (the DPI stored by photo formats is never a spacing);
* palette images keep their indices (a palette PNG label map reads as its labels, not as colours); 1-bit
  images read as 0/1; 16-bit grey as uint16; alpha is dropped; CMYK and YCbCr become RGB.

Example:
    >>> vol = read_image_2d("../shared/data/polyp_endotect/images/frame.jpg")  # doctest: +SKIP
    >>> vol.array.shape, vol.spacing  # doctest: +SKIP
    ((720, 576, 1, 3), (1.0, 1.0, 1.0))
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medseg.atomic import atomic_path
from medseg.data.volume import Volume
from medseg.errors import MedsegError

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_WRITE_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG"}
_TO_RGB = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
# a fixed palette of distinct bright colours (matplotlib's tab10), cycled for labels above 10
_PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                     (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], np.uint8)


def _frame_array(frame: Image.Image, fmt: str | None) -> np.ndarray:
    """One page as numpy (rows, cols[, 3]) in the dtype its mode implies."""
    mode = frame.mode
    if mode == "1":
        return np.asarray(frame, dtype=bool).astype(np.uint8)
    if mode in ("L", "P"):
        return np.asarray(frame, dtype=np.uint8)
    if mode == "PA":  # palette + alpha: keep the indices
        return np.asarray(frame.getchannel(0), dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(frame.convert("L"), dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.asarray(frame).astype(np.uint16)  # native byte order whatever the file's
    if mode == "I":
        array = np.asarray(frame, dtype=np.int32)
        return array.astype(np.uint16) if fmt == "PNG" else array  # PNG has no 32-bit grey: this is 16-bit
    if mode == "F":
        return np.asarray(frame, dtype=np.float32)
    if mode in _TO_RGB:
        return np.asarray(frame.convert("RGB") if mode != "RGB" else frame, dtype=np.uint8)
    raise MedsegError(f"unsupported pixel mode '{mode}'")


# pixel modes read as one channel (palette images keep their indices); every other mode is read as R, G, B
GREY_MODES = ("1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_colour_file(path: str | Path) -> bool:
    """True when :func:`read_image_2d` reads the file as three colour channels (decided from the header only).

    Raises:
        MedsegError: naming the file when it cannot be opened as an image.
    """
    try:
        with Image.open(path) as im:
            return im.mode not in GREY_MODES
    except OSError as err:
        raise MedsegError(f"{path}: cannot read the image ({err}); the file is damaged or not an image: re-export it") from None


def read_image_2d(path: str | Path) -> Volume:
    """Read a 2D image (or a multi-page TIFF) as a volume one voxel thick with an identity affine (see module doc).

    Raises:
        MedsegError: naming the file when it is missing, damaged or of a pixel kind that cannot be read.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            pages = []
            for n in range(getattr(im, "n_frames", 1)):
                im.seek(n)
                pages.append(_frame_array(im, fmt))
    except FileNotFoundError:
        raise MedsegError(f"{path}: file not found; check the path") from None
    except MedsegError as err:
        raise MedsegError(f"{path}: {err}; save the image as 8- or 16-bit grey, palette or RGB (PNG or TIFF)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise MedsegError(
            f"{path}: cannot read as a 2D image ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'unreadable'}); "
            "the file is truncated or not an image: re-export or re-download it"
        ) from None
    if len({(p.shape, p.dtype) for p in pages}) > 1 and all(p.dtype == np.uint8 for p in pages):
        pages = [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in pages]  # e.g. animated GIF
    if len({(p.shape, p.dtype) for p in pages}) > 1:
        raise MedsegError(f"{path}: its {len(pages)} pages differ in size or pixel type; save each page as its own file")
    array = np.stack([np.swapaxes(p, 0, 1) for p in pages], axis=2)  # (W, H, N[, 3])
    meta = {"path": str(path), "dtype": str(array.dtype), "format": fmt, "mode": mode, "image2d": True}
    return Volume(np.ascontiguousarray(array), np.eye(4), meta)


def collapse_mask_channels(volume: Volume, where: str | Path) -> Volume:
    """A mask read from a colour file with three equal channels as one channel ``(W, H, Z)``; booleans as uint8.

    Raises:
        MedsegError: naming ``where`` when the channels differ (a colour picture, not a mask).
    """
    array = volume.array
    if array.ndim == 4:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[3])):
            raise MedsegError(f"{where}: a mask must have one channel; this one is colour with different R, G, B values; "
                              "save it as a grey or palette PNG")
        array = np.ascontiguousarray(array[..., 0])
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return volume if array is volume.array else volume.with_array(array, dtype=str(array.dtype))


def _to_pil(array: np.ndarray, path: Path, fmt: str) -> Image.Image:
    """The PIL image of a (W, H), (W, H, 1) or (W, H, 1, 3) array, after checking the values fit the format."""
    shape = array.shape
    colour = array.ndim == 4 and shape[2] == 1 and shape[3] == 3
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] == 1) or colour):
        raise MedsegError(f"{path}: array of shape {shape} is not one 2D image ((W, H), (W, H, 1) or (W, H, 1, 3)); "
                          f"{fmt} holds one 2D image; write volumes as .nii.gz")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise MedsegError(f"{path}: the array holds non-integer floats, which {fmt} cannot store exactly; "
                              "round or rescale it to integers, or write it as .nii.gz")
    elif array.dtype.kind not in "iu":
        raise MedsegError(f"{path}: cannot write an array of type {array.dtype} as {fmt}; use integers or write .nii.gz")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if lo < 0:
        raise MedsegError(f"{path}: the array holds negative values (min {lo:g}); {fmt} stores 0 and up: "
                          "shift the values or write it as .nii.gz")
    limit = 255 if colour or fmt in ("BMP", "JPEG") else 65535
    if hi > limit:
        raise MedsegError(f"{path}: the largest value {hi:g} does not fit in {fmt} ({'8' if limit == 255 else '16'}-bit, "
                          f"at most {limit}); write it as {'.png' if limit == 255 and not colour else '.nii.gz'}")
    if colour:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0, :].astype(np.uint8).swapaxes(0, 1)))
    grey = array.reshape(shape[0], shape[1]).T
    return Image.fromarray(np.ascontiguousarray(grey.astype(np.uint8 if hi <= 255 else np.uint16)))


def tiff_pages(path: str | Path) -> int:
    """Pages of a TIFF file from its header (1 for other formats or an unreadable file: reading it says why)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return 1
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except OSError:
        return 1


def write_image_2d(volume_or_array: Volume | np.ndarray, path: str | Path) -> Path:
    """Write a 2D label map or image atomically; the format follows the suffix (.png, .tif/.tiff, .bmp, .jpg).

    Labels up to 255 are stored as 8-bit grey, up to 65535 as 16-bit grey (PNG and TIFF only); colour
    ``(W, H, 1, 3)`` as 8-bit RGB. A grey ``(W, H, N)`` stack of N > 1 pages is written as a multi-page TIFF (the
    layout :func:`read_image_2d` reads a multi-page TIFF into). PNG, TIFF and BMP read back to the same array;
    JPEG is lossy: use it for pictures, never for label maps.

    Raises:
        MedsegError: for a volume thicker than one voxel (except a grey stack written as TIFF), or values the format
            cannot hold exactly.
    """
    path = Path(path)
    array = volume_or_array.array if isinstance(volume_or_array, Volume) else np.asarray(volume_or_array)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MedsegError(f"{path}: cannot write a 2D image as '{path.suffix}'; use .png (or .tif, .bmp, .jpg)")
    if fmt == "TIFF" and array.ndim == 3 and array.shape[2] > 1:  # a stack: one page per slice, one bit depth for all
        pages = [_to_pil(array[:, :, n:n + 1], path, fmt) for n in range(array.shape[2])]
        if len({page.mode for page in pages}) > 1:
            pages = [Image.fromarray(np.asarray(page).astype(np.uint16)) for page in pages]
        with atomic_path(path) as tmp:
            pages[0].save(tmp, format=fmt, save_all=True, append_images=pages[1:])
        return path
    image = _to_pil(array, path, fmt)
    options = {"quality": 95} if fmt == "JPEG" else {}
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)
    return path


def _rescale_to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    values = image.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    return np.round(np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def overlay_image(image: Volume | np.ndarray, labels: Volume | np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A colour overlay ``(W, H, 1, 3)`` uint8 of ``labels`` on ``image``, for viewing.

    ``image`` is ``(W, H, 1)`` or ``(W, H, 1, C)`` of any type (grey is replicated to RGB; C >= 3 uses the first 3;
    non-uint8 intensities are rescaled to 0..255 by their 1st/99th percentiles). Each non-zero label gets a
    colour of a fixed palette (cycled) blended with ``alpha``; label boundaries (a labelled pixel with a
    4-neighbour of another label) are drawn opaque.
    """
    image = image.array if isinstance(image, Volume) else np.asarray(image)
    labels = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    image = image[:, :, None] if image.ndim == 2 else image
    labels = labels[:, :, 0] if labels.ndim == 3 and labels.shape[2] == 1 else labels
    if image.ndim not in (3, 4) or image.shape[2] != 1 or labels.ndim != 2 or labels.shape != image.shape[:2]:
        raise MedsegError(f"overlay: image {image.shape} and labels {labels.shape} must be one 2D image each "
                          "((W, H, 1[, C]) and (W, H, 1)) of the same size")
    rgb = image[:, :, 0, :3] if image.ndim == 4 else image[:, :, 0, None]
    rgb = _rescale_to_uint8(np.repeat(rgb[..., :1], 3, axis=2) if rgb.shape[2] < 3 else rgb)
    labels = labels.astype(np.int64)
    colours = _PALETTE[(np.abs(labels) - 1) % len(_PALETTE)]
    inside = labels != 0
    out = rgb.astype(np.float64)
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[inside]
    edge = np.zeros_like(inside)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= inside
    out[edge] = colours[edge]
    return np.round(out).astype(np.uint8)[:, :, None, :]


def write_overlay(image: Volume | np.ndarray, labels: Volume | np.ndarray, path: str | Path, alpha: float = 0.45) -> Path:
    """Write :func:`overlay_image` of ``image`` and ``labels`` to ``path`` (a PNG), atomically."""
    return write_image_2d(overlay_image(image, labels, alpha), path)
