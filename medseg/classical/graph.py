"""Graph-based segmentation: seeded graph cut, GrabCut, random walker, normalized cuts.

* :func:`graph_cut` — binary min-cut / max-flow with seeds (Boykov & Jolly 2001, ICCV): n-links between face
  neighbours ``exp(-||I_p - I_q||^2 / 2 sigma^2) / dist(p, q)``, t-links ``lambda * R_p`` from the negative log
  histograms of the object and background seeds (the regional term), seeds hard. Max-flow: the Boykov–Kolmogorov
  algorithm of PyMaxflow (``maxflow``); the energy is built here.
* :func:`grabcut` — GrabCut (Rother, Kolmogorov & Blake 2004, SIGGRAPH) from a box: outside the box is background;
  Gaussian mixtures (scikit-learn) of object and background colour are re-estimated from the current cut and the
  cut recomputed, ``iterations`` times; contrast-sensitive n-links ``gamma * exp(-beta ||dz||^2)``, beta =
  1 / (2 <||dz||^2>). Written here (OpenCV's version is 2D only and OpenCV is not a dependency); 2D and 3D.
* :func:`random_walker` — the probability that a random walker from each voxel first reaches each seed label
  (Grady 2006, IEEE PAMI), scikit-image ``random_walker`` (conjugate gradient with a Jacobi preconditioner).
* :func:`normalized_cut` — normalized cuts (Shi & Malik 2000, IEEE PAMI) of the region adjacency graph of SLIC
  superpixels (weights ``exp(-||mean_i - mean_j||^2 / sigma)``), scikit-image ``graph.cut_normalized``.

Seeds are an integer array on the image grid: 0 unlabelled, 1 object, 2 background (the random walker takes any
number of labels). On 3D volumes with a ``mask`` (a skull-stripped scan's non-zero voxels) the graph is built on
the mask's bounding box only; everything outside is background.

Example:
    >>> import numpy as np
    >>> image = np.zeros((30, 30, 1), np.float32); image[10:20, 10:20] = 1
    >>> seeds = np.zeros((30, 30), np.int32); seeds[15, 15] = 1; seeds[0, 0] = 2
    >>> cut = graph_cut(image, seeds)
    >>> int(cut.sum())
    100
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.classical import require
from medseg.classical.features import check_image
from medseg.errors import MedsegError

HARD = 1e9  # capacity of a t-link that fixes a seed


# ----------------------------------------------------------------------------- shared pieces
def check_seeds(seeds: np.ndarray, shape: tuple[int, ...], method: str, need: Sequence[int] = (1, 2)) -> np.ndarray:
    """Seeds as int32 on the grid ``shape``, holding every label of ``need``; a one-line error otherwise."""
    if seeds is None:
        raise MedsegError(f"{method}: needs seeds: --seeds LABELS_IMAGE_OR_JSON (1 = object, 2 = background)")
    seeds = np.asarray(seeds)
    if seeds.shape != tuple(shape):
        raise MedsegError(f"{method}: seed image of shape {seeds.shape} is not on the image grid {tuple(shape)}; "
                          "draw the seeds on the image itself (same width, height and depth)")
    seeds = seeds.astype(np.int32, copy=False)
    if not (seeds > 0).any():
        raise MedsegError(f"{method}: the seed set is empty (no voxel > 0); mark object voxels with 1 and background with 2")
    missing = [v for v in need if not (seeds == v).any()]
    if missing:
        names = {1: "object (1)", 2: "background (2)"}
        raise MedsegError(f"{method}: no {' and no '.join(names.get(v, str(v)) for v in missing)} seeds; "
                          f"mark at least one voxel of each: 1 = object, 2 = background")
    return seeds


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask``'s true voxels, grown by ``margin`` and clipped to the grid."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n)) for i, n in zip(idx, mask.shape))


def unit_range(image: np.ndarray, lo_q: float = 0.5, hi_q: float = 99.5) -> np.ndarray:
    """Every channel mapped to [0, 1] by its robust range (percentiles), float32."""
    flat = image.reshape(-1, image.shape[-1])
    lo, hi = np.percentile(flat, [lo_q, hi_q], axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((image - lo) / scale, 0.0, 1.0).astype(np.float32)


def neighbour_differences(image: np.ndarray) -> list[np.ndarray]:
    """Per spatial axis a: ``||I(p) - I(p + e_a)||^2`` on the grid (0 at the far border, where no edge exists)."""
    out = []
    for a in range(image.ndim - 1):
        d = np.zeros(image.shape[:-1], np.float32)
        diff = np.diff(image, axis=a)
        index = [slice(None)] * (image.ndim - 1)
        index[a] = slice(0, image.shape[a] - 1)
        d[tuple(index)] = (diff ** 2).sum(axis=-1)
        out.append(d)
    return out


def _axis_structure(ndim: int, axis: int) -> np.ndarray:
    s = np.zeros((3,) * ndim, np.float64)
    index = [1] * ndim
    index[axis] = 2
    s[tuple(index)] = 1.0
    return s


def min_cut(n_links: list[np.ndarray], source: np.ndarray, sink: np.ndarray, method: str) -> np.ndarray:
    """Min-cut of a grid graph: ``n_links[a]`` the weight between p and p + e_a, ``source`` / ``sink`` the t-link
    capacities. Returns the source (object) side as a boolean array."""
    maxflow = require("maxflow", method)
    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(source.shape)
    for a, w in enumerate(n_links):
        graph.add_grid_edges(nodes, weights=w.astype(np.float64), structure=_axis_structure(source.ndim, a), symmetric=True)
    graph.add_grid_tedges(nodes, source.astype(np.float64), sink.astype(np.float64))
    graph.maxflow()
    return ~graph.get_grid_segments(nodes)


def _histogram_cost(features: np.ndarray, sample: np.ndarray, bins: int) -> np.ndarray:
    """-log P(feature | seeds) from a smoothed joint histogram of ``sample`` (features in [0, 1])."""
    c = features.shape[-1]
    edges = [np.linspace(0, 1, bins + 1)] * c
    hist, _ = np.histogramdd(sample, bins=edges)
    hist = ndimage.gaussian_filter(hist, 1.0) + 1e-3 * hist.sum() / hist.size + 1e-12
    hist /= hist.sum()
    idx = np.minimum((features * bins).astype(np.int64), bins - 1)
    return -np.log(hist[tuple(idx[..., i] for i in range(c))]).astype(np.float32)


# ----------------------------------------------------------------------------- graph cut
def graph_cut(image: np.ndarray, seeds: np.ndarray, spacing: Sequence[float] | None = None, sigma: float | None = None,
              lam: float = 0.2, bins: int | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Seeded binary graph cut; returns a 0/1 uint8 label map (1 = object).

    Args:
        image: ``(*spatial, C)``; channels enter the affinities and a joint histogram.
        seeds: 1 object, 2 background, 0 unknown (on the grid).
        sigma: affinity scale in units of the [0, 1]-normalised intensity (None: the RMS neighbour difference).
        lam: weight of the regional (histogram) term against the boundary term (0: boundary only).
        bins: histogram bins per channel (None: 32 for one channel, fewer for more so the histogram stays small).
        mask: 3D only: the graph is built on the bounding box of the mask (outside: background).
    """
    image = check_image(image, "graphcut")
    seeds = check_seeds(seeds, image.shape[:-1], "graphcut")
    out = np.zeros(image.shape[:-1], np.uint8)
    box = bounding_box((mask if mask is not None else np.ones(out.shape, bool)) | (seeds == 1), margin=2)
    img, sd = image[box], seeds[box]
    feats = unit_range(img)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * (img.ndim - 1)
    diffs = neighbour_differences(feats)
    if sigma is None:
        valid = np.concatenate([d.ravel() for d in diffs])
        sigma = float(np.sqrt(valid.mean())) or 1.0
    if not sigma > 0:
        raise MedsegError(f"graphcut: sigma {sigma} must be positive (in [0, 1]-normalised intensity units, e.g. 0.1)")
    links = [np.exp(-d / (2.0 * sigma ** 2)) / float(spacing[a]) for a, d in enumerate(diffs)]
    c = feats.shape[-1]
    bins = int(bins or (max(4, int(round(4096 ** (1.0 / c)))) if c > 1 else 32))
    cost_obj = _histogram_cost(feats, feats[sd == 1], bins)
    cost_bkg = _histogram_cost(feats, feats[sd == 2], bins)
    source = float(lam) * cost_bkg  # cutting p from the source (object) costs R_p(background)
    sink = float(lam) * cost_obj
    source[sd == 1], sink[sd == 1] = HARD, 0.0
    source[sd == 2], sink[sd == 2] = 0.0, HARD
    out[box] = min_cut(links, source, sink, "graphcut")
    return out


# ----------------------------------------------------------------------------- GrabCut
def check_box(box: Sequence[int], shape: tuple[int, ...], method: str) -> tuple[slice, ...]:
    """``[x0, y0, (z0,) x1, y1, (z1)]`` (half-open, voxel indices) as slices; one-line errors for bad boxes."""
    n = len(shape)
    box = [int(v) for v in box]
    if len(box) != 2 * n:
        raise MedsegError(f"{method}: a box on a {n}D image has {2 * n} numbers "
                          f"({'x0 y0 x1 y1' if n == 2 else 'x0 y0 z0 x1 y1 z1'}); got {len(box)}")
    lo, hi = box[:n], box[n:]
    if any(h <= l for l, h in zip(lo, hi)):
        raise MedsegError(f"{method}: box {box} has zero area (each upper corner must exceed the lower one: x1 > x0, y1 > y0); "
                          "draw a box around the object")
    if any(l < 0 or h > s for l, h, s in zip(lo, hi, shape)) or any(l >= s for l, s in zip(lo, shape)):
        raise MedsegError(f"{method}: box {box} lies outside the image of size {'x'.join(map(str, shape))}; "
                          f"keep 0 <= x0 < x1 <= {shape[0]}, 0 <= y0 < y1 <= {shape[1]}")
    return tuple(slice(l, h) for l, h in zip(lo, hi))


def grabcut(image: np.ndarray, box: Sequence[int], spacing: Sequence[float] | None = None, iterations: int = 5,
            components: int = 5, gamma: float = 50.0, seeds: np.ndarray | None = None, seed: int = 0,
            max_samples: int = 50_000) -> np.ndarray:
    """GrabCut from a box ``[x0, y0, (z0,) x1, y1, (z1)]`` (half-open); returns a 0/1 uint8 label map.

    ``seeds`` (optional, on the grid) fix voxels: 1 object, 2 background (a user's corrections)."""
    mixture = require("sklearn.mixture", "grabcut")
    image = check_image(image, "grabcut")
    shape = image.shape[:-1]
    inside = check_box(box, shape, "grabcut")
    crop = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(inside, shape))  # the box + a ring
    feats = unit_range(image)
    unknown = np.zeros(shape, bool)
    unknown[inside] = True
    fixed_fg = np.zeros(shape, bool)
    if seeds is not None:
        sd = np.asarray(seeds)
        if sd.shape != shape:
            raise MedsegError(f"grabcut: seed image of shape {sd.shape} is not on the image grid {shape}")
        fixed_fg = (sd == 1) & unknown
        unknown &= sd != 2
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    local = feats[crop]
    diffs = neighbour_differences(local)
    mean = float(np.mean(np.concatenate([d.ravel() for d in diffs]))) or 1e-6
    links = [float(gamma) * np.exp(-d / (2.0 * mean)) / float(spacing[a]) for a, d in enumerate(diffs)]
    alpha = unknown.copy()  # current object: the whole box at first
    rng = np.random.default_rng(seed)
    flat = local.reshape(-1, local.shape[-1])
    for _ in range(max(1, int(iterations))):
        fg, bg = feats[alpha], feats[~alpha]  # colour models from the whole image
        if len(fg) < components or len(bg) < components:
            break
        costs = []
        for sample in (fg, bg):
            if len(sample) > max_samples:
                sample = sample[rng.choice(len(sample), max_samples, replace=False)]
            with warnings.catch_warnings():  # flat images: fewer distinct colours than components is fine
                warnings.simplefilter("ignore")
                model = mixture.GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(sample)
            costs.append(-model.score_samples(flat).reshape(local.shape[:-1]).astype(np.float32))
        cost_fg, cost_bg = costs
        lo = min(float(cost_fg.min()), float(cost_bg.min()))  # -log densities may be negative: only differences matter
        free = unknown[crop]
        source = np.where(free, cost_bg - lo, 0.0)
        sink = np.where(free, cost_fg - lo, HARD)
        source[fixed_fg[crop]], sink[fixed_fg[crop]] = HARD, 0.0
        new = np.zeros(shape, bool)
        new[crop] = min_cut(links, source, sink, "grabcut") & (free | fixed_fg[crop])
        if np.array_equal(new, alpha):
            break
        alpha = new
    return alpha.astype(np.uint8)


# ----------------------------------------------------------------------------- random walker
def random_walker(image: np.ndarray, seeds: np.ndarray, spacing: Sequence[float] | None = None, beta: float = 130.0,
                  mask: np.ndarray | None = None, background: int = 2, return_probabilities: bool = False, tol: float = 1e-3):
    """Random-walker labels: each voxel takes the seed label its walker most probably reaches first. With only
    labels 1 and 2 the background label (``background``) becomes 0. With ``return_probabilities``, also the
    probabilities ``(K + 1, *spatial)``: channel v is P(label v) (channel 0 the background), as in
    ``medseg predict --probabilities``."""
    segmentation = require("skimage.segmentation", "random-walker")
    image = check_image(image, "random-walker")
    seeds = check_seeds(seeds, image.shape[:-1], "random-walker", need=())
    values = np.unique(seeds[seeds > 0])
    if len(values) < 2:
        raise MedsegError(f"random-walker: the seeds hold one label ({int(values[0])}); mark at least two (1 = object, 2 = background)")
    box = bounding_box(mask | (seeds > 0), margin=2) if mask is not None else tuple(slice(None) for _ in seeds.shape)
    feats = unit_range(image[box])
    spacing = tuple(spacing) if spacing is not None else None
    with warnings.catch_warnings():  # "probability range outside [0, 1]" by the solver's tolerance: clipped below
        warnings.filterwarnings("ignore", message="The probability range")
        probs = segmentation.random_walker(feats, seeds[box], beta=float(beta), mode="cg_j", tol=tol, channel_axis=-1,
                                           spacing=spacing, return_full_prob=True)
    probs = np.clip(probs, 0.0, 1.0)
    probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)  # the solver's tolerance leaves sums of 0.9..1.1
    binary = set(values.tolist()) == {1, int(background)}
    out_values = np.where(values == int(background), 0, values) if binary else values
    labels = np.zeros(seeds.shape, np.int32)
    labels[box] = out_values[np.argmax(probs, axis=0)]
    if not return_probabilities:
        return labels
    full = np.zeros((int(out_values.max()) + 1,) + seeds.shape, np.float32)  # channel v: P(label v)
    full[0] = 1.0  # outside the box: background
    full[(slice(None),) + box] = 0.0
    for k, v in enumerate(out_values):
        full[(int(v),) + box] = probs[k]
    return labels, full


# ----------------------------------------------------------------------------- normalized cuts
def adjacent_pairs(labels: np.ndarray) -> list[tuple[int, int]]:
    """The pairs (u < v) of non-zero region ids that touch across a face."""
    found = []
    for a in range(labels.ndim):
        x = np.moveaxis(labels, a, 0)
        u, v = x[:-1].ravel(), x[1:].ravel()
        keep = (u != v) & (u > 0) & (v > 0)
        found.append(np.stack([np.minimum(u[keep], v[keep]), np.maximum(u[keep], v[keep])], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), int)
    return [(int(u), int(v)) for u, v in pairs]


def normalized_cut(image: np.ndarray, n_segments: int = 400, compactness: float | None = None, sigma: float = 0.01,
                   threshold: float = 0.001, num_cuts: int = 10, spacing: Sequence[float] | None = None,
                   mask: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Normalized cuts of the region adjacency graph of SLIC superpixels; regions numbered 1..N (0 outside ``mask``).

    ``sigma`` scales the edge weights ``exp(-||mean colour difference||^2 / sigma)`` (colours in [0, 1]);
    ``threshold`` stops the recursive 2-way cuts when the normalized cut value exceeds it."""
    graph = require("skimage.graph", "ncut")
    from medseg.classical.superpixels import slic

    image = check_image(image, "ncut")
    superpixels = slic(image, n_segments=n_segments, compactness=compactness, spacing=spacing, mask=mask)
    feats = unit_range(image)
    ids = np.unique(superpixels[superpixels > 0])
    means = np.stack([ndimage.mean(feats[..., c], superpixels, ids) for c in range(feats.shape[-1])], axis=1)
    row = {int(i): k for k, i in enumerate(ids)}
    rag = graph.RAG()  # built here: any number of channels (rag_mean_color takes RGB only), fast in 3D
    for n in ids:
        rag.add_node(int(n), labels=[int(n)])
    for u, v in adjacent_pairs(superpixels):
        w = float(np.exp(-((means[row[u]] - means[row[v]]) ** 2).sum() / float(sigma)))
        rag.add_edge(u, v, weight=w)
    regions = graph.cut_normalized(superpixels, rag, thresh=float(threshold), num_cuts=int(num_cuts),
                                   rng=np.random.default_rng(seed))
    out = np.zeros(superpixels.shape, np.int32)
    inside = superpixels > 0
    _, inverse = np.unique(regions[inside], return_inverse=True)
    out[inside] = inverse.ravel() + 1
    return out
