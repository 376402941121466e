"""RoIAlign (He et al. 2017) written with ``grid_sample``, its inverse (pasting box-sized masks onto the image grid)
and the FPN rule that picks a pyramid level per box (Lin et al. 2017). Any number of spatial dimensions that
``grid_sample`` supports (2 and 3).

Coordinates: boxes are ``(min_0, min_1, ..., max_0, max_1, ...)`` in image voxels, array-axis order, the maximum
exclusive; voxel ``i`` covers ``[i, i + 1)`` and its centre is ``i + 0.5``. A feature map of stride ``s`` (``spatial_scale
= 1 / s``) has cell ``j`` covering image ``[j s, (j + 1) s)``. With ``aligned=True`` (Detectron2's convention) a sample at
continuous feature coordinate ``f`` interpolates between cell centres, i.e. at array index ``f - 0.5``; ``aligned=False``
is the original RoIAlign, which reads index ``f`` (half a cell off) and stretches boxes to at least one cell.

Each output bin averages ``sampling_ratio`` samples per axis placed at the centres of a regular sub-grid of the bin.
Samples outside the map read the border value (boxes clipped to the image lie within half a cell of it).

Example:
    >>> feats = torch.arange(16.).view(1, 1, 4, 4)      # a ramp: value 4 * row + column at the cell centres
    >>> roi_align(feats, [torch.tensor([[0., 0., 4., 4.]])], output_size=2, spatial_scale=1.0).view(-1).tolist()
    [2.5, 4.5, 10.5, 12.5]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from medseg.errors import MedsegError


def _sizes(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    out = (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != dims or min(out) < 1:
        raise MedsegError(f"roi_align: output_size {value!r} must be a positive integer or {dims} positive integers")
    return out


def roi_grid(boxes: torch.Tensor, map_shape: Sequence[int], output_size: Sequence[int], spatial_scale: float,
             sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """The ``grid_sample`` grid ``(N, *(P * r), dims)`` (normalised, ``align_corners=False``, last axis first) of the
    sample points of ``boxes`` (N, 2 * dims) on a map of spatial size ``map_shape``; ``P = output_size``,
    ``r = sampling_ratio``."""
    dims = len(map_shape)
    n = boxes.shape[0]
    coords = []
    for a in range(dims):
        lo, hi = boxes[:, a] * spatial_scale, boxes[:, a + dims] * spatial_scale
        if aligned:
            lo = lo - 0.5
            hi = hi - 0.5
        else:
            hi = torch.maximum(hi, lo + 1.0)
        steps = output_size[a] * sampling_ratio
        frac = (torch.arange(steps, device=boxes.device, dtype=boxes.dtype) + 0.5) / steps
        index = lo[:, None] + frac[None] * (hi - lo)[:, None]  # array index of each sample along axis a
        t = (2 * index + 1) / map_shape[a] - 1
        shape = [n] + [1] * dims
        shape[a + 1] = steps
        coords.append(t.view(shape))
    full = [n] + [p * sampling_ratio for p in output_size]
    return torch.stack([c.expand(full) for c in reversed(coords)], dim=-1)


def _pool_samples(samples: torch.Tensor, ratio: int) -> torch.Tensor:
    """(B, C, *(P * r)) -> (B, C, *P): the mean of each bin's ``r ** dims`` samples."""
    if ratio == 1:
        return samples
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[samples.ndim - 2]
    return pool(samples, ratio)


def roi_align(features: torch.Tensor, boxes: Sequence[torch.Tensor], output_size: int | Sequence[int],
              spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """RoIAlign: ``features`` (B, C, *S), ``boxes`` one (N_b, 2 * dims) tensor per image in image voxels ->
    (sum N_b, C, *output_size), boxes of image 0 first.

    ``spatial_scale`` is 1 / the stride of ``features``; see the module docstring for the sampling convention.
    """
    dims = features.ndim - 2
    size = _sizes(output_size, dims)
    if len(boxes) != features.shape[0]:
        raise MedsegError(f"roi_align: {len(boxes)} box tensors for a batch of {features.shape[0]} feature maps")
    out = []
    for b, bx in enumerate(boxes):
        if bx.shape[0] == 0:
            out.append(features.new_zeros((0, features.shape[1], *size)))
            continue
        grid = roi_grid(bx.to(features.dtype), features.shape[2:], size, spatial_scale, sampling_ratio, aligned)
        flat = grid.reshape(1, -1, *grid.shape[2:])  # all boxes stacked along the first spatial axis: one call
        samples = F.grid_sample(features[b:b + 1], flat, mode="bilinear", padding_mode="border", align_corners=False)
        pooled = _pool_samples(samples, sampling_ratio)  # bins never straddle two boxes: P * r rows per box
        out.append(pooled.view(features.shape[1], bx.shape[0], *size).transpose(0, 1))
    return torch.cat(out)


def roi_align_per_box(images: torch.Tensor, boxes: torch.Tensor, output_size: int | Sequence[int],
                      sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """RoIAlign where box ``i`` reads its own image: ``images`` (N, C, *S), ``boxes`` (N, 2 * dims) ->
    (N, C, *output_size). Crops ground-truth masks into proposal boxes (scale 1)."""
    dims = images.ndim - 2
    size = _sizes(output_size, dims)
    if boxes.shape[0] == 0:
        return images.new_zeros((0, images.shape[1], *size))
    grid = roi_grid(boxes.to(images.dtype), images.shape[2:], size, 1.0, sampling_ratio, aligned)
    samples = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _pool_samples(samples, sampling_ratio)


def box_levels(boxes: torch.Tensor, num_levels: int, first_level: int = 2, canonical_size: float = 56.0,
               canonical_level: int = 4) -> torch.Tensor:
    """Index (0..num_levels-1) of the pyramid level of each box (N, 2 * dims): level ``floor(canonical_level +
    log2(size / canonical_size))`` with ``size`` the geometric mean of the box extents (``sqrt(area)`` in 2D),
    clamped to ``first_level .. first_level + num_levels - 1`` (the FPN paper: 224 at level 4 for ImageNet-sized
    objects; 56 at level 4 suits objects of 5-100 voxels, such as nuclei)."""
    dims = boxes.shape[1] // 2
    extent = (boxes[:, dims:] - boxes[:, :dims]).clamp_min(1e-6)
    log_size = extent.log2().mean(dim=1)  # log2 of the geometric mean extent
    level = torch.floor(canonical_level + log_size - math.log2(canonical_size) + 1e-5)  # 1e-5: 56 is level 4 exactly
    return (level.clamp(first_level, first_level + num_levels - 1) - first_level).long()


def multilevel_roi_align(features: Sequence[torch.Tensor], strides: Sequence[int], boxes: Sequence[torch.Tensor],
                         output_size: int | Sequence[int], canonical_size: float = 56.0, canonical_level: int = 4,
                         sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign of each box on its pyramid level (:func:`box_levels`): ``features`` finest first (B, C, *S_l) with
    ``strides`` (powers of 2), ``boxes`` one (N_b, 2 * dims) tensor per image -> (sum N_b, C, *output_size)."""
    first = int(round(math.log2(strides[0])))
    values, order = [], []
    offset = 0
    for b, bx in enumerate(boxes):
        levels = box_levels(bx, len(features), first, canonical_size, canonical_level)
        for lvl, (feat, stride) in enumerate(zip(features, strides)):
            idx = torch.nonzero(levels == lvl).view(-1)
            if idx.numel():
                values.append(roi_align(feat[b:b + 1], [bx[idx]], output_size, 1.0 / stride, sampling_ratio))
                order.append(idx + offset)
        offset += bx.shape[0]
    if not values:
        return features[0].new_zeros((0, features[0].shape[1], *_sizes(output_size, features[0].ndim - 2)))
    return torch.cat(values)[torch.argsort(torch.cat(order))]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Box-sized masks (N, *M) resampled (bilinear) into their boxes (N, 2 * dims) on an image grid ``shape``:
    (N, *shape), zero at voxels whose centre lies outside the box. The inverse of RoIAlign with ``aligned=True``."""
    dims = len(shape)
    out = masks.new_zeros((masks.shape[0], *shape))
    for i in range(masks.shape[0]):
        lo = [max(int(math.floor(float(boxes[i, a]))), 0) for a in range(dims)]
        hi = [min(int(math.ceil(float(boxes[i, a + dims]))), shape[a]) for a in range(dims)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        coords = []
        for a in range(dims):
            centre = torch.arange(lo[a], hi[a], device=masks.device, dtype=masks.dtype) + 0.5
            b0, b1 = boxes[i, a], boxes[i, a + dims]
            t = 2 * (centre - b0) / (b1 - b0).clamp_min(1e-6) - 1  # -1 .. 1 across the box
            view = [1] * dims
            view[a] = -1
            coords.append(t.view(view))
        crop = [h - l for l, h in zip(lo, hi)]
        grid = torch.stack([c.expand(crop) for c in reversed(coords)], dim=-1)[None]
        inside = torch.stack([(c.expand(crop) >= -1) & (c.expand(crop) < 1) for c in coords]).all(dim=0)
        vals = F.grid_sample(masks[i][None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        region = tuple(slice(l, h) for l, h in zip(lo, hi))
        out[(i, *region)] = vals[0, 0] * inside
    return out
