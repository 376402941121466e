"""Files in, files out for the classical methods: images, seeds, boxes, probability maps, label maps.

* :func:`load_input` — one image file (a colour photo gives its R, G, B channels), several channel files of one
  scan, or a case folder of a known layout (``--channels`` picks e.g. ``flair``); checked as ``medseg validate``
  checks scans; a 2D image becomes ``(W, H, C)``, a volume ``(X, Y, Z, C)``.
* :func:`read_seeds` — a label image on the image's grid (0 unlabelled, 1 object, 2 background, more labels for the
  random walker and watershed) or a small JSON of points, a box and a circle in voxel indices (x = column, y = row
  for 2D images, counted from 0)::

      {"foreground": [[120, 80], [130, 95]], "background": [[5, 5]], "radius": 3,
       "labels": {"3": [[40, 60]]}, "box": [100, 60, 180, 140], "circle": [140, 100, 45]}

  Boxes are half-open ``[x0, y0, (z0,) x1, y1, (z1)]``. A point outside the image, an empty seed set or a box of
  zero area is a :class:`~medseg.errors.MedsegError` naming the file, the point and the fix.
* :func:`write_labels` — the label map on the input's exact grid: ``<id>.png`` for a 2D image (16-bit when
  labels exceed 255), ``<id>.nii.gz`` with the scan's affine otherwise; :func:`write_probabilities` —
  ``<id>_prob.nii.gz``, float32, channels last, as ``medseg predict --probabilities`` writes it.

Example:
    >>> inp = load_input(["../shared/data/skin_ph2/images/IMD002.bmp"])  # doctest: +SKIP
    >>> inp.image.shape, inp.case_id, inp.two_d  # doctest: +SKIP
    ((765, 572, 3), 'IMD002', True)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data.io import ImageRef, read_mask, read_volume, write_volume
from medseg.data.volume import Volume
from medseg.errors import MedsegError

LABEL_SUFFIXES = (".png", ".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff", ".bmp")
_JSON_KEYS = {"foreground", "background", "labels", "radius", "box", "circle"}


@dataclass
class SegInput:
    """An image ready for a method: ``image`` ``(*spatial, C)`` float32, the ``grid`` (first channel's volume, whose
    affine and shape the outputs keep), the case id, whether it is a 2D image, the spacing and channel names."""

    image: np.ndarray
    grid: Volume
    case_id: str
    two_d: bool
    spacing: tuple[float, ...]
    channels: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[:-1])

    def size_text(self) -> str:
        return "x".join(str(s) for s in self.shape)


def _split_channels(vol: Volume, where: str) -> tuple[list[Volume], list[str]]:
    if vol.array.ndim == 4:
        names = ["R", "G", "B"] if vol.meta.get("image2d") and vol.array.shape[3] == 3 else [f"{i}" for i in range(vol.array.shape[3])]
        return [vol.with_array(np.ascontiguousarray(vol.array[..., c])) for c in range(vol.array.shape[3])], [f"{where}[{n}]" for n in names]
    return [vol], [where]


def load_input(paths: Sequence[str | Path], channels: Sequence[str] | None = None, case_id: str | None = None) -> SegInput:
    """Read the image(s) named by ``paths`` (see the module doc) into a :class:`SegInput`."""
    from medseg.data.checks import check_images
    from medseg.data.manifest import check_case_id
    from medseg.inference.inputs import case_id_from_file

    if not paths:
        raise MedsegError("--input: give an image file, the channel files of one scan, or a case folder")
    refs = [ImageRef.parse(p) for p in paths]
    for ref in refs:
        if not ref.path.exists():
            raise MedsegError(f"{ref.path}: file not found; check the --input path")
    names: list[str] = []
    if len(refs) == 1 and refs[0].path.is_dir() and not _is_dicom(refs[0].path):
        folder = refs[0].path
        refs, names = _case_folder(folder, channels)
        default_id = folder.name
    else:
        default_id = case_id_from_file(refs[0], list(channels or ()))
        if channels and len(channels) != len(refs):
            raise MedsegError(f"--channels names {len(channels)} channel(s) but {len(refs)} file(s) were given; "
                              "--channels selects channels of a case folder, or names the given files in order")
        names = list(channels or [])
    vols, wheres = [], []
    for ref in refs:
        vs, ws = _split_channels(read_volume(ref), str(ref))
        vols += vs
        wheres += ws
    if len(names) != len(vols):
        names = [w.split("/")[-1] for w in wheres]
    vols = check_images(vols, names, wheres)
    grid = vols[0]
    two_d = bool(grid.meta.get("image2d")) or (grid.array.ndim == 3 and grid.array.shape[2] == 1)
    stack = np.stack([v.array.astype(np.float32, copy=False) for v in vols], axis=-1)
    image = stack[:, :, 0, :] if two_d else stack
    spacing = grid.spacing[:2] if two_d else grid.spacing
    cid = check_case_id(case_id or default_id, "--id")
    return SegInput(np.ascontiguousarray(image), grid, cid, two_d, tuple(float(s) for s in spacing), names)


def _is_dicom(folder: Path) -> bool:
    from medseg.inference.inputs import _looks_like_dicom

    return _looks_like_dicom(folder)


def _case_folder(folder: Path, channels: Sequence[str] | None) -> tuple[list[ImageRef], list[str]]:
    from medseg.data.layouts import build_manifest, detect_layout

    try:
        layout = detect_layout(folder.parent)
        manifest = build_manifest(layout, folder.parent)
        case = manifest[folder.name]
    except (MedsegError, KeyError):
        raise MedsegError(f"{folder}: not a case folder of a known layout (e.g. BraTS <ID>/<ID>_flair.nii.gz); "
                          "give the image files with --input instead") from None
    have = list(case.images)
    wanted = list(channels or have)
    lower = {c.lower(): c for c in have}
    missing = [c for c in wanted if c.lower() not in lower]
    if missing:
        raise MedsegError(f"{folder}: no channel {missing}; this case has {', '.join(have)}: pick with --channels, e.g. --channels {have[0]}")
    return [case.images[lower[c.lower()]] for c in wanted], [lower[c.lower()] for c in wanted]


# ----------------------------------------------------------------------------- seeds
@dataclass
class Seeds:
    """What a user marked: ``labels`` on the grid (or None), a ``box`` and a ``circle`` (or None)."""

    labels: np.ndarray | None = None
    box: list[int] | None = None
    circle: list[float] | None = None


def read_seeds(spec: str | Path | None, inp: SegInput, box: Sequence[int] | None = None,
               circle: Sequence[float] | None = None) -> Seeds:
    """Seeds from a label image or a JSON file (see the module doc), plus ``box`` / ``circle`` given directly."""
    seeds = Seeds(box=list(box) if box else None, circle=list(circle) if circle else None)
    if spec is None:
        return seeds
    path = Path(spec)
    if not path.exists():
        raise MedsegError(f"{path}: seeds file not found; give a label image on the image's grid or a JSON of points")
    if path.suffix.lower() == ".json":
        return _seeds_json(path, inp, seeds)
    vol = read_mask(path)
    array = vol.array[:, :, 0] if inp.two_d and vol.array.ndim == 3 and vol.array.shape[2] == 1 else vol.array
    if array.shape != inp.shape:
        raise MedsegError(f"{path}: seed image of size {'x'.join(map(str, array.shape))} is not on the image's grid "
                          f"({inp.size_text()}); draw the seeds on the image itself")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)) or (array < 0).any():
        raise MedsegError(f"{path}: seed labels must be non-negative integers (0 unlabelled, 1 object, 2 background)")
    labels = array.astype(np.int32)
    if not (labels > 0).any():
        raise MedsegError(f"{path}: the seed set is empty (every voxel is 0); mark object voxels with 1 and background with 2")
    seeds.labels = labels
    return seeds


def _seeds_json(path: Path, inp: SegInput, seeds: Seeds) -> Seeds:
    try:
        spec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise MedsegError(f"{path}: not valid JSON ({str(err)[:100]}); write e.g. "
                          '{"foreground": [[120, 80]], "background": [[5, 5]]}') from None
    if not isinstance(spec, dict) or set(spec) - _JSON_KEYS:
        extra = sorted(set(spec) - _JSON_KEYS) if isinstance(spec, dict) else type(spec).__name__
        raise MedsegError(f"{path}: unknown entries {extra}; the seeds JSON holds {', '.join(sorted(_JSON_KEYS))}")
    groups = {1: spec.get("foreground") or [], 2: spec.get("background") or []}
    for key, pts in (spec.get("labels") or {}).items():
        if not str(key).isdigit() or int(key) < 1:
            raise MedsegError(f"{path}: label '{key}' under 'labels' must be a positive integer, e.g. \"3\"")
        groups[int(key)] = list(groups.get(int(key), [])) + list(pts)
    radius = spec.get("radius", 0)
    if not isinstance(radius, (int, float)) or radius < 0:
        raise MedsegError(f"{path}: radius {radius!r} must be a number >= 0 (voxels painted around each point)")
    n = len(inp.shape)
    labels = np.zeros(inp.shape, np.int32)
    count = 0
    for value, pts in groups.items():
        for k, p in enumerate(pts):
            where = f"{path}: {'foreground' if value == 1 else 'background' if value == 2 else f'label {value}'} point {k}"
            if not isinstance(p, (list, tuple)) or len(p) != n or not all(isinstance(c, (int, float)) for c in p):
                raise MedsegError(f"{where} {p!r} is not {n} numbers ({'[x, y]' if n == 2 else '[x, y, z]'}, voxel indices from 0)")
            idx = [int(round(c)) for c in p]
            if any(c < 0 or c >= s for c, s in zip(idx, inp.shape)):
                raise MedsegError(f"{where} {list(p)} lies outside the image of size {inp.size_text()}; coordinates are voxel "
                                  f"indices from 0 ({'x = column, y = row' if n == 2 else 'x, y, z'}), each below the size")
            _paint(labels, idx, float(radius), value)
            count += 1
    if groups[1] or groups[2] or len(groups) > 2:
        if count == 0:
            raise MedsegError(f"{path}: the seed set is empty; list at least one point under 'foreground' and 'background'")
        seeds.labels = labels
    elif "foreground" in spec or "background" in spec:
        raise MedsegError(f"{path}: the seed set is empty; list at least one point under 'foreground' and 'background'")
    if spec.get("box") is not None:
        seeds.box = list(spec["box"])
    if spec.get("circle") is not None:
        seeds.circle = list(spec["circle"])
    return seeds


def _paint(labels: np.ndarray, idx: list[int], radius: float, value: int) -> None:
    r = int(np.ceil(radius))
    sl = tuple(slice(max(c - r, 0), min(c + r + 1, s)) for c, s in zip(idx, labels.shape))
    grid = np.ogrid[sl]
    ball = sum((g - c) ** 2 for g, c in zip(grid, idx)) <= radius ** 2
    labels[sl][ball] = value


# ----------------------------------------------------------------------------- outputs
def output_path(output: str | Path, inp: SegInput) -> Path:
    """``output`` itself when it names a label file (.png, .nii.gz, ...), else ``output/<id>.png|.nii.gz``."""
    out = Path(output)
    name = out.name.lower()
    if any(name.endswith(s) for s in LABEL_SUFFIXES):
        if name.endswith(".png") and not inp.two_d:
            raise MedsegError(f"{out}: a PNG holds one 2D image but the input is a volume; write .nii.gz")
        return out
    if out.exists() and not out.is_dir():
        raise MedsegError(f"{out}: exists and is not a folder; give a folder or a file name ending in .png or .nii.gz")
    return out / f"{inp.case_id}{'.png' if inp.two_d else '.nii.gz'}"


def _on_grid(array: np.ndarray, inp: SegInput) -> Volume:
    return inp.grid.with_array(array[:, :, None, ...] if inp.two_d else array)


def write_labels(labels: np.ndarray, inp: SegInput, path: str | Path) -> Path:
    """The label map on the input's exact grid (PNG for 2D images; uint8 or uint16 NIfTI)."""
    labels = np.asarray(labels)
    if labels.shape != inp.shape:
        raise MedsegError(f"internal: labels of shape {labels.shape} for an image of shape {inp.shape}")
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(_on_grid(labels.astype(dtype), inp), path, dtype=None if path.suffix.lower() == ".png" else dtype)


def probabilities_path(labels_path: Path) -> Path:
    name = labels_path.name
    for s in LABEL_SUFFIXES:
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    return labels_path.with_name(f"{name}_prob.nii.gz")


def write_probabilities(probs: np.ndarray, inp: SegInput, path: str | Path) -> Path:
    """``(K, *spatial)`` probabilities as float32 NIfTI, channels last, on the input's grid."""
    return write_volume(_on_grid(np.ascontiguousarray(np.moveaxis(np.asarray(probs, np.float32), 0, -1)), inp), path, dtype=np.float32)


def read_probabilities(path: str | Path, inp: SegInput) -> np.ndarray:
    """``(K, *spatial)`` from a ``*_prob.nii.gz`` of ``medseg predict --probabilities`` (channels last) on the grid."""
    vol = read_volume(path)
    array = np.asarray(vol.array, np.float32)
    spatial = tuple(inp.grid.shape)
    if array.shape[:3] != spatial:
        raise MedsegError(f"{path}: probabilities of shape {array.shape} are not on the image's grid {spatial}; "
                          "give the <id>_prob.nii.gz that medseg predict --probabilities wrote for this image")
    array = array[..., None] if array.ndim == 3 else array
    if inp.two_d:
        array = array[:, :, 0, :]
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))
