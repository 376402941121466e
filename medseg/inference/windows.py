"""Planning sliding windows: pure functions of shapes, no tensors and no model.

Window positions tile a volume with the fewest windows for the requested overlap; the blending weights are
a voxel-integrated Gaussian. The engine (:mod:`medseg.inference.engine`) runs and stitches what is planned
here.

Example:
    >>> axis_starts(100, 40, 0.5)
    (0, 20, 40, 60)
    >>> len(plan_windows((100, 64, 30), (40, 40, 40), 0.5))
    12
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from medseg.errors import MedsegError

Box = tuple[tuple[int, int], ...]

# The option vocabularies of InferenceSettings, kept in this torch-free module so that the pipeline check and the
# command line (``medseg predict --blend/--stitch``) offer them without importing torch.
BLENDS = ("gaussian", "constant")  # window weights: gaussian_weights, or all ones
STITCH_MODES = ("auto", "device", "cpu")  # where the engine accumulates window outputs


def max_step(roi: int, overlap: float) -> int:
    """Largest stride between window starts on an axis: ``roi * (1 - overlap)`` rounded down, at least 1."""
    return max(1, int(roi * (1.0 - overlap)))


def axis_starts(length: int, roi: int, overlap: float) -> tuple[int, ...]:
    """Start indices of windows of size ``roi`` covering ``[0, length)`` on one axis.

    The count is the fewest that keeps every stride at most :func:`max_step`:
    ``n = ceil((length - roi) / max_step) + 1``, i.e. ``ceil((L - overlap_size) / (roi - overlap_size))``;
    the windows are spread evenly, the first at 0 and the last ending at ``length``. An axis no longer than
    ``roi`` gets one window at 0 (the engine pads it to ``roi``).
    """
    if not 0.0 <= overlap < 1.0:
        raise MedsegError(f"overlap {overlap} must be within [0, 1)")
    if roi < 1 or length < 1:
        raise MedsegError(f"window size {roi} and axis length {length} must be positive")
    if length <= roi:
        return (0,)
    span = length - roi
    n = math.ceil(span / max_step(roi, overlap)) + 1
    return tuple((i * span) // (n - 1) for i in range(n))


def plan_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start corners of all windows (last axis varying fastest) that tile ``shape`` with windows ``roi``."""
    if len(shape) != len(roi):
        raise MedsegError(f"window size {tuple(roi)} has {len(roi)} axes but the volume has {len(shape)}: {tuple(shape)}")
    per_axis = [axis_starts(int(n), int(r), overlap) for n, r in zip(shape, roi)]
    return list(itertools.product(*per_axis))


def window_slices(start: Sequence[int], roi: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + r) for s, r in zip(start, roi))


def windows_with_foreground(starts: Sequence[tuple[int, ...]], roi: Sequence[int], mask: np.ndarray) -> list[tuple[int, ...]]:
    """The windows that contain at least one foreground voxel of ``mask`` (boolean, same shape as the plan).

    Uses a summed-volume table, so each window costs ``2**ndim`` look-ups whatever its size.
    """
    table = np.pad(mask.astype(np.int64), [(1, 0)] * mask.ndim)
    for axis in range(mask.ndim):
        np.cumsum(table, axis=axis, out=table)
    keep = []
    for start in starts:
        total = 0
        for corner in itertools.product((0, 1), repeat=mask.ndim):
            idx = tuple(min(s + r, n) if c else s for s, r, n, c in zip(start, roi, mask.shape, corner))
            total += (-1) ** (mask.ndim - sum(corner)) * table[idx]
        if total > 0:
            keep.append(tuple(start))
    return keep


def gaussian_weights(roi: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Blending weights ``(*roi)`` float32: ``exp(-d**2 / (2 sigma**2))`` per axis, multiplied over axes.

    ``d`` is the distance of a voxel centre from the window centre ``(roi - 1) / 2`` (symmetric for even sizes)
    and ``sigma = roi * sigma_scale``; weights are raised to at least ``floor`` so window borders keep a small
    weight and a voxel covered only by borders is still a proper weighted mean. These are the weights MONAI
    uses by default, so stitched outputs agree with it.

    Example:
        >>> w = gaussian_weights((5, 4))
        >>> w.shape, float(w[2].max()) < 1.0, bool(np.allclose(w, w[::-1, ::-1]))
        ((5, 4), True, True)
    """
    weights = np.ones((), dtype=np.float64)
    for r in roi:
        sigma = max(float(r) * sigma_scale, 1e-6)
        d = np.arange(int(r), dtype=np.float64) - (int(r) - 1) / 2.0
        weights = np.multiply.outer(weights, np.exp(-(d ** 2) / (2.0 * sigma ** 2)))
    return np.maximum(weights.astype(np.float32), np.float32(floor))


def foreground_box(mask: np.ndarray, min_size: Sequence[int] = ()) -> Box:
    """``(start, stop)`` per axis of the bounding box of ``mask``, grown (centred, within the array) to at least
    ``min_size`` where the array allows. An empty mask gives the whole array."""
    from medseg.data.preprocess import foreground_bbox

    shape = mask.shape
    box = []
    for axis, (lo, hi) in enumerate(foreground_bbox(mask)):
        want = min(int(min_size[axis]) if axis < len(min_size) else 0, shape[axis])
        if hi - lo < want:
            lo = max(0, min(lo - (want - (hi - lo)) // 2, shape[axis] - want))
            hi = lo + want
        box.append((lo, hi))
    return tuple(box)


def symmetric_padding(shape: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per axis that pads ``shape`` up to ``roi`` where it is smaller (half on each side)."""
    out = []
    for n, r in zip(shape, roi):
        extra = max(0, int(r) - int(n))
        out.append((extra // 2, extra - extra // 2))
    return tuple(out)
