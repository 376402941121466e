"""Patch sampling for training: choosing centres is separate from cropping.

Samplers draw patch centres from an injected ``numpy.random.Generator``:

- ``uniform``: anywhere in the volume;
- ``foreground``: with probability ``foreground_fraction`` (nnU-Net: 0.33) centred on a labelled voxel,
  otherwise uniform;
- ``class_balanced``: with probability ``foreground_fraction`` centred on a voxel of a class drawn uniformly
  among the classes present in the case, otherwise uniform.

A case whose label is empty falls back to uniform centres: it never crashes a sampler. 2D models take
slices: a 2D patch is a 3D patch of depth 1 along the last (axial, after RAS reorientation) axis.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, label = np.zeros((2, 10, 12, 8), np.float32), np.zeros((10, 12, 8), np.uint8)
    >>> centre = choose_centre("foreground", label.shape, {}, rng)  # empty label: uniform
    >>> img, lab = crop_patch(image, label, centre, (4, 4, 4))
    >>> img.shape, lab.shape
    ((2, 4, 4, 4), (4, 4, 4))
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SAMPLERS = ("uniform", "foreground", "class_balanced")


def choose_centre(sampler: str, shape: Sequence[int], class_coords: Mapping[int, np.ndarray], rng: np.random.Generator,
                  foreground_fraction: float = 0.33) -> tuple[int, ...]:
    """A patch centre (voxel index) for a volume of ``shape``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    present = [v for v, c in class_coords.items() if len(c)]
    if sampler != "uniform" and present and rng.random() < foreground_fraction:
        if sampler == "class_balanced":
            coords = class_coords[present[rng.integers(len(present))]]
            return tuple(int(x) for x in coords[rng.integers(len(coords))])
        # one voxel of all foreground classes, drawn without joining their coordinates (memory-mapped on disk)
        index = int(rng.integers(sum(len(class_coords[v]) for v in present)))
        for v in present:
            if index < len(class_coords[v]):
                return tuple(int(x) for x in class_coords[v][index])
            index -= len(class_coords[v])
    return tuple(int(rng.integers(s)) for s in shape)


def patch_start(centre: Sequence[int], shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """First voxel of the patch around ``centre``: kept inside the volume; on an axis shorter than the patch,
    negative so that the volume sits in the middle of the patch."""
    return tuple(int(min(max(c - p // 2, 0), s - p)) if s >= p else -((p - s) // 2)
                 for c, s, p in zip(centre, shape, patch_size))


def crop_at(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A copy of ``array[..., start:start + size]`` over its last ``len(size)`` axes; voxels outside are 0."""
    lead = array.ndim - len(size)
    shape = array.shape[lead:]
    out = np.zeros((*array.shape[:lead], *size), array.dtype)
    src = tuple(slice(max(a, 0), min(a + n, s)) for a, n, s in zip(start, size, shape))
    dst = tuple(slice(b.start - a, b.stop - a) for a, b in zip(start, src))
    if all(b.stop > b.start for b in src):
        out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def crop_patch(image: np.ndarray, label: np.ndarray | None, centre: Sequence[int], patch_size: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``patch_size`` around ``centre`` (kept inside the volume), zero-padding axes smaller than the patch.

    ``image``: (C, *spatial); ``label``: (*spatial) or None. Returns copies.
    """
    start = patch_start(centre, image.shape[1:], patch_size)
    return crop_at(image, start, patch_size), None if label is None else crop_at(label, start, patch_size)
