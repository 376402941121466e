"""One entry point for every classical method: :func:`segment` (what ``medseg segment METHOD`` runs).

It resolves the mask (``auto``: the non-zero voxels of a skull-stripped 3D scan), passes the seeds, box or circle
each method needs, checks they exist, and turns region maps into an object when asked (``select``,
``largest_component``). Options a method does not use are ignored; ``None`` means the method's default.

Example:
    >>> from medseg.classical.io import load_input, read_seeds
    >>> inp = load_input(["../shared/data/skin_ph2/images/IMD002.bmp"])  # doctest: +SKIP
    >>> labels, _ = segment("grabcut", inp, read_seeds(None, inp, box=[150, 100, 600, 480]))  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.classical import METHODS
from medseg.classical.io import SegInput, Seeds
from medseg.errors import MedsegError, check_choice

PROBABILISTIC = ("gmm", "random-walker", "crf")
REGION_METHODS = ("kmeans", "gmm", "meanshift", "ncut", "slic", "felzenszwalb", "watershed")


def resolve_mask(mask: str | Path | np.ndarray | None, inp: SegInput) -> np.ndarray | None:
    """``"auto"`` (3D scans with an exactly-zero background: its non-zero voxels), ``"none"``, or a mask file."""
    from medseg.classical.features import auto_mask

    if mask is None or (isinstance(mask, str) and mask == "none"):
        return None
    if isinstance(mask, np.ndarray):
        array = mask
    elif isinstance(mask, str) and mask == "auto":
        return None if inp.two_d else auto_mask(inp.image)
    else:
        from medseg.data.io import read_mask

        vol = read_mask(mask)
        array = vol.array[:, :, 0] if inp.two_d and vol.array.ndim == 3 else vol.array
        if array.shape != inp.shape:
            raise MedsegError(f"{mask}: mask of size {'x'.join(map(str, array.shape))} is not on the image's grid ({inp.size_text()})")
    array = np.asarray(array) > 0
    if not array.any():
        raise MedsegError(f"--mask {mask if not isinstance(mask, np.ndarray) else ''}: the mask is empty; give a mask with voxels or --mask none")
    return array


def _init_mask(seeds: Seeds, inp: SegInput, method: str) -> np.ndarray | None:
    """An initial object for contour methods: the box, the circle (disc / ball), or the object seeds."""
    from medseg.classical.graph import check_box

    if seeds.box is not None:
        out = np.zeros(inp.shape, bool)
        out[check_box(seeds.box, inp.shape, method)] = True
        return out
    if seeds.circle is not None:
        n = len(inp.shape)
        if len(seeds.circle) != n + 1:
            raise MedsegError(f"{method}: a circle is {'CX CY R' if n == 2 else 'CX CY CZ R'} ({n + 1} numbers), got {seeds.circle}")
        *centre, r = (float(c) for c in seeds.circle)
        if not r > 0 or any(not 0 <= c < s for c, s in zip(centre, inp.shape)):
            raise MedsegError(f"{method}: circle {seeds.circle} must have its centre inside the image ({inp.size_text()}) and R > 0")
        grid = np.ogrid[tuple(slice(0, s) for s in inp.shape)]
        return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r ** 2
    if seeds.labels is not None:
        return seeds.labels == 1
    return None


def segment(method: str, inp: SegInput, seeds: Seeds | None = None, mask: str | Path | np.ndarray | None = "auto", *,
            select: str | None = None, largest_component: bool = False, probabilities: np.ndarray | None = None,
            **params) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``method`` on ``inp``; returns the label map on the input's grid and, for gmm, random-walker and crf,
    probabilities ``(K, *spatial)`` (else None)."""
    from medseg.classical import method_function

    check_choice(method, tuple(METHODS), "method")
    dims = METHODS[method][2]
    ndim = len(inp.shape)
    if ndim not in dims:
        raise MedsegError(f"{method}: works on {' and '.join(f'{d}D' for d in dims)} images, and the input is {ndim}D "
                          f"({inp.size_text()}); {'give a 2D image' if dims == (2,) else 'give a 2D image or a 3D volume'}")
    seeds = seeds or Seeds()
    p = {k: v for k, v in params.items() if v is not None}
    m = resolve_mask(mask, inp) if method != "snake" else None
    fn = method_function(method)
    img, sp = inp.image, inp.spacing
    probs = None

    def pick(*names):
        return {k: p[k] for k in names if k in p}

    if method in ("kmeans", "gmm", "meanshift"):
        kw = pick("features", "position_weight", "seed", "max_samples") | ({"k": p["k"]} if "k" in p and method != "meanshift" else {})
        if method == "meanshift":
            kw |= pick("bandwidth")
        if method == "gmm":
            labels, probs = fn(img, mask=m, spacing=sp, return_probabilities=True, **kw)
        else:
            labels = fn(img, mask=m, spacing=sp, **kw)
    elif method == "graphcut":
        labels = fn(img, seeds.labels, spacing=sp, mask=m, **pick("sigma", "lam", "bins"))
    elif method == "grabcut":
        if seeds.box is None:
            raise MedsegError("grabcut: needs a box around the object: --box X0 Y0 X1 Y1 (3D: X0 Y0 Z0 X1 Y1 Z1) or 'box' in the seeds JSON")
        labels = fn(img, seeds.box, spacing=sp, seeds=seeds.labels, **pick("iterations", "components", "gamma", "seed"))
    elif method == "random-walker":
        labels, probs = fn(img, seeds.labels, spacing=sp, mask=m, return_probabilities=True, **pick("beta"))
    elif method == "ncut":
        labels = fn(img, spacing=sp, mask=m, **pick("n_segments", "compactness", "sigma", "threshold", "seed"))
    elif method == "slic":
        labels = fn(img, spacing=sp, mask=m, **pick("n_segments", "compactness"))
    elif method == "felzenszwalb":
        labels = fn(img, **pick("scale", "sigma", "min_size"))
    elif method == "watershed":
        labels = fn(img, seeds.labels, mask=m, **pick("h", "sigma", "compactness"))
    elif method == "snake":
        init = {}
        if seeds.circle is not None:
            init["circle"] = seeds.circle
        elif seeds.box is not None:
            init["box"] = seeds.box
        elif seeds.labels is not None:
            init["init_mask"] = seeds.labels == 1
        labels = fn(img, **init, **pick("solver", "alpha", "beta", "gamma", "kappa", "sigma", "step", "band", "window", "max_iterations"))
    elif method == "chan-vese":
        labels = fn(img, init=_init_mask(seeds, inp, method), mask=m, **pick("iterations", "smoothing", "lambda1", "lambda2"))
    else:  # crf
        if probabilities is None:
            raise MedsegError("crf: needs the probability map to refine: --prob <id>_prob.nii.gz (written by medseg predict --probabilities)")
        probs = fn(img, probabilities, spacing=sp, **pick("iterations", "smooth_sxy", "smooth_weight", "appearance_sxy",
                                                           "appearance_srgb", "appearance_weight"))
        labels = _argmax_labels(probs, probabilities)
    if select is not None:
        from medseg.classical.regions import select_regions

        labels = select_regions(labels, select, img, seeds.labels)
    if largest_component:
        from medseg.classical.regions import largest_component as largest

        labels = largest(labels)
    return np.asarray(labels), probs


def _argmax_labels(refined: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Labels of refined probabilities: the argmax of classes summing to 1 (class index), else each region > 0.5
    painted in order (region k -> k + 1; nested regions such as WT/TC/ET then read as the innermost)."""
    from medseg.classical.crf import _is_softmax

    if _is_softmax(original):
        return refined.argmax(axis=0).astype(np.int32)
    out = np.zeros(refined.shape[1:], np.int32)
    for k in range(refined.shape[0]):
        out[refined[k] > 0.5] = k + 1
    return out
