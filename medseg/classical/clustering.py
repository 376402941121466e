"""Clustering voxels in a feature space: k-means, EM for a Gaussian mixture, mean shift.

* k-means — Lloyd's algorithm with k-means++ seeding (Arthur & Vassilvitskii 2007), scikit-learn ``KMeans``;
* Gaussian mixture — EM with full covariances (Dempster, Laird & Rubin 1977), scikit-learn ``GaussianMixture``;
  its soft posteriors P(cluster | voxel) are the probability map;
* mean shift — modes of the kernel density (Comaniciu & Meer 2002), scikit-learn ``MeanShift``; the bandwidth
  (in standardised feature units) is its one parameter and decides the number of clusters.

Features come from :func:`medseg.classical.features.cluster_features` (intensity, intensity + position, channels).
Large images are fitted on a random subsample (``max_samples`` voxels, fixed seed) and every voxel is then
assigned; clusters are numbered 1..K from the darkest to the brightest mean intensity (0 = outside ``mask``), so
``k=3`` on a skull-stripped T1 gives 1 CSF, 2 grey matter, 3 white matter.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> image = rng.normal(0, 0.1, (32, 32, 1)).astype(np.float32); image[8:24, 8:24] += 1
    >>> labels, probs = gmm(image, k=2, return_probabilities=True)
    >>> int(labels[16, 16]), probs.shape
    (2, (3, 32, 32))
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.classical import require
from medseg.classical.features import check_image, cluster_features
from medseg.errors import MedsegError

MAX_SAMPLES = 200_000


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def _prepare(image, mask, features, spacing, position_weight, k, method):
    image = check_image(image, method)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != image.shape[:-1]:
            raise MedsegError(f"{method}: mask of shape {mask.shape} is not on the image grid {image.shape[:-1]}; give a mask of the image's shape")
        if not mask.any():
            raise MedsegError(f"{method}: the mask is empty; give a mask with voxels to cluster (or --mask none)")
    x = cluster_features(image, features, mask, spacing, position_weight)
    if k is not None and (int(k) < 1 or int(k) > len(x)):
        raise MedsegError(f"{method}: k={k} clusters for {len(x)} voxels; give 1 <= k <= the number of voxels (e.g. 3)")
    return image, mask, x


def _ordered(assign: np.ndarray, intensity: np.ndarray, n: int) -> np.ndarray:
    """Map cluster ids to 1..n ordered by mean intensity (column 0 of the features)."""
    sums = np.bincount(assign, weights=intensity, minlength=n)
    counts = np.bincount(assign, minlength=n)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    rank = np.empty(n, np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(1, n + 1)
    return rank


def _to_grid(values: np.ndarray, shape, mask, dtype=np.int32) -> np.ndarray:
    out = np.zeros(shape + values.shape[1:], dtype)
    if mask is None:
        out[...] = values.reshape(shape + values.shape[1:])
    else:
        out[mask] = values
    return out


def kmeans(image: np.ndarray, k: int = 3, features: str = "intensity", mask: np.ndarray | None = None,
           spacing: Sequence[float] | None = None, position_weight: float = 1.0, seed: int = 0,
           max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """k-means labels ``(*spatial)``: 1..k from dark to bright, 0 outside ``mask``."""
    cluster = require("sklearn.cluster", "kmeans")
    image, mask, x = _prepare(image, mask, features, spacing, position_weight, k, "kmeans")
    model = cluster.KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit(_subsample(x, max_samples, seed))
    assign = model.predict(x)
    return _to_grid(_ordered(assign, x[:, 0], int(k))[assign], image.shape[:-1], mask)


def gmm(image: np.ndarray, k: int = 3, features: str = "intensity", mask: np.ndarray | None = None,
        spacing: Sequence[float] | None = None, position_weight: float = 1.0, seed: int = 0,
        max_samples: int = MAX_SAMPLES, return_probabilities: bool = False):
    """Gaussian-mixture labels (most probable component, numbered dark to bright; 0 outside ``mask``) and, with
    ``return_probabilities``, the posteriors ``(k + 1, *spatial)`` float32: channel c is P(label c), channel 0 is 1
    outside ``mask`` and 0 inside (the layout of ``medseg predict --probabilities``)."""
    mixture = require("sklearn.mixture", "gmm")
    image, mask, x = _prepare(image, mask, features, spacing, position_weight, k, "gmm")
    model = mixture.GaussianMixture(n_components=int(k), covariance_type="full", n_init=1, reg_covar=1e-4,
                                    random_state=seed).fit(_subsample(x, max_samples, seed))
    post = model.predict_proba(x).astype(np.float32)
    assign = post.argmax(axis=1)
    rank = _ordered(assign, x[:, 0], int(k))
    labels = _to_grid(rank[assign], image.shape[:-1], mask)
    if not return_probabilities:
        return labels
    order = np.argsort(rank)  # column of the component numbered 1, 2, ...
    probs = _to_grid(post[:, order], image.shape[:-1], mask, np.float32)
    outside = np.ones(image.shape[:-1], np.float32) if mask is None else (~mask).astype(np.float32)
    if mask is None:
        outside[...] = 0.0
    return labels, np.ascontiguousarray(np.concatenate([outside[None], np.moveaxis(probs, -1, 0)]))


def meanshift(image: np.ndarray, bandwidth: float | None = None, features: str = "intensity", mask: np.ndarray | None = None,
              spacing: Sequence[float] | None = None, position_weight: float = 1.0, seed: int = 0,
              max_samples: int = 20_000) -> np.ndarray:
    """Mean-shift labels (modes numbered dark to bright, 0 outside ``mask``). ``bandwidth`` in standardised feature
    units (None: scikit-learn's estimate on the subsample). Modes are found on ``max_samples`` voxels, then every
    voxel joins its nearest mode."""
    cluster = require("sklearn.cluster", "meanshift")
    image, mask, x = _prepare(image, mask, features, spacing, position_weight, None, "meanshift")
    if bandwidth is not None and not float(bandwidth) > 0:
        raise MedsegError(f"meanshift: bandwidth {bandwidth} must be positive (in standardised feature units, e.g. 0.5)")
    sample = _subsample(x, max_samples, seed)
    if bandwidth is None:
        bandwidth = float(cluster.estimate_bandwidth(sample, quantile=0.2, n_samples=min(len(sample), 2000), random_state=seed)) or 0.5
    model = cluster.MeanShift(bandwidth=float(bandwidth), bin_seeding=True, cluster_all=True).fit(sample)
    centres = model.cluster_centers_
    assign = _nearest(x, centres)
    return _to_grid(_ordered(assign, x[:, 0], len(centres))[assign], image.shape[:-1], mask)


def _nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(len(x), np.int64)
    c2 = (centres ** 2).sum(axis=1)
    for s in range(0, len(x), chunk):
        block = x[s:s + chunk]
        out[s:s + chunk] = np.argmin(c2[None, :] - 2.0 * block @ centres.T, axis=1)
    return out
