"""Data augmentation of training patches, after nnU-Net: spatial and intensity transforms of the patch.

Spatial: rotation, scaling (one factor for all axes), optional elastic deformation — one affine (+ displacement
field) resampled once with ``torch.nn.functional.grid_sample`` (linear for the image, nearest for a label of values,
linear for soft targets — a float label ``(R, *S)`` of region shares —, 0 outside the volume) — then mirroring
(exact flips), then quarter turns in the plane of the first two spatial axes (exact, off by default).
Intensity (:mod:`medseg.data.intensity`), in nnU-Net's order: Gaussian noise, Gaussian blur, multiplicative
brightness, contrast, [saturation, hue], simulated low resolution, gamma of the inverted image, gamma.

Photographs (RGB images in [0, 1], ``preprocessing.normalize: rgb``): brightness and contrast are the brightness and
contrast of a colour jitter; ``saturation_p`` / ``hue_p`` (off by default) add its saturation and hue — linear maps of
each pixel's (R, G, B) that keep its grey value (luma, 0.299 R + 0.587 G + 0.114 B), applied only to patches with
exactly 3 channels (skipped for any other count; :meth:`Augmentation.check` with ``channels`` refuses them there);
``rot90_p`` turns the patch by multiples of 90 degrees (for microscopy, where orientation is arbitrary).

Randomness is apart from computation: :func:`draw` takes every random choice from an injected
``numpy.random.Generator`` into a small :class:`Params`; :func:`apply` is a deterministic function of the patch and
the params. Augmentation acts on the patch, never on the whole volume: :func:`augment_patch` takes a view (no copy)
of the patch plus :func:`margin_for` voxels on each side, so that rotation and scaling find real data there rather
than padding; only the patch-sized output is computed. With no spatial transform drawn nothing is resampled.

The defaults of :class:`Augmentation` are nnU-Net v2's (``nnUNetTrainer.get_training_transforms``): the
probabilities are per sample; ``blur_channel_p`` / ``lowres_channel_p`` are per channel within a sample. The
transforms added for photographs (``rot90_p``, ``saturation_p``, ``hue_p``) default to 0 and, when 0, draw nothing:
a pipeline that leaves them off draws exactly the parameters it drew before they existed.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image, label = np.zeros((2, 40, 36, 30), np.float32), np.zeros((40, 36, 30), np.uint8)
    >>> img, lab = augment_patch(image, label, (20, 18, 15), (16, 16, 12), Augmentation(), rng)
    >>> img.shape, lab.shape
    ((2, 16, 16, 12), (16, 16, 12))
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medseg.data.intensity import INTENSITY
from medseg.data.sampling import crop_at, patch_start
from medseg.errors import MedsegError

Range = tuple[float, float]


@dataclass(frozen=True)
class Augmentation:
    """Settings of the augmentation (the ``augmentation:`` section of a pipeline); 0 turns a transform off.

    Ranges are ``[low, high]``, drawn uniformly. Factor ranges that contain 1 (``scale``, ``contrast``, ``gamma``)
    are drawn below 1 half of the time, as in nnU-Net. ``scale`` multiplies the sampling grid (> 1 zooms out).
    """

    enabled: bool = True
    rotation_p: float = 0.2
    rotation_3d: Range = (-30.0, 30.0)  # degrees, about each of the three axes
    rotation_2d: Range = (-180.0, 180.0)  # degrees
    scale_p: float = 0.2
    scale: Range = (0.7, 1.4)
    mirror_p: float = 0.5  # per axis
    mirror_axes: Optional[tuple[int, ...]] = None  # spatial axes; None: all of them
    rot90_p: float = 0.0  # off in nnU-Net; 90, 180 or 270 degrees in the plane of spatial axes 0, 1 (180 only if not square)
    elastic: bool = False  # off in nnU-Net v2
    elastic_p: float = 0.2
    elastic_magnitude: Range = (0.0, 2.5)  # displacement, voxels (standard deviation)
    elastic_sigma: Range = (9.0, 13.0)  # smoothness of the displacement field, voxels
    noise_p: float = 0.1
    noise_variance: Range = (0.0, 0.1)
    blur_p: float = 0.2
    blur_channel_p: float = 0.5
    blur_sigma: Range = (0.5, 1.0)  # voxels
    brightness_p: float = 0.15
    brightness: Range = (0.75, 1.25)  # multiplier per channel
    contrast_p: float = 0.15
    contrast: Range = (0.75, 1.25)  # per channel, clipped to the channel's range
    saturation_p: float = 0.0  # off in nnU-Net; RGB patches only (3 channels, normalize: rgb)
    saturation: Range = (0.7, 1.3)  # factor: 0 grey, 1 unchanged, > 1 more saturated
    hue_p: float = 0.0  # off in nnU-Net; RGB patches only (3 channels, normalize: rgb)
    hue: Range = (-0.05, 0.05)  # fraction of a full turn of the colour wheel (rotation about the grey axis, YIQ)
    lowres_p: float = 0.25
    lowres_channel_p: float = 0.5
    lowres_zoom: Range = (0.5, 1.0)
    gamma_p: float = 0.3
    gamma_inverted_p: float = 0.1
    gamma: Range = (0.7, 1.5)  # per channel; range and mean/std of the channel kept

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # built in Python with lists: keep the settings hashable
                object.__setattr__(self, f.name, value := tuple(value))
            if f.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise MedsegError(f"augmentation.{f.name}: {value} is a probability: choose a value within [0, 1] (0 turns it off)")
            if f.type == "Range" and (len(value) != 2 or value[0] > value[1]):
                raise MedsegError(f"augmentation.{f.name}: {list(value)} must be a range [low, high] with low <= high")
        positive = {"scale": self.scale, "gamma": self.gamma, "lowres_zoom": self.lowres_zoom, "elastic_sigma": self.elastic_sigma}
        for name, (lo, _) in positive.items():
            if lo <= 0:
                raise MedsegError(f"augmentation.{name}: {list(getattr(self, name))} must be positive")
        for name in ("noise_variance", "blur_sigma", "elastic_magnitude", "brightness", "contrast", "saturation"):
            if getattr(self, name)[0] < 0:
                raise MedsegError(f"augmentation.{name}: {list(getattr(self, name))} must not be negative")
        if self.lowres_zoom[1] > 1:
            raise MedsegError(f"augmentation.lowres_zoom: {list(self.lowres_zoom)} must be within (0, 1] (1: full resolution)")
        if self.hue[0] < -0.5 or self.hue[1] > 0.5:
            raise MedsegError(f"augmentation.hue: {list(self.hue)} must be within [-0.5, 0.5] (a fraction of a full turn)")

    def check(self, spatial_dims: int, channels: Optional[int] = None) -> None:
        """``mirror_axes`` must name spatial axes of a ``spatial_dims``-D patch; with ``channels`` (the images'
        channel count, when known), saturation and hue need exactly 3 (RGB). :func:`draw` checks only the axes: it
        skips saturation and hue for patches that are not 3-channel."""
        axes = self.mirror_axes or ()
        if any(a not in range(spatial_dims) for a in axes) or len(set(axes)) != len(axes):
            raise MedsegError(f"augmentation.mirror_axes: {list(axes)} must be distinct spatial axes among {list(range(spatial_dims))} for a {spatial_dims}D model")
        colour = [name for name in ("saturation_p", "hue_p") if getattr(self, name) > 0]
        if channels is not None and channels != 3 and self.enabled and colour:
            raise MedsegError(f"augmentation.{colour[0]}: saturation and hue need RGB images (3 channels, normalize: rgb) "
                              f"but the images have {channels} channel(s); set {' and '.join(colour)} to 0")


@dataclass(frozen=True)
class Params:
    """What :func:`draw` chose for one sample; ``None`` means the transform was not drawn.

    Per-channel tuples hold ``None`` for channels left alone. Seeds make noise fields reproducible.
    """

    rotation: Optional[tuple[float, ...]] = None  # radians: one angle in 2D, about axes 0, 1, 2 in 3D
    scale: Optional[float] = None
    elastic: Optional[tuple[float, float, int]] = None  # (magnitude, sigma, seed)
    noise: Optional[tuple[float, int]] = None  # (variance, seed)
    blur: Optional[tuple[Optional[float], ...]] = None  # sigma per channel
    brightness: Optional[tuple[float, ...]] = None
    contrast: Optional[tuple[float, ...]] = None
    lowres: Optional[tuple[Optional[float], ...]] = None  # zoom per channel
    gamma_inverted: Optional[tuple[float, ...]] = None
    gamma: Optional[tuple[float, ...]] = None
    mirror: tuple[int, ...] = ()  # spatial axes to flip
    rot90: int = 0  # quarter turns (np.rot90's k) from spatial axis 0 towards 1, after mirroring
    saturation: Optional[float] = None  # factor, RGB only
    hue: Optional[float] = None  # fraction of a turn, RGB only

    @property
    def spatial(self) -> bool:
        """True when the patch must be resampled (rotation, scaling or elastic deformation)."""
        return self.rotation is not None or self.scale is not None or self.elastic is not None


# ---------------------------------------------------------------------------------------------- drawing
def _factor(bounds: Range, rng: np.random.Generator) -> float:
    lo, hi = bounds
    below = rng.random() < 0.5
    if lo < 1.0 < hi:
        return float(rng.uniform(lo, 1.0) if below else rng.uniform(1.0, hi))
    return float(rng.uniform(lo, hi))


def _per_channel(p: float, channels: int, rng: np.random.Generator, value) -> Optional[tuple]:
    """``value()`` for each channel drawn with probability ``p``, ``None`` for the others."""
    return tuple(value() if rng.random() < p else None for _ in range(channels))


def draw(aug: Augmentation, spatial_dims: int, channels: int, rng: np.random.Generator,
         patch_size: Optional[Sequence[int]] = None) -> Params:
    """All random choices of one sample (probabilities per sample, values per channel where nnU-Net does so).

    ``patch_size``: the output size; quarter turns of 90 or 270 degrees need its first two sizes equal (otherwise,
    and without it, a drawn turn is 180 degrees). Saturation and hue are drawn only when ``channels == 3``. The
    transforms that are off by default are drawn last, and only when their probability is non-zero, so turning
    them on or off leaves every other choice (and the generator's state, when off) as it was.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    aug.check(spatial_dims)
    if not aug.enabled:
        return Params()
    hit = lambda p: rng.random() < p  # noqa: E731 - one uniform per decision, drawn in a fixed order
    seed = lambda: int(rng.integers(2**62))  # noqa: E731
    angles = aug.rotation_3d if spatial_dims == 3 else aug.rotation_2d
    rotation = tuple(np.deg2rad(rng.uniform(*angles, 3 if spatial_dims == 3 else 1)).tolist()) if hit(aug.rotation_p) else None
    scale = _factor(aug.scale, rng) if hit(aug.scale_p) else None
    elastic = None
    if aug.elastic and hit(aug.elastic_p):
        elastic = (float(rng.uniform(*aug.elastic_magnitude)), float(rng.uniform(*aug.elastic_sigma)), seed())
    noise = (float(rng.uniform(*aug.noise_variance)), seed()) if hit(aug.noise_p) else None
    blur = _per_channel(aug.blur_channel_p, channels, rng, lambda: float(rng.uniform(*aug.blur_sigma))) if hit(aug.blur_p) else None
    brightness = tuple(rng.uniform(*aug.brightness, channels).tolist()) if hit(aug.brightness_p) else None
    contrast = tuple(_factor(aug.contrast, rng) for _ in range(channels)) if hit(aug.contrast_p) else None
    lowres = _per_channel(aug.lowres_channel_p, channels, rng, lambda: float(rng.uniform(*aug.lowres_zoom))) if hit(aug.lowres_p) else None
    gamma_inverted = tuple(_factor(aug.gamma, rng) for _ in range(channels)) if hit(aug.gamma_inverted_p) else None
    gamma = tuple(_factor(aug.gamma, rng) for _ in range(channels)) if hit(aug.gamma_p) else None
    axes = aug.mirror_axes if aug.mirror_axes is not None else range(spatial_dims)
    mirror = tuple(a for a in axes if hit(aug.mirror_p))
    rot90 = 0
    if aug.rot90_p > 0 and hit(aug.rot90_p):
        square = patch_size is not None and int(patch_size[0]) == int(patch_size[1])
        rot90 = int(rng.integers(1, 4)) if square else 2
    colour = channels == 3
    saturation = float(rng.uniform(*aug.saturation)) if colour and aug.saturation_p > 0 and hit(aug.saturation_p) else None
    hue = float(rng.uniform(*aug.hue)) if colour and aug.hue_p > 0 and hit(aug.hue_p) else None
    return Params(rotation, scale, elastic, noise, blur, brightness, contrast, lowres, gamma_inverted, gamma, mirror,
                  rot90, saturation, hue)


# ---------------------------------------------------------------------------------------------- spatial
def _rotation(angles: Sequence[float]) -> np.ndarray:
    """(D, D) rotation: one angle in 2D; in 3D about axis 0, then 1, then 2."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        matrix = r @ matrix
    return matrix


@functools.lru_cache(maxsize=64)
def margin_for(patch_size: tuple[int, ...], aug: Augmentation) -> tuple[int, ...]:
    """Voxels to add on each side of the patch so that the largest rotation and scaling of ``aug`` sample real data.

    Computed from the corners of the patch under rotations on a grid over the angle range, at the largest scale
    (plus three standard deviations of the elastic displacement), plus one voxel for linear interpolation.
    """
    dims = len(patch_size)
    half = (np.asarray(patch_size, float) - 1) / 2
    if not aug.enabled:
        return (0,) * dims
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))
    reach = half.copy()
    if aug.rotation_p > 0:
        lo, hi = np.deg2rad(aug.rotation_3d if dims == 3 else aug.rotation_2d)
        grid = np.linspace(lo, hi, 13 if dims == 3 else 361)
        for angles in itertools.product(grid, repeat=3) if dims == 3 else ((a,) for a in grid):
            reach = np.maximum(reach, np.abs(corners @ _rotation(angles).T).max(axis=0))
    if aug.scale_p > 0:
        reach = reach * max(aug.scale[1], 1.0)
    if aug.elastic and aug.elastic_p > 0:
        reach = reach + 3 * aug.elastic_magnitude[1]
    return tuple(int(math.ceil(r - h)) + 1 for r, h in zip(reach, half))


def _displacement(elastic: tuple[float, float, int], out_size: tuple[int, ...]) -> torch.Tensor:
    """(*out_size, D) smooth random displacement, voxels, with standard deviation ``magnitude``."""
    magnitude, sigma, seed = elastic
    dims = len(out_size)
    k = max(1, int(sigma // 3))  # smooth at scale sigma: compute on a grid k times coarser, then interpolate
    coarse = tuple(-(-n // k) + 1 for n in out_size)
    noise = np.random.default_rng(seed).standard_normal((dims, *coarse)).astype(np.float32)
    field = torch.from_numpy(np.stack([ndimage.gaussian_filter(n, sigma / k) for n in noise]))
    field = F.interpolate(field[None], size=out_size, mode="trilinear" if dims == 3 else "bilinear", align_corners=True)[0]
    field = field * (magnitude / (float(field.std()) + 1e-8))
    return field.movedim(0, -1)


def _source_coords(params: Params, out_size: tuple[int, ...], start: Sequence[int]) -> list[torch.Tensor]:
    """Per input axis, the (*out_size) voxel coordinate in the input of each output voxel: the transform about the
    patch centre. Built by broadcasting one axis at a time (no meshgrid, no matrix product per voxel)."""
    dims = len(out_size)
    centre = (np.asarray(out_size, float) - 1) / 2
    matrix = (np.eye(dims) if params.rotation is None else _rotation(params.rotation)) * (params.scale or 1.0)
    origin = np.asarray(start, float) + centre
    axes = [(torch.arange(n, dtype=torch.float32) - float(c)).view([-1 if d == j else 1 for d in range(dims)])
            for j, (n, c) in enumerate(zip(out_size, centre))]
    coords = []
    for i in range(dims):
        c = axes[0] * float(matrix[i, 0]) + float(origin[i])
        for j in range(1, dims):
            c = c + axes[j] * float(matrix[i, j])
        coords.append(c.expand(out_size))
    if params.elastic is not None:  # displaced before the affine: x = origin + A (offset + d)
        field = _displacement(params.elastic, out_size)
        coords = [c + sum(float(matrix[i, j]) * field[..., j] for j in range(dims)) for i, c in enumerate(coords)]
    return coords


def _resample(image: np.ndarray, label: Optional[np.ndarray], coords: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """Linear resampling of ``image`` (C, *S) and nearest of ``label`` (*S) at ``coords``; 0 outside. A float
    ``label`` (R, *S) (soft targets) is resampled linearly, like the image."""
    shape = image.shape[1:]
    dims = len(shape)
    grid = torch.empty(*coords[0].shape, dims)
    for i, (c, n) in enumerate(zip(coords, shape)):  # align_corners=False; grid_sample wants the last axis first
        torch.add(c * (2.0 / n), 1.0 / n - 1.0, out=grid[..., dims - 1 - i])
    img = F.grid_sample(torch.from_numpy(image)[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if label is None:
        return img, None
    if _is_soft(label):
        soft = F.grid_sample(torch.from_numpy(np.ascontiguousarray(label, np.float32))[None], grid[None], mode="bilinear",
                             padding_mode="zeros", align_corners=False)[0]
        return img, soft.numpy()
    flat, inside, stride = None, None, 1
    for c, n in reversed(list(zip(coords, shape))):
        idx = torch.floor(c + 0.5)
        ok = (idx >= 0) & (idx <= n - 1)
        inside = ok if inside is None else inside & ok
        idx = idx.clamp_(0, n - 1).to(torch.int64) * stride
        flat, stride = idx if flat is None else flat + idx, stride * n
    lab = np.ascontiguousarray(label).reshape(-1)[flat.numpy()]
    lab[~inside.numpy()] = 0
    return img, lab


def _is_soft(label: np.ndarray) -> bool:
    """Soft targets (float shares with a leading channel axis) rather than label values."""
    return label.dtype.kind == "f"


# ---------------------------------------------------------------------------------------------- applying
def apply(image: np.ndarray, label: Optional[np.ndarray], params: Params, out_size: Sequence[int],
          start: Optional[Sequence[int]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The ``out_size`` patch at ``start`` of ``image``, transformed by ``params`` (deterministic).

    ``image``: (C, *S) float32, the patch plus its margin; ``label``: (*S) label values, (R, *S) float32 soft
    targets (each region's share of a voxel, resampled linearly), or None. ``start``: the
    patch's first voxel in ``image`` (default: centred; may lie outside, which reads as 0). Rotation and scaling
    are about the patch centre. Returns (C, *out_size) float32 and (*out_size) with the label's dtype; the inputs
    are not modified.
    """
    out_size = tuple(int(s) for s in out_size)
    if params.rot90 % 2 and out_size[0] != out_size[1]:
        raise ValueError(f"a quarter turn of {params.rot90 * 90} degrees needs a square patch in axes 0 and 1, got {out_size}")
    if start is None:
        start = tuple((s - o) // 2 for s, o in zip(image.shape[1:], out_size))
    if params.spatial:
        img, lab = _resample(image, label, _source_coords(params, out_size, start))
    else:
        img = torch.from_numpy(crop_at(image, start, out_size))
        lab = None if label is None else crop_at(label, start, out_size)
    for name, transform in INTENSITY:
        value = getattr(params, name)
        if value is not None:
            img = transform(img, value)
    lead = 0 if lab is None else lab.ndim - len(out_size)  # 1 for soft targets' channel axis
    if params.mirror:
        img = torch.flip(img, [a + 1 for a in params.mirror])
        lab = None if lab is None else np.ascontiguousarray(np.flip(lab, tuple(a + lead for a in params.mirror)))
    if params.rot90 % 4:
        img = torch.rot90(img, params.rot90, [1, 2]).contiguous()
        lab = None if lab is None else np.ascontiguousarray(np.rot90(lab, params.rot90, (lead, lead + 1)))
    return img.numpy(), lab


def augment_patch(image: np.ndarray, label: Optional[np.ndarray], centre: Sequence[int], patch_size: Sequence[int],
                  aug: Augmentation, rng: np.random.Generator) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The patch of ``patch_size`` around ``centre`` (placed as :func:`~medseg.data.sampling.crop_patch` does), augmented.

    ``image``: (C, *spatial) whole volume (or slice); only a view of the patch plus margin is read. ``label``:
    (*spatial) label values, (R, *spatial) float soft targets (float16 is read as float32), or None.
    """
    patch_size = tuple(int(s) for s in patch_size)
    params = draw(aug, len(patch_size), image.shape[0], rng, patch_size)
    start = patch_start(centre, image.shape[1:], patch_size)
    margin = margin_for(patch_size, aug) if params.spatial else (0,) * len(patch_size)
    lo = [max(0, a - m) for a, m in zip(start, margin)]
    hi = [min(n, a + p + m) for n, a, p, m in zip(image.shape[1:], start, patch_size, margin)]
    view = tuple(slice(a, b) for a, b in zip(lo, hi))
    lab = None if label is None else label[(Ellipsis, *view)]
    if lab is not None and _is_soft(lab) and lab.dtype != np.float32:
        lab = lab.astype(np.float32)
    region = image[(slice(None), *view)]
    if not region.flags.writeable:  # memory-mapped (data.cache: disk): read the patch and its margin once, here
        region, lab = np.array(region), None if lab is None else np.array(lab)
    return apply(region, lab, params, patch_size, tuple(a - b for a, b in zip(start, lo)))
