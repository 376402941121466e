"""Label maps on a new grid, on the sample positions of the images' linear resampling.

:func:`resample_label` is what :class:`medseg.data.preprocess.Preprocessing` applies to a label when it resamples
(a target spacing, or a fixed size for 2D images): each value's mask interpolated linearly where the image is
interpolated, the largest share kept (nnU-Net's scheme), so a label stays on its image where nearest neighbour
would shift it half an old voxel.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A label map on a new grid of ``shape`` spanning the same extent, on the sample positions of the image's
    (bi/tri)linear resampling (``align_corners=False``, as ``torch.nn.functional.interpolate``): each value's 0/1
    mask is interpolated linearly and every new voxel takes the value with the largest share; a tie goes to the
    larger value (the rarer, foreground classes of label maps). Down-sampling by 2 thus gives each new voxel the
    majority of the 2x2(x2) old voxels it covers, where nearest neighbour would copy one corner of them (a shift of
    half an old voxel). Dtype kept; any values (classes, instance ids, the ignore value) are resampled alike.

    Each value is interpolated within its own bounding box (separable, :func:`_linear_weights`), and the most
    frequent value (the background) takes what the others leave: a map of many small objects (instance ids, a CT
    with a hundred organs) costs about one pass over the volume, not one per value.

    Example:
        >>> import numpy as np
        >>> resample_label(np.array([[0, 0, 1, 1], [0, 1, 1, 1]]), (1, 2)).tolist()
        [[0, 1]]
    """
    label = np.asarray(label)
    shape = tuple(int(n) for n in shape)
    if label.shape == shape:
        return label.copy()
    if label.dtype.kind == "u" and label.dtype.itemsize <= 2:
        counts = np.bincount(label.ravel(), minlength=1)
        values = np.nonzero(counts)[0].astype(label.dtype)
        counts = counts[values]
    else:
        values, counts = np.unique(label, return_counts=True)
    rest = values[np.argmax(counts)]  # the background: its share is 1 - the others'
    weights = [_linear_weights(n_old, n_new) for n_old, n_new in zip(label.shape, shape)]
    out = np.full(shape, rest, dtype=label.dtype)
    best = np.zeros(shape, np.float32)
    taken = np.zeros(shape, np.float32)
    boxes = _bounding_boxes(label, values)
    whole = tuple(slice(0, n) for n in label.shape)
    for value in values:  # ascending: ">=" gives ties to the larger value
        if value == rest:
            continue
        box = boxes.get(value, whole)
        found = _share(label[box] == value, box, weights)
        if found is None:
            continue
        region, share = found
        take = share >= best[region] - 1e-6  # float rounding of an exact tie
        out[region][take] = value
        best[region] = np.maximum(best[region], share)
        taken[region] += share
    left = 1.0 - taken  # the background's share
    back = (left > best + 1e-6) | ((np.abs(left - best) <= 1e-6) & (rest > out))
    out[back] = rest
    return out


def _linear_weights(n_old: int, n_new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per new index: the two old indices and the weight of the second, as ``interpolate(align_corners=False)``:
    source ``(j + 0.5) * n_old / n_new - 0.5``, clamped to 0 below; the last old index repeats at the far edge."""
    src = np.maximum((np.arange(n_new) + 0.5) * (n_old / n_new) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_old - 1)
    i1 = np.minimum(i0 + 1, n_old - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _bounding_boxes(label: np.ndarray, values: np.ndarray) -> dict:
    """Positive value -> tuple of slices of its bounding box (``scipy.ndimage.find_objects``, one pass). Empty for
    non-integer or negative maps (``values``: the map's sorted values); values without a box (0 when it is not the
    background) use the whole grid."""
    if label.dtype.kind not in "iu" or values[0] < 0 or values[-1] > 2 ** 24:
        return {}
    from scipy import ndimage

    found = ndimage.find_objects(label if label.dtype.itemsize <= 4 else label.astype(np.int64))
    return {v: box for v, box in enumerate(found, start=1) if box is not None}


def _share(mask: np.ndarray, box: tuple[slice, ...], weights) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The linearly interpolated share of ``mask`` (the value's mask within ``box`` of the old grid) on the part of
    the new grid it reaches: ``(new slices, share there)``; ``None`` when no new sample position reaches it (a
    thin object between the samples of a coarse grid)."""
    share = mask.astype(np.float32)
    region = []
    for axis, (i0, i1, w) in enumerate(weights):
        lo, hi = box[axis].start, box[axis].stop
        reach = np.nonzero((i1 >= lo) & (i0 < hi))[0]
        if reach.size == 0:
            return None
        j0, j1 = int(reach[0]), int(reach[-1]) + 1
        a = np.clip(i0[j0:j1] - lo, -1, hi - lo)  # -1 / hi - lo: outside the box, where the mask is 0
        b = np.clip(i1[j0:j1] - lo, -1, hi - lo)
        padded = np.pad(share, [(1, 1) if k == axis else (0, 0) for k in range(share.ndim)])
        shape = [1] * share.ndim
        shape[axis] = j1 - j0
        ww = w[j0:j1].reshape(shape)
        share = np.take(padded, a + 1, axis=axis) * (1 - ww) + np.take(padded, b + 1, axis=axis) * ww
        region.append(slice(j0, j1))
    return tuple(region), share
