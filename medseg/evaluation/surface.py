"""Surface voxels and surface distances of binary masks, in millimetres.

Definitions (chosen to agree with MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice``):

- The **surface** of a mask is the set of its voxels that have at least one face neighbour (6-connectivity in
  3D, 4 in 2D) outside the mask; voxels outside the image count as outside, so a mask touching the image border
  has surface voxels there. This equals ``mask & ~scipy.ndimage.binary_erosion(mask)``.
- The **directed surface distances** from A to B are, for every surface voxel of A, the Euclidean distance in
  mm (voxel centres scaled by the spacing) to the nearest surface voxel of B.

Surface voxels always lie inside the union of both masks, so everything is computed on the union's bounding
box (outside it both masks are empty, so the box edge acts as the empty outside). Surface voxels shared by both
masks are at distance 0; for the others the voxel offsets around them are tried in order of their length in mm
(most surface voxels find the other surface within a few voxels), and the remaining far ones are looked up in
a k-d tree of the other surface. This is exact, and much faster than a dense distance transform of the box
(see ``docs/performance.md``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask`` grown by ``margin`` (clipped to the array); ``None`` if empty.

    Example:
        >>> bounding_box(np.array([0, 0, 1, 1, 0, 0], bool), margin=1)
        (slice(1, 5, None),)
    """
    from medseg.data.preprocess import foreground_bbox

    if not mask.any():
        return None
    return tuple(slice(a, b) for a, b in foreground_bbox(mask, margin))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a mask ``(*spatial)``: mask voxels with a face neighbour outside the mask.

    ``mask`` is boolean, or an unsigned integer array of bit flags (one mask per bit): every bit is treated as
    its own mask, so the surfaces of several nested regions come out of one pass.

    Example:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(surface(m).sum())  # the 3x3 square minus its centre
        8
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "bu":
        raise TypeError(f"surface() takes a boolean or unsigned bit-flag array, got {mask.dtype}")
    interior = mask.copy()
    if mask.size == 0:
        return interior
    for axis in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        interior[tuple(hi)] &= mask[tuple(lo)]
        interior[tuple(lo)] &= mask[tuple(hi)]
        for edge in (0, -1):  # voxels outside the image count as outside the mask
            hi[axis] = edge
            interior[tuple(hi)] = 0
    return mask & ~interior


def _coordinates(flat: np.ndarray, shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(flat, shape), axis=1) * scale


def _offsets(spacing: np.ndarray, radius_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets within ``radius_voxels`` of the finest spacing, sorted by their length in mm."""
    radius = radius_voxels * float(spacing.min())
    reach = [int(np.floor(radius / s)) for s in spacing]
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij"), -1).reshape(-1, spacing.size)
    length = np.sqrt(((grid * spacing) ** 2).sum(axis=1))
    keep = (length > 0) & (length <= radius)
    order = np.argsort(length[keep], kind="stable")
    return grid[keep][order], length[keep][order]


def directed_distances(src: np.ndarray, dst: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                       radius_voxels: int = 3) -> np.ndarray:
    """Distances (mm) from each surface voxel ``src`` to the nearest surface voxel ``dst``, exactly.

    Near neighbours are found by looking up the voxel offsets around each point in order of their length in mm
    (the first hit is the nearest); points with no hit within ``radius_voxels`` of the finest spacing go to a
    k-d tree of ``dst``.

    Args:
        src, dst: sorted flat (C-order) indices of surface voxels in an array of ``shape``.
        spacing: voxel size in mm per axis.

    Returns:
        ``(len(src),)`` distances; ``inf`` everywhere when ``dst`` is empty.
    """
    out = np.zeros(src.size, dtype=np.float64)
    if src.size == 0:
        return out
    if dst.size == 0:
        out[:] = np.inf
        return out
    scale = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    offsets, lengths = _offsets(scale, radius_voxels)
    pad = np.abs(offsets).max(axis=0) if offsets.size else np.zeros(len(shape), int)
    padded = tuple(n + 2 * k for n, k in zip(shape, pad))
    shift = np.ravel_multi_index(tuple(pad), padded)
    to_padded = lambda flat: np.ravel_multi_index(np.unravel_index(flat, shape), padded)  # noqa: E731
    hit = np.zeros(int(np.prod(padded)), dtype=bool)
    hit[to_padded(dst)] = True
    todo = np.flatnonzero(~hit[to_padded(src)])  # voxels on both surfaces stay at distance 0
    where = to_padded(src[todo])
    steps = np.ravel_multi_index(tuple((offsets + pad).T), padded) - shift if offsets.size else np.zeros(0, int)
    for step, length in zip(steps, lengths):
        if todo.size == 0:
            break
        found = hit[where + step]
        if found.any():
            out[todo[found]] = length
            todo, where = todo[~found], where[~found]
    if todo.size:
        tree = cKDTree(_coordinates(dst, shape, scale), leafsize=32, balanced_tree=False, compact_nodes=False)
        out[todo] = tree.query(_coordinates(src[todo], shape, scale), k=1)[0]
    return out


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(pred -> ref, ref -> pred)``.

    Args:
        pred, ref: boolean masks of one shape ``(*spatial)`` (2D or 3D).
        spacing: voxel size in mm per array axis.

    Returns:
        Two 1D float arrays (one value per surface voxel of ``pred``, resp. ``ref``). Distances to an empty mask
        are ``inf``; an empty mask has no distances (empty array).

    Example:
        >>> a = np.zeros((8, 8), bool); a[2:5, 2:5] = True
        >>> b = np.zeros((8, 8), bool); b[2:5, 3:6] = True
        >>> d_ab, d_ba = surface_distances(a, b, (1.0, 2.0))
        >>> float(d_ab.max()), float(d_ba.max())
        (2.0, 2.0)
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must have the same shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D mask")
    box = bounding_box(pred | ref)
    if box is None:
        return np.zeros(0), np.zeros(0)
    fp, fr = np.flatnonzero(surface(pred[box])), np.flatnonzero(surface(ref[box]))
    shape = tuple(b.stop - b.start for b in box)
    return directed_distances(fp, fr, shape, spacing), directed_distances(fr, fp, shape, spacing)


def percentile_hausdorff(d_pred_ref: np.ndarray, d_ref_pred: np.ndarray, percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance: the larger of the two directed percentiles (linear interpolation).

    Both directions must be non-empty (the empty cases are decided by the caller).
    """
    return float(max(np.percentile(d_pred_ref, percentile), np.percentile(d_ref_pred, percentile)))


def average_surface_distance(d_pred_ref: np.ndarray, d_ref_pred: np.ndarray) -> float:
    """Average symmetric surface distance: the mean over the surface voxels of both masks."""
    return float((d_pred_ref.sum() + d_ref_pred.sum()) / (d_pred_ref.size + d_ref_pred.size))


def surface_dice(d_pred_ref: np.ndarray, d_ref_pred: np.ndarray, tolerance: float) -> float:
    """Normalised surface Dice: share of both surfaces within ``tolerance`` mm of the other surface."""
    close = np.count_nonzero(d_pred_ref <= tolerance) + np.count_nonzero(d_ref_pred <= tolerance)
    return float(close / (d_pred_ref.size + d_ref_pred.size))
