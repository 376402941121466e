"""Manifest builders for folders of 2D images (endoscopy, dermoscopy, microscopy, photographs).

================ ======================================================================= ===================
layout           files                                                                   label scheme
================ ======================================================================= ===================
images-masks     ``images/NAME.jpg`` + ``masks/NAME.png`` (also ``NAME_mask``,            from the mask values
                 ``NAME_lesion``, ``NAME_segmentation``...; the masks folder may be       (see below)
                 ``labels``, ``annotations``, ``gt`` or ``trimaps``)
instance-masks   ``images/NAME.png`` + ``masks/NAME/*.png`` (one mask per object, merged  foreground
                 into one instance label map when read)
isbi-em          ``images/N.png`` + ``labels/N.png`` (ISBI 2012 EM: 0 membrane, 255 cell) em_membrane
================ ======================================================================= ===================

Channels: colour images give three channels ``R, G, B`` (``NAME.jpg[0]``... in the manifest; alpha is dropped and a
grey image among colour ones is read as grey R = G = B); a dataset whose images are all grey (also grey content
stored as RGB/RGBA) gives one channel ``image``.

Label scheme, unless ``label_scheme`` is given (see :mod:`medseg.data.labels`): masks with values in {0, 1, 255}
-> ``binary``; values {1, 2, 3} -> ``trimap`` (3 ignored); mostly 0/255 with values in between (JPEG-compressed or
resized masks) -> ``binary_lossy`` (threshold 128); a few other integer values -> one class per value; many
values (instance label maps) -> ``foreground``. The choice is printed and written into the manifest, where the user
can change it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.data.images2d import IMAGE_2D_SUFFIXES, is_colour_file
from medseg.data.io import ImageRef, read_mask
from medseg.data.labels import present_values
from medseg.data.manifest import Case, Manifest
from medseg.errors import MedsegError

IMAGE_FOLDERS = ("images", "image", "imgs", "img", "Images")
MASK_FOLDERS = ("masks", "mask", "labels", "label", "annotations", "gt", "groundtruth", "ground_truth", "trimaps", "Masks", "Labels")
MASK_SUFFIXES = ("", "_mask", "_masks", "_lesion", "_segmentation", "_seg", "_label", "_labels", "_gt", "-mask", "_Segmentation")
MAX_CLASSES = 20


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_2D_SUFFIXES)


def _folder(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise MedsegError(f"{root}: no {what} folder (looked for {', '.join(names[:6])}); a 2D dataset folder holds "
                      "images/ and masks/ (or labels/): put the files there or write a manifest by hand")


def _unique_stems(files: list[Path], folder: Path) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise MedsegError(f"{folder}: {stems[f.stem].name} and {f.name} have the same name; keep one file per image")
        stems[f.stem] = f
    return stems


def _match_masks(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> dict[str, Path]:
    """Image stem -> mask file, by the stem plus one of :data:`MASK_SUFFIXES` (case-insensitive)."""
    lookup = {stem.lower(): path for stem, path in masks.items()}
    found, used = {}, set()
    for stem in images:
        for suffix in MASK_SUFFIXES:
            path = lookup.get((stem + suffix).lower())
            if path is not None:
                found[stem] = path
                used.add(path)
                break
    orphans = [p.name for p in masks.values() if p not in used]
    if orphans:
        raise MedsegError(f"{mask_dir}: {len(orphans)} masks match no image ({', '.join(orphans[:3])}); a mask is named like "
                          f"its image, optionally with one of {', '.join(s for s in MASK_SUFFIXES if s)}: rename them")
    return found


def _channels(files: list[Path]) -> tuple[tuple[str, ...], list[dict[str, ImageRef]]]:
    """RGB channels for colour data, one ``image`` channel when every image is grey (in content)."""
    colour = [is_colour_file(f) for f in files]
    if any(colour):
        from medseg.data.io import read_volume

        grey_content = all(_grey_content(read_volume(f).array) for f, c in zip(files, colour) if c)
        if not grey_content:
            return ("R", "G", "B"), [{ch: ImageRef(f, i) for i, ch in enumerate("RGB")} for f in files]
        return ("image",), [{"image": ImageRef(f, 0) if c else ImageRef(f)} for f, c in zip(files, colour)]
    return ("image",), [{"image": ImageRef(f)} for f in files]


def _grey_content(array: np.ndarray) -> bool:
    return array.ndim == 4 and bool(np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]))


def infer_scheme(masks: list[ImageRef | Path], name: str) -> tuple[str | dict, str]:
    """A label scheme for mask files from their values, and a sentence saying why (printed by the CLI)."""
    values: set = set()
    lossy = 0
    for ref in masks:
        array = read_mask(ref).array
        present = present_values(array)
        values.update(present)
        if len(present) > 2 and set(present) - {0, 1, 255} and 0 in present and 255 in present:
            counts = np.count_nonzero((array > 0) & (array < 255))
            lossy += counts < 0.05 * array.size
    if values <= {0, 1, 255}:
        return "binary", "mask values are 0/1 or 0/255: scheme binary (non-zero = foreground)"
    if values <= {1, 2, 3} and {1, 2, 3} <= values:
        return "trimap", "mask values are 1/2/3 (trimaps): scheme trimap (1 foreground, 2 background, 3 ignored)"
    if lossy and values <= set(range(256)):
        return "binary_lossy", (f"{lossy} masks are 0/255 with a few values in between (lossy compression or resizing): "
                                "scheme binary_lossy (foreground where the value is >= 128)")
    integral = all(float(v).is_integer() and v >= 0 for v in values)
    if integral and len(values - {0}) <= MAX_CLASSES:
        labels = {f"class_{int(v)}": int(v) for v in sorted(values - {0})}
        return {"name": name, "labels": labels}, f"mask values {sorted(int(v) for v in values)}: one class per value"
    return "foreground", (f"masks hold {len(values)} distinct values (instance label maps?): scheme foreground "
                          "(any non-zero value is foreground)")


def _build(cases_masks: list[tuple[str, Path, ImageRef | None]], scheme) -> Manifest:
    channels, refs = _channels([image for _, image, _ in cases_masks])
    cases = tuple(Case(stem, ref, mask) for (stem, _, mask), ref in zip(cases_masks, refs))
    return Manifest(channels, cases, scheme)


def images_masks(root: Path, label_scheme: str | dict | None = None, notes: list[str] | None = None,
                 default_scheme: str | None = None) -> Manifest:
    """``images/`` + ``masks/`` matched by file stem (mask-name suffixes allowed); images without a mask are
    unlabelled cases."""
    image_dir, mask_dir = _folder(root, IMAGE_FOLDERS, "images"), _folder(root, MASK_FOLDERS, "masks")
    images = _unique_stems(_files(image_dir), image_dir)
    if not images:
        raise MedsegError(f"{image_dir}: no images ({', '.join(IMAGE_2D_SUFFIXES)}); check the folder")
    masks = _match_masks(images, _unique_stems(_files(mask_dir), mask_dir), mask_dir)
    pairs = [(stem, path, ImageRef(masks[stem]) if stem in masks else None) for stem, path in images.items()]
    scheme = label_scheme or default_scheme
    if scheme is None and masks:
        scheme, note = infer_scheme([m for *_, m in pairs if m is not None], root.name)
        if notes is not None:
            notes.append(f"{root}: {note}; give --label-scheme to choose another")
    return _build(pairs, scheme)


def instance_masks(root: Path, label_scheme: str | dict | None = None, notes: list[str] | None = None) -> Manifest:
    """``images/NAME.png`` + ``masks/NAME/*.png`` (one binary mask per object); the label of a case is the folder,
    read as one instance label map (1..N), trained on as foreground unless another scheme is given."""
    image_dir, mask_dir = _folder(root, IMAGE_FOLDERS, "images"), _folder(root, ("masks", "mask", "instances"), "masks")
    images = _unique_stems(_files(image_dir), image_dir)
    folders = {p.name: p for p in mask_dir.iterdir() if p.is_dir()}
    orphans = sorted(set(folders) - set(images))
    if orphans:
        raise MedsegError(f"{mask_dir}: mask folders {orphans[:3]} match no image in {image_dir}; name each folder like its image")
    pairs = [(stem, path, ImageRef(folders[stem]) if stem in folders else None) for stem, path in images.items()]
    return _build(pairs, label_scheme or "foreground")


def isbi_em(root: Path, label_scheme: str | dict | None = None, notes: list[str] | None = None) -> Manifest:
    """ISBI 2012 EM: ``images/N.png`` + ``labels/N.png``, 0 = membrane (the class), 255 = cell interior."""
    return images_masks(root, label_scheme, notes, default_scheme="em_membrane")


def detect_2d(root: Path) -> str | None:
    """``images-masks`` or ``instance-masks`` when ``root`` looks like a folder of 2D images; else ``None``."""
    image_dir = next((root / n for n in IMAGE_FOLDERS if (root / n).is_dir()), None)
    if image_dir is None or not _files(image_dir):
        return None
    mask_dir = next((root / n for n in MASK_FOLDERS if (root / n).is_dir()), None)
    if mask_dir is not None and not _files(mask_dir) and any(p.is_dir() for p in mask_dir.iterdir()):
        return "instance-masks"
    return "images-masks"

