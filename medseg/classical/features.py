"""Feature spaces for clustering, and the checks shared by the classical methods.

A feature space turns every voxel of an image ``(*spatial, C)`` into a row of numbers:

* ``intensity`` — the mean of the channels (the grey value; the intensity of a one-channel scan);
* ``position`` — intensity plus the voxel's position in mm (weighted by ``position_weight``), which makes clusters
  spatially compact (the feature space of SLIC and of mean-shift segmentation, Comaniciu & Meer 2002);
* ``channels`` — every channel (RGB of a photo, the MRI contrasts of a case);
* ``channels+position`` — both.

Each column is standardised (zero mean, unit variance over the voxels clustered); the position columns share one
scale so distances stay isotropic in mm.

Example:
    >>> import numpy as np
    >>> x = cluster_features(np.arange(8, dtype=np.float32).reshape(2, 4, 1), "position")
    >>> x.shape
    (8, 3)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.errors import MedsegError, check_choice

FEATURES = ("intensity", "position", "channels", "channels+position")


def check_image(image: np.ndarray, method: str, dims: Sequence[int] = (2, 3)) -> np.ndarray:
    """``image`` as float32 ``(*spatial, C)`` with 2 or 3 spatial axes allowed by ``dims``; one-line error otherwise."""
    image = np.asarray(image)
    if image.ndim not in tuple(d + 1 for d in dims):
        allowed = " or ".join(f"{d}D ({'W, H' if d == 2 else 'X, Y, Z'}, C)" for d in dims)
        raise MedsegError(f"{method}: image of shape {image.shape} is not {allowed} with channels last; "
                          f"{'this method works on 2D images only: give a 2D image or one slice' if dims == (2,) else 'add a channel axis'}")
    if image.size == 0:
        raise MedsegError(f"{method}: the image is empty (shape {image.shape}); give an image with voxels")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise MedsegError(f"{method}: the image holds NaN or infinite values; replace them (e.g. medseg validate --nan-policy zero)")
    return image


def auto_mask(image: np.ndarray) -> np.ndarray | None:
    """The non-zero voxels of a 3D image whose background is exactly 0 (skull-stripped MRI, a template); else None."""
    if image.ndim != 4:
        return None
    mask = np.any(image != 0, axis=-1)
    return mask if 0.05 <= 1.0 - mask.mean() < 0.99 else None


def standardise(x: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance (a constant column stays 0)."""
    x = x - x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True)
    return x / np.where(std > 0, std, 1.0)


def cluster_features(image: np.ndarray, features: str = "intensity", mask: np.ndarray | None = None,
                     spacing: Sequence[float] | None = None, position_weight: float = 1.0) -> np.ndarray:
    """``(n, f)`` float32 features of the voxels in ``mask`` (all voxels when None), in C order of the grid."""
    check_choice(features, FEATURES, "features")
    spatial = image.shape[:-1]
    sel = (slice(None),) if mask is None else mask
    if "channels" in features:
        cols = standardise(image[sel].reshape(-1, image.shape[-1]).astype(np.float64))
    else:
        cols = standardise(image[sel].reshape(-1, image.shape[-1]).mean(axis=1, keepdims=True).astype(np.float64))
    if "position" in features:
        spacing = tuple(spacing) if spacing is not None else (1.0,) * len(spatial)
        grid = np.indices(spatial, dtype=np.float32)
        pos = np.stack([grid[a][sel].ravel() * float(spacing[a]) for a in range(len(spatial))], axis=1).astype(np.float64)
        pos -= pos.mean(axis=0, keepdims=True)
        scale = float(np.sqrt((pos ** 2).sum(axis=1).mean() / max(pos.shape[1], 1))) or 1.0
        cols = np.concatenate([cols, pos / scale * float(position_weight)], axis=1)
    return np.ascontiguousarray(cols, dtype=np.float32)
