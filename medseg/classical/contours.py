"""Deformable contours: the discrete snake (greedy and dynamic programming) and morphological Chan–Vese.

**Snake** (Kass, Witkin & Terzopoulos 1988), discrete form: a closed contour of points v_0..v_{n-1} on the pixel
grid minimises

    E = sum_i  alpha |v_i - v_{i-1}|^2 / d^2  +  beta |v_{i-1} - 2 v_i + v_{i+1}|^2 / d^2  +  gamma E_ext(v_i)
               + kappa (v_i - v_i') . n_i

with elasticity ``alpha``, curvature (stiffness) ``beta``, d the mean point spacing at the start of the iteration
(so the weights do not depend on the contour's size), E_ext = -|grad(G_sigma * I)|^2 divided by its 99th
percentile and clipped to [-1, 0], which pulls the contour onto edges, and a pressure ``kappa`` along the outward normals n_i of the contour v' at the start
of the iteration (the balloon force of Cohen 1991: positive shrinks the contour onto the object from outside,
negative inflates it from inside; on the pixel grid a lone point cannot move inwards against the curvature term
without it). Two minimisers of the same energy, written here (no library has them):

* greedy (Williams & Shah 1992, CVGIP): each point in turn moves to the position of its (2w+1)^2 neighbourhood
  that lowers E most, until no point moves;
* dynamic programming (Amini, Weymouth & Jain 1990, IEEE PAMI): each point may move to one of 2m+1 candidates on
  its normal; the Viterbi algorithm over pairs of consecutive candidates (the curvature couples three points)
  finds the best of all (2m+1)^n combinations exactly, with one point held fixed to close the contour (a different
  one at each iteration) and consecutive points kept in order (no self-crossing), until no point moves.

**Chan–Vese** (Chan & Vese 2001, IEEE TIP): the two-phase piecewise-constant Mumford–Shah model, in its
morphological form (Márquez-Neila, Baumela & Alvarez 2014, IEEE PAMI), scikit-image
``morphological_chan_vese``, in 2D and 3D.

Example:
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> image = ((xx - 32) ** 2 + (yy - 32) ** 2 < 15 ** 2).astype(np.float32)[..., None]
    >>> labels = snake(image, circle=(32, 32, 24), solver="dp")
    >>> bool(abs(int(labels.sum()) - int(image.sum())) < 0.2 * image.sum())
    True
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.classical import require
from medseg.classical.features import check_image
from medseg.classical.graph import bounding_box, check_box, unit_range
from medseg.errors import MedsegError

SOLVERS = ("greedy", "dp")


# ----------------------------------------------------------------------------- initial contours
def circle_contour(cx: float, cy: float, r: float, shape: tuple[int, int], step: float = 5.0) -> np.ndarray:
    """Points ``(n, 2)`` (x, y) every ``step`` pixels on a circle, checked to lie inside the image."""
    if not r > 0:
        raise MedsegError(f"snake: circle radius {r} must be positive; give --circle CX CY R with R > 0")
    if not (0 <= cx < shape[0] and 0 <= cy < shape[1]):
        raise MedsegError(f"snake: circle centre ({cx}, {cy}) lies outside the image of size {shape[0]}x{shape[1]}; "
                          "give a centre inside the image")
    n = max(8, int(round(2 * np.pi * r / step)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return _clip(np.round(pts), shape)


def mask_contour(mask: np.ndarray, step: float = 5.0) -> np.ndarray:
    """The outer boundary of the largest component of ``mask`` (W, H) as points every ``step`` pixels."""
    measure = require("skimage.measure", "snake")
    if not mask.any():
        raise MedsegError("snake: the initial mask is empty; give a circle, a box or object seeds (1)")
    from medseg.classical.regions import largest_component

    padded = np.pad(largest_component(mask.astype(np.uint8)), 1)
    line = max(measure.find_contours(padded.astype(float), 0.5), key=len) - 1
    return resample(line, step, mask.shape)


def resample(points: np.ndarray, step: float, shape: tuple[int, int]) -> np.ndarray:
    """A closed polyline resampled to points every ``step`` pixels of arc length (rounded to pixels)."""
    closed = np.vstack([points, points[:1]])
    seg = np.sqrt((np.diff(closed, axis=0) ** 2).sum(axis=1))
    arc = np.concatenate([[0], np.cumsum(seg)])
    n = max(8, int(round(arc[-1] / step)))
    s = np.linspace(0, arc[-1], n, endpoint=False)
    pts = np.stack([np.interp(s, arc, closed[:, 0]), np.interp(s, arc, closed[:, 1])], axis=1)
    return _clip(np.round(pts), shape)


def _clip(points: np.ndarray, shape) -> np.ndarray:
    return np.clip(points, 0, np.array(shape[:2]) - 1).astype(np.int64)


def external_energy(image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """-|grad(G_sigma * I)|^2 of the grey image (channels averaged), divided by its 99th percentile and clipped to
    [-1, 0] (so that a few very strong edges, such as a dark image border, do not flatten all others); (W, H)."""
    grey = unit_range(image.mean(axis=-1, keepdims=True))[..., 0]
    g = ndimage.gaussian_gradient_magnitude(grey, float(sigma)) ** 2
    top = float(np.percentile(g, 99)) or float(g.max()) or 1.0
    return -np.minimum(g / top, 1.0).astype(np.float64)


def contour_energy(points: np.ndarray, ext: np.ndarray, alpha: float, beta: float, gamma: float, d2: float | None = None) -> float:
    """The snake energy E of a closed contour without the pressure term (see the module doc)."""
    p = points.astype(np.float64)
    prev, nxt = np.roll(p, 1, axis=0), np.roll(p, -1, axis=0)
    d2 = d2 or _mean_d2(p)
    cu = ((prev - 2 * p + nxt) ** 2).sum(axis=1) / d2
    return float(_pair(prev, p, alpha, d2).sum() + beta * cu.sum() + gamma * ext[points[:, 0], points[:, 1]].sum())


def _pair(a: np.ndarray, b: np.ndarray, alpha: float, d2: float) -> np.ndarray:
    """The elastic term of consecutive points a -> b."""
    return alpha * ((a - b) ** 2).sum(-1) / d2


def _counter_clockwise(v: np.ndarray) -> np.ndarray:
    return v if _area(v) >= 0 else v[::-1].copy()


def _mean_d2(p: np.ndarray) -> float:
    return float(np.mean(np.sqrt(((p - np.roll(p, 1, axis=0)) ** 2).sum(axis=1))) ** 2) or 1.0


# ----------------------------------------------------------------------------- greedy
def snake_greedy(ext: np.ndarray, points: np.ndarray, alpha: float = 0.5, beta: float = 0.2, gamma: float = 1.0,
                 kappa: float = 0.05, window: int = 1, max_iterations: int = 1000) -> np.ndarray:
    """Greedy minimisation (Williams & Shah 1992) of the snake energy from ``points`` (n, 2); returns the contour."""
    v = _counter_clockwise(np.asarray(points, np.int64).copy())
    n = len(v)
    if n < 5:
        raise MedsegError(f"snake: a contour needs at least 5 points, got {n}; start from a larger circle or box")
    w = int(window)
    offsets = np.array([(dx, dy) for dx in range(-w, w + 1) for dy in range(-w, w + 1)])
    hi = np.array(ext.shape) - 1
    for _ in range(int(max_iterations)):
        n = len(v)
        d2 = _mean_d2(v.astype(np.float64))
        start, normals = v.astype(np.float64), _normals(v)
        moved = 0
        for i in range(n):
            cand = np.clip(v[i] + offsets, 0, hi)
            c = cand.astype(np.float64)
            a, b = v[(i - 1) % n].astype(np.float64), v[(i + 1) % n].astype(np.float64)
            aa, bb = v[(i - 2) % n].astype(np.float64), v[(i + 2) % n].astype(np.float64)
            e = (_pair(a, c, alpha, d2) + _pair(c, b, alpha, d2) + kappa * ((c - start[i]) @ normals[i])
                 + beta * (((aa - 2 * a + c) ** 2).sum(1) + ((a - 2 * c + b) ** 2).sum(1) + ((c - 2 * b + bb) ** 2).sum(1)) / d2)
            e = e + gamma * ext[cand[:, 0], cand[:, 1]]
            best = int(np.argmin(e))
            here = int(np.flatnonzero((offsets == 0).all(axis=1))[0])
            if e[best] < e[here] - 1e-12:
                v[i] = cand[best]
                moved += 1
        if moved == 0 or _area(v) <= 0:  # converged, or the contour turned inside out (kappa too strong for the edges)
            break
    return v


def _area(v: np.ndarray) -> float:
    p = v.astype(np.float64)
    return float(0.5 * (p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]).sum())


# ----------------------------------------------------------------------------- dynamic programming
def _normals(v: np.ndarray) -> np.ndarray:
    t = np.roll(v, -1, axis=0) - np.roll(v, 1, axis=0)
    nrm = np.stack([t[:, 1], -t[:, 0]], axis=1).astype(np.float64)
    length = np.sqrt((nrm ** 2).sum(axis=1, keepdims=True))
    return nrm / np.where(length > 0, length, 1.0)


def _dp_step(v: np.ndarray, ext: np.ndarray, alpha: float, beta: float, gamma: float, kappa: float, band: int,
             fixed: int) -> np.ndarray:
    """One exact Viterbi pass: every point except ``fixed`` chooses among 2*band+1 candidates on its normal."""
    n = len(v)
    v = np.roll(v, -fixed, axis=0)  # the fixed point is v_0
    hi = np.array(ext.shape) - 1
    steps = np.arange(-band, band + 1)
    m = len(steps)
    normals = _normals(v)
    cand = np.clip(np.round(v[:, None, :] + steps[None, :, None] * normals[:, None, :]), 0, hi).astype(np.int64)  # (n, m, 2)
    cand[0] = v[0]
    d2 = _mean_d2(v.astype(np.float64))
    P = cand.astype(np.float64)
    E = gamma * ext[cand[..., 0], cand[..., 1]] + kappa * ((P - v[:, None, :]) * normals[:, None, :]).sum(-1)  # (n, m)
    v0 = P[0, 0]

    tangent = (v - np.roll(v, 1, axis=0)).astype(np.float64)  # tangent[i] = v_i - v_{i-1}

    def el(a, b, i):  # pair term of v_{i-1} -> v_i; consecutive points may not swap order (no self-crossing)
        keep = ((b - a) * tangent[i]).sum(-1) >= 0
        return np.where(keep, _pair(a, b, alpha, d2), np.inf)

    def cu(a, b, c):
        return beta * ((a - 2 * b + c) ** 2).sum(-1) / d2

    # F[s, a, b]: best cost of v_1..v_i with v_1 = s, v_{i-1} = a, v_i = b (curvature at i not yet counted)
    s_ = P[1][:, None, None, :]
    F = np.full((m, m, m), np.inf)
    idx = np.arange(m)
    first = (E[1][:, None] + E[2][None, :] + el(v0, P[1], 1)[:, None] + el(P[1][:, None, :], P[2][None, :, :], 2)
             + cu(v0, P[1][:, None, :], P[2][None, :, :]))  # (s, b)
    F[idx, idx, :] = first
    back = []
    for i in range(2, n - 1):
        a_ = P[i - 1][:, None, None, :]  # axes: a, b, c
        b_ = P[i][None, :, None, :]
        c_ = P[i + 1][None, None, :, :]
        trans = cu(a_, b_, c_) + el(b_, c_, i + 1) + E[i + 1][None, None, :]  # (a, b, c)
        total = F[:, :, :, None] + trans[None]  # (s, a, b, c)
        arg = np.argmin(total, axis=1)  # best a for (s, b, c)
        F = np.take_along_axis(total, arg[:, None], axis=1)[:, 0]
        back.append(arg)
    a_ = P[n - 2][None, :, None, :]
    b_ = P[n - 1][None, None, :, :]
    close = el(b_, v0, 0) + cu(a_, b_, v0) + cu(b_, v0, s_)  # (s, a, b)
    total = F + close
    s, a, b = np.unravel_index(int(np.argmin(total)), total.shape)
    choice = np.zeros(n, np.int64)
    choice[n - 1], choice[n - 2] = b, a
    for i in range(n - 2, 1, -1):  # back[i - 2] gives v_{i-1} from (s, v_i, v_{i+1})
        choice[i - 1] = back[i - 2][s, choice[i], choice[i + 1]]
    choice[1] = s
    out = cand[np.arange(n), choice]
    out[0] = v[0]
    return np.roll(out, fixed, axis=0)


def snake_dp(ext: np.ndarray, points: np.ndarray, alpha: float = 0.5, beta: float = 0.2, gamma: float = 1.0,
             kappa: float = 0.05, band: int = 3, max_iterations: int = 300) -> np.ndarray:
    """Dynamic-programming minimisation (Amini et al. 1990) of the snake energy; returns the contour."""
    v = _counter_clockwise(np.asarray(points, np.int64).copy())
    if len(v) < 5:
        raise MedsegError(f"snake: a contour needs at least 5 points, got {len(v)}; start from a larger circle or box")
    still = 0
    for it in range(int(max_iterations)):
        new = _dp_step(v, ext, alpha, beta, gamma, kappa, int(band), fixed=(it * 7) % len(v))
        if _area(new) <= 0:  # the contour turned inside out (kappa too strong for the edges): keep the last one
            break
        still = still + 1 if np.array_equal(new, v) else 0
        v = new
        if still >= 2:  # two different fixed points and nothing moved
            break
    return v


# ----------------------------------------------------------------------------- the method
def snake_contour(image: np.ndarray, *, circle: Sequence[float] | None = None, box: Sequence[int] | None = None,
                  init_mask: np.ndarray | None = None, solver: str = "greedy", alpha: float = 0.5, beta: float = 0.2,
                  gamma: float = 1.0, kappa: float = 0.05, sigma: float = 3.0, step: float = 5.0, band: int = 3, window: int = 1,
                  max_iterations: int | None = None) -> np.ndarray:
    """The final contour ``(n, 2)`` (x, y) of a snake started from a circle ``(cx, cy, r)``, a box (the inscribed
    ellipse) or an initial mask (its boundary)."""
    from medseg.errors import check_choice

    check_choice(solver, SOLVERS, "snake --solver")
    image = check_image(image, "snake", dims=(2,))
    shape = image.shape[:2]
    if circle is not None:
        if len(circle) != 3:
            raise MedsegError(f"snake: a circle is CX CY R (3 numbers), got {list(circle)}")
        points = circle_contour(*map(float, circle), shape, step)
    elif box is not None:
        sl = check_box(box, shape, "snake")
        (x0, x1), (y0, y1) = (sl[0].start, sl[0].stop - 1), (sl[1].start, sl[1].stop - 1)
        t = np.linspace(0, 2 * np.pi, max(8, int(round(np.pi * ((x1 - x0) + (y1 - y0)) / 2 / step))), endpoint=False)
        points = _clip(np.round(np.stack([(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(t)], 1)), shape)
    elif init_mask is not None:
        points = mask_contour(np.asarray(init_mask) > 0, step)
    else:
        raise MedsegError("snake: needs an initial contour: --circle CX CY R, --box X0 Y0 X1 Y1, or --seeds with object voxels (1)")
    ext = external_energy(image, sigma)
    if solver == "greedy":
        return snake_greedy(ext, points, alpha, beta, gamma, kappa, window, max_iterations or 1000)
    return snake_dp(ext, points, alpha, beta, gamma, kappa, band, max_iterations or 300)


def fill_contour(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The closed polygon through ``points`` (x, y) filled, as a 0/1 uint8 (W, H) mask."""
    draw = require("skimage.draw", "snake")
    out = np.zeros(shape, np.uint8)
    rr, cc = draw.polygon(points[:, 0], points[:, 1], shape)
    out[rr, cc] = 1
    out[points[:, 0], points[:, 1]] = 1
    return out


def snake(image: np.ndarray, **options) -> np.ndarray:
    """The snake's final contour filled: a 0/1 uint8 label map (W, H). Options: see :func:`snake_contour`."""
    points = snake_contour(image, **options)
    return fill_contour(points, image.shape[:2])


def chan_vese(image: np.ndarray, init: np.ndarray | None = None, iterations: int = 100, smoothing: int = 1,
              lambda1: float = 1.0, lambda2: float = 1.0, mask: np.ndarray | None = None, margin: int = 10) -> np.ndarray:
    """Morphological Chan–Vese (2D or 3D) on the grey image; returns a 0/1 uint8 map. ``init``: an initial object
    mask on the grid (from a box, circle or seeds; the model is fitted on its bounding box grown by ``margin``
    voxels, so the two phases are object and its surroundings; the object is the phase that does not fill that
    margin), else a checkerboard over the image (or the ``mask``'s box) and the brighter phase is the object."""
    segmentation = require("skimage.segmentation", "chan-vese")
    image = check_image(image, "chan-vese")
    shape = image.shape[:-1]
    box = bounding_box(mask, margin=2) if mask is not None else tuple(slice(None) for _ in shape)
    if init is not None:
        init = np.asarray(init) > 0
        if init.shape != shape:
            raise MedsegError(f"chan-vese: initial mask of shape {init.shape} is not on the image grid {shape}")
        if not init.any():
            raise MedsegError("chan-vese: the initial mask is empty; give a box, a circle or object seeds (1)")
        box = bounding_box(init, margin=margin)  # the two phases are fitted around the user's region only
        level = init[box].astype(np.int8)
    else:
        level = "checkerboard"
    grey = unit_range(image[box].mean(axis=-1, keepdims=True))[..., 0]
    if mask is not None:  # voxels outside the mask (a scan's zero background) take the median of those inside
        inside = np.asarray(mask, bool)[box]
        if inside.any():
            grey = np.where(inside, grey, np.median(grey[inside])).astype(np.float32)
    seg = segmentation.morphological_chan_vese(grey, int(iterations), init_level_set=level, smoothing=int(smoothing),
                                               lambda1=float(lambda1), lambda2=float(lambda2)).astype(bool)
    ring = ~init[box] if init is not None else None
    if ring is not None and ring.any():
        if seg[ring].mean() > 0.5:  # the object is the phase that does not fill the margin outside the user's region
            seg = ~seg
    elif seg.any() and (~seg).any() and grey[seg].mean() < grey[~seg].mean():
        seg = ~seg
    out = np.zeros(shape, np.uint8)
    out[box] = seg
    if mask is not None:
        out &= np.asarray(mask, bool).astype(np.uint8)
    return out
