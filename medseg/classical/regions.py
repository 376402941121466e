"""From regions to an object: choose clusters or superpixels, keep the largest component.

Clusterers and oversegmentations give region ids; a user who wants one object picks regions:

* ``brightest`` / ``darkest`` — the region with the highest / lowest mean intensity (clusters are numbered from
  dark to bright, so for a clusterer these are the last and the first);
* ``seeds`` — every region that holds more object-seed voxels (value 1) than background-seed voxels (value 2):
  superpixels turn a few clicks into a mask at superpixel resolution;
* a list of ids, e.g. ``"3,4"``.

Example:
    >>> import numpy as np
    >>> labels = np.array([[1, 1, 2], [3, 3, 2]])
    >>> image = np.array([[0., 0., 5.], [9., 9., 5.]])[..., None]
    >>> select_regions(labels, "brightest", image).tolist()
    [[0, 0, 0], [1, 1, 0]]
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError


def select_regions(labels: np.ndarray, how: str, image: np.ndarray | None = None, seeds: np.ndarray | None = None) -> np.ndarray:
    """A 0/1 uint8 mask of the regions chosen by ``how`` (see the module doc); label 0 is never chosen."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        raise MedsegError("--select: the label map has no regions (all 0); nothing to choose from")
    if how in ("brightest", "darkest"):
        if image is None:
            raise MedsegError(f"--select {how} needs the image")
        grey = image.mean(axis=-1)
        means = ndimage.mean(grey, labels, ids)
        chosen = [ids[int(np.argmax(means) if how == "brightest" else np.argmin(means))]]
    elif how == "seeds":
        if seeds is None:
            raise MedsegError("--select seeds needs --seeds (a label image or JSON with object (1) and background (2) seeds)")
        fg = ndimage.sum(seeds == 1, labels, ids)
        bg = ndimage.sum(seeds == 2, labels, ids)
        chosen = ids[fg > bg]
        if len(chosen) == 0:
            raise MedsegError("--select seeds: no region holds more object seeds than background seeds; add object seeds (value 1)")
    else:
        try:
            chosen = [int(v) for v in str(how).split(",") if v.strip()]
        except ValueError:
            raise MedsegError(f"--select {how!r}: give brightest, darkest, seeds, or region ids such as 3,4") from None
        unknown = sorted(set(chosen) - set(int(i) for i in ids))
        if unknown or not chosen:
            raise MedsegError(f"--select {how}: region(s) {unknown or how} are not in the label map (ids {int(ids.min())}..{int(ids.max())})")
    return np.isin(labels, chosen).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of the non-zero voxels (the mask's dtype and value kept)."""
    components, n = ndimage.label(mask != 0)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == int(np.argmax(sizes)), mask, 0).astype(mask.dtype)
