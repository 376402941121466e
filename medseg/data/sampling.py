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
        else:
            coords = np.concatenate([class_coords[v] for v in present]) if len(present) > 1 else class_coords[present[0]]
        return tuple(int(x) for x in coords[rng.integers(len(coords))])
    return tuple(int(rng.integers(s)) for s in shape)


def crop_patch(image: np.ndarray, label: np.ndarray | None, centre: Sequence[int], patch_size: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``patch_size`` around ``centre`` (kept inside the volume), zero-padding axes smaller than the patch.

    ``image``: (C, *spatial); ``label``: (*spatial) or None. Returns copies.
    """
    shape = image.shape[1:]
    starts, pads = [], []
    for c, s, p in zip(centre, shape, patch_size):
        if s >= p:
            starts.append(int(min(max(c - p // 2, 0), s - p)))
            pads.append((0, 0))
        else:
            starts.append(0)
            before = (p - s) // 2
            pads.append((before, p - s - before))
    sl = tuple(slice(a, a + min(p, s)) for a, p, s in zip(starts, patch_size, shape))
    img = image[(slice(None), *sl)]
    lab = None if label is None else label[sl]
    if any(p != (0, 0) for p in pads):
        img = np.pad(img, [(0, 0), *pads])
        lab = None if lab is None else np.pad(lab, pads)
    else:
        img = img.copy()
        lab = None if lab is None else lab.copy()
    return img, lab


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, flip: bool = True,
            intensity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Random flips along each spatial axis and per-channel intensity scale/shift (on z-scored data)."""
    if flip:
        for axis in range(1, image.ndim):
            if rng.random() < 0.5:
                image = np.flip(image, axis)
                label = None if label is None else np.flip(label, axis - 1)
    if intensity:
        c = image.shape[0]
        scale = rng.uniform(0.9, 1.1, c).astype(np.float32).reshape((c,) + (1,) * (image.ndim - 1))
        shift = rng.uniform(-0.1, 0.1, c).astype(np.float32).reshape((c,) + (1,) * (image.ndim - 1))
        image = image * scale + shift
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)
