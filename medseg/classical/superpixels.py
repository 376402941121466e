"""Superpixels and oversegmentation: SLIC, Felzenszwalb–Huttenlocher, marker-based watershed.

* :func:`slic` — simple linear iterative clustering (Achanta et al. 2012, IEEE PAMI): k-means in
  (colour, position) restricted to a window around each centre; supervoxels in 3D with the voxel spacing.
  scikit-image ``segmentation.slic`` (CIELAB for RGB images).
* :func:`felzenszwalb` — graph-based merging by the internal difference of components (Felzenszwalb & Huttenlocher
  2004, IJCV), scikit-image (2D only).
* :func:`watershed` — flooding of the gradient magnitude from markers (Beucher & Meyer 1993; Meyer 1994):
  the seed labels, or, without seeds, the regional minima deeper than ``h`` (h-minima); scikit-image.

Regions are numbered from 1 (0 outside a mask). To turn regions into an object, see
:func:`medseg.classical.regions.select_regions` (``--select seeds``: the superpixels under object clicks).

Example:
    >>> import numpy as np
    >>> image = np.zeros((40, 40, 1), np.float32); image[:, 20:] = 1
    >>> labels = slic(image, n_segments=4)
    >>> len(np.unique(labels)) >= 2
    True
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.classical import require
from medseg.classical.features import check_image
from medseg.classical.graph import unit_range
from medseg.errors import MedsegError


def slic(image: np.ndarray, n_segments: int = 400, compactness: float | None = None, spacing: Sequence[float] | None = None,
         mask: np.ndarray | None = None, sigma: float = 0.0) -> np.ndarray:
    """SLIC superpixels (2D) or supervoxels (3D), numbered 1..N. ``compactness`` trades colour for position (None:
    10 for RGB in CIELAB, 0.1 for intensities scaled to [0, 1])."""
    segmentation = require("skimage.segmentation", "slic")
    image = check_image(image, "slic")
    if int(n_segments) < 1:
        raise MedsegError(f"slic: n_segments {n_segments} must be at least 1 (e.g. 400)")
    rgb = image.shape[-1] == 3 and image.ndim == 3
    feats = unit_range(image)
    if rgb:  # CIELAB computed here: scikit-image's own convert2lab path gave a single segment on some inputs
        feats = require("skimage.color", "slic").rgb2lab(feats)
    if compactness is None:
        compactness = 10.0 if rgb else 0.1
    labels = segmentation.slic(feats, n_segments=int(n_segments), compactness=float(compactness), channel_axis=-1,
                               convert2lab=False, spacing=None if spacing is None else np.asarray(spacing, float),
                               mask=mask, start_label=1, sigma=sigma)
    return labels.astype(np.int32)


def felzenszwalb(image: np.ndarray, scale: float = 100.0, sigma: float = 0.8, min_size: int = 50) -> np.ndarray:
    """Felzenszwalb–Huttenlocher regions of a 2D image, numbered 1..N. ``scale``: larger gives larger regions
    (intensities scaled to 0..255)."""
    segmentation = require("skimage.segmentation", "felzenszwalb")
    image = check_image(image, "felzenszwalb", dims=(2,))
    labels = segmentation.felzenszwalb(unit_range(image) * 255.0, scale=float(scale), sigma=float(sigma),
                                       min_size=int(min_size), channel_axis=-1)
    return labels.astype(np.int32) + 1


def gradient_magnitude(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Sobel gradient magnitude of the Gaussian-smoothed grey image (channels averaged, then scaled to [0, 1])."""
    filters = require("skimage.filters", "watershed")
    from scipy import ndimage

    grey = unit_range(image.mean(axis=-1, keepdims=True))[..., 0]
    if sigma > 0:
        grey = ndimage.gaussian_filter(grey, float(sigma))
    return filters.sobel(grey).astype(np.float32)


def watershed(image: np.ndarray, seeds: np.ndarray | None = None, h: float = 0.02, sigma: float = 1.0,
              compactness: float = 0.0, mask: np.ndarray | None = None, background: int = 2) -> np.ndarray:
    """Marker-based watershed of the gradient magnitude. Markers: ``seeds`` (labels > 0 on the grid; with only
    labels 1 and ``background`` the result is a 0/1 object mask), else the h-minima of the gradient (regions 1..N)."""
    segmentation = require("skimage.segmentation", "watershed")
    morphology = require("skimage.morphology", "watershed")
    image = check_image(image, "watershed")
    grad = gradient_magnitude(image, sigma)
    if seeds is not None:
        from medseg.classical.graph import check_seeds

        markers = check_seeds(seeds, image.shape[:-1], "watershed", need=())
    else:
        from scipy import ndimage

        markers, _ = ndimage.label(morphology.h_minima(grad, float(h) * float(grad.max() or 1.0)))
    labels = segmentation.watershed(grad, markers, mask=mask, compactness=float(compactness)).astype(np.int32)
    if seeds is not None and set(np.unique(markers[markers > 0]).tolist()) == {1, int(background)}:
        labels[labels == int(background)] = 0
    return labels
