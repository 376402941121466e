"""Preprocessing shared by training and inference, recorded in every run.

Steps, each optional and described by :class:`Preprocessing` (stored as a dict in checkpoints so that
``medseg predict`` applies exactly what training applied):

1. reorient to canonical axis codes (default ``RAS``): an exact permutation/flip of axes, no interpolation;
2. resample to a target spacing in mm — only when asked; or, for 2D images of varying sizes, to a fixed ``size`` in
   pixels (``[width, height]``: "resize", undone exactly by ``invert``). Images: (bi/tri)linear. Labels: each label
   value's mask resampled (bi/tri)linearly on the same sample positions as the image, then the value with the largest
   share per voxel (:func:`medseg.data.resample.resample_label`; nnU-Net's scheme). Nearest-neighbour resampling of a label is *not*
   aligned with the image when the grid halves: a new voxel sits between two old ones, and nearest picks one of
   them, shifting every label half an old voxel against the image;
3. crop to the bounding box of non-zero voxels in any channel (the head), plus a margin;
4. z-score each channel over its non-zero voxels (background stays 0; ``zscore``: over all voxels), in float64 so
   that extreme but finite values (a header scale factor of 1e34) cannot overflow, after pulling far outliers in to
   a fence of :data:`FENCE` times the 0.5-99.5 percentile range beyond those percentiles (a few corrupt voxels at
   1e34 then cannot flatten the rest of the scan; no voxel of a normal MRI or CT scan lies that far out, so normal
   data is normalised exactly as MONAI's ``NormalizeIntensity`` does, to float32 rounding);
   or, for CT (``normalize: ct``), clip each channel to fixed Hounsfield bounds and z-score it with a fixed mean
   and standard deviation (``ct_clip``, ``ct_mean``, ``ct_std``: the foreground 0.5/99.5 percentiles, mean and
   std of the training set, nnU-Net's CT scheme; ``medseg plan`` computes them);
   or, for photographs (``normalize: rgb``), scale each channel to [0, 1] by the largest value of its integer
   type — 255 for 8-bit, 65535 for 16-bit — with no per-image statistics, so that colour augmentation
   (``augmentation.saturation_p`` / ``hue_p``) acts on real colours and an image's brightness is kept. The type is
   the channel's array type when it is uint8 or uint16 (as images are read); otherwise (float or wider integer
   arrays) it is inferred from the values: the channel is divided by 255 when its maximum is <= 255, by 65535 when
   <= 65535, else by its own maximum (then the one per-image statistic). Values below 0 are kept (not clipped).

:meth:`Preprocessing.invert` maps an array on the prepared grid (class scores or labels) back to the exact
grid of the first input channel: un-crop (background outside), resample back, reorient back.

Example:
    >>> import numpy as np
    >>> from medseg.data.volume import Volume
    >>> vol = Volume(np.pad(np.ones((4, 5, 6), np.float32), 2), np.diag([-1.0, -1.0, 1.0, 1.0]))
    >>> pre = Preprocessing(orientation="RAS", crop_foreground=True, margin=0)
    >>> prepared = pre.apply([vol])
    >>> prepared.image.shape
    (1, 4, 5, 6)
    >>> pre.invert(prepared.image, prepared).shape
    (1, 8, 9, 10)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.resample import resample_label
from medseg.data.volume import Volume
from medseg.errors import MedsegError, check_choice


@dataclass(frozen=True)
class Prepared:
    """The output of :meth:`Preprocessing.apply` and what is needed to invert it.

    Attributes:
        image: ``(C, *spatial)`` float32 on the prepared grid.
        label: ``(*spatial)`` label map on the prepared grid, or ``None``.
        affine: voxel -> world affine of the prepared grid.
        original_shape / original_affine: the first channel's grid, where predictions are written.
        ornt: nibabel orientation transform from the original to the canonical axes.
        resampled_shape: spatial shape after reorientation and resampling, before cropping.
        bbox: ``(start, stop)`` per axis of the crop within the resampled grid.
        masks: ``(R, *spatial)`` float32 shares of the ``masks`` given to :meth:`Preprocessing.apply` on the
            prepared grid (soft targets), or ``None``.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    ornt: np.ndarray
    oriented_shape: tuple[int, ...]
    resampled_shape: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class Preprocessing:
    """Settings of the preprocessing chain (see module docs). ``spacing=None`` keeps the native spacing."""

    orientation: str | None = "RAS"
    spacing: tuple[float, ...] | None = None
    size: tuple[int, ...] | None = None  # resample to this shape on the first len(size) axes (2D: [width, height])
    crop_foreground: bool = True
    margin: int = 2
    normalize: str = "zscore_nonzero"
    ct_clip: tuple[tuple[float, float], ...] | None = None  # normalize: ct; per channel [low, high]
    ct_mean: tuple[float, ...] | None = None  # normalize: ct; per channel
    ct_std: tuple[float, ...] | None = None  # normalize: ct; per channel

    NORMALIZERS = ("zscore_nonzero", "zscore", "ct", "rgb", "none")

    def __post_init__(self) -> None:
        check_choice(self.normalize, self.NORMALIZERS, "preprocessing.normalize")
        self._check_ct()
        if self.orientation is not None and (len(self.orientation) != 3 or set(self.orientation.upper()) - set("RASLPI")):
            raise MedsegError(f"preprocessing.orientation: '{self.orientation}' is not a 3-letter code such as RAS or LPS")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
            if any(s <= 0 for s in self.spacing):
                raise MedsegError(f"preprocessing.spacing: {self.spacing} must be positive millimetres")
        if self.margin < 0:
            raise MedsegError("preprocessing.margin must be >= 0")
        if self.size is not None:
            if self.spacing is not None:
                raise MedsegError("preprocessing: give spacing (mm) or size (pixels), not both")
            try:
                size = tuple(int(v) for v in self.size)
            except (TypeError, ValueError):
                size = ()
            if not 1 <= len(size) <= 3 or any(v < 1 for v in size):
                raise MedsegError(f"preprocessing.size: {self.size!r} must be 1 to 3 positive sizes, e.g. [256, 256]")
            object.__setattr__(self, "size", size)

    def _check_ct(self) -> None:
        given = [k for k in ("ct_clip", "ct_mean", "ct_std") if getattr(self, k) is not None]
        if self.normalize != "ct":
            if given:
                raise MedsegError(f"preprocessing.{given[0]} is only used with normalize: ct; remove it or set normalize: ct")
            return
        if len(given) != 3:
            raise MedsegError("preprocessing.normalize: ct needs ct_clip, ct_mean and ct_std (one entry per channel); "
                              "'medseg plan' computes them from the training set")
        try:
            clip = tuple((float(lo), float(hi)) for lo, hi in self.ct_clip)
            mean, std = tuple(float(m) for m in self.ct_mean), tuple(float(s) for s in self.ct_std)
        except (TypeError, ValueError):
            raise MedsegError(f"preprocessing: ct_clip {self.ct_clip!r} must list one [low, high] pair per channel, "
                              f"ct_mean {self.ct_mean!r} and ct_std {self.ct_std!r} one number per channel") from None
        if not len(clip) == len(mean) == len(std):
            raise MedsegError(f"preprocessing: ct_clip ({len(clip)}), ct_mean ({len(mean)}) and ct_std ({len(std)}) "
                              "need one entry per channel each")
        if any(lo >= hi for lo, hi in clip) or any(s <= 0 for s in std):
            raise MedsegError(f"preprocessing: ct_clip {[list(c) for c in clip]} needs low < high, ct_std {list(std)} positive values")
        object.__setattr__(self, "ct_clip", clip)
        object.__setattr__(self, "ct_mean", mean)
        object.__setattr__(self, "ct_std", std)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing":
        d = dict(d or {})
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - allowed
        if unknown:
            raise MedsegError(f"preprocessing: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"] = list(self.spacing) if self.spacing else None
        d["size"] = list(self.size) if self.size else None
        for key in ("ct_clip", "ct_mean", "ct_std"):
            if d[key] is not None:
                d[key] = [list(v) if isinstance(v, tuple) else v for v in d[key]]
        return d

    # ------------------------------------------------------------------ forward
    def apply(self, images: Sequence[Volume], label: Volume | None = None, masks: np.ndarray | None = None) -> Prepared:
        """Channels (each a Volume on one grid) and an optional label -> :class:`Prepared`.

        ``masks``: ``(R, *spatial)`` 0/1 masks on the images' grid (a label's regions), reoriented and resampled
        exactly as the images (linearly, on the same sample positions) and cropped as the label, not normalised:
        each prepared voxel gets the share of it each mask covers (soft targets, ``data.soft_targets``)."""
        first = images[0]
        ndim = first.spatial_ndim
        dtypes = [np.asarray(v.array).dtype for v in images]  # before the float32 stack: normalize: rgb reads them
        stack = np.stack([np.asarray(v.array, dtype=np.float32) for v in images])
        lab = None if label is None else np.asarray(label.array)
        n_images = len(images)
        if masks is not None:  # resampled with the images, split off before cropping and normalising
            masks = np.asarray(masks, dtype=np.float32)
            if masks.shape[1:] != stack.shape[1:]:
                raise ValueError(f"masks of shape {masks.shape[1:]} do not match the images' grid {stack.shape[1:]}")
            stack = np.concatenate([stack, masks])
        affine = first.affine
        ornt = np.array([[i, 1] for i in range(ndim)], dtype=float)
        if self.orientation and ndim == 3:
            ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(self.orientation.upper()))
            stack = np.stack([nib.orientations.apply_orientation(c, ornt) for c in stack])
            lab = None if lab is None else nib.orientations.apply_orientation(lab, ornt)
            affine = affine @ nib.orientations.inv_ornt_aff(ornt, first.shape)
        oriented_shape = stack.shape[1:]
        if self.spacing is not None or self.size is not None:
            stack, lab, affine = self._resample(stack, lab, affine)
        resampled_shape = stack.shape[1:]
        stack, masks = (stack[:n_images], stack[n_images:]) if masks is not None else (stack, None)
        bbox = foreground_bbox(np.any(stack != 0, axis=0), self.margin) if self.crop_foreground else tuple((0, s) for s in resampled_shape)
        sl = tuple(slice(a, b) for a, b in bbox)
        stack = np.ascontiguousarray(stack[(slice(None), *sl)])
        lab = None if lab is None else np.ascontiguousarray(lab[sl])
        masks = None if masks is None else np.clip(masks[(slice(None), *sl)], 0.0, 1.0)
        shift = np.eye(4)
        shift[:ndim, 3] = [a for a, _ in bbox]
        affine = affine @ shift
        stack = self._normalize(stack, dtypes)
        return Prepared(stack, lab, affine, first.shape, first.affine.copy(), ornt, oriented_shape, resampled_shape, bbox, masks)

    def _resample(self, stack, lab, affine):
        ndim = stack.ndim - 1
        old_shape = np.asarray(stack.shape[1:], dtype=float)
        if self.size is not None:
            new_shape = tuple(int(self.size[i]) if i < len(self.size) else int(n) for i, n in enumerate(old_shape))
        else:
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[:ndim]
            new_shape = tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(old_shape, spacing, self.spacing[:ndim]))
        if new_shape == stack.shape[1:]:
            return stack, lab, affine
        mode = "trilinear" if ndim == 3 else "bilinear"
        stack = F.interpolate(torch.from_numpy(stack)[None], size=new_shape, mode=mode, align_corners=False)[0].numpy()
        if lab is not None:
            lab = resample_label(lab, new_shape)
        # with align_corners=False, new voxel i sits at old voxel (i + 0.5) * s - 0.5, s = old/new size
        scale = old_shape / np.asarray(new_shape, dtype=float)
        zoom = np.eye(4)
        zoom[:ndim, :ndim] = np.diag(scale)
        zoom[:ndim, 3] = 0.5 * scale - 0.5
        return stack, lab, affine @ zoom

    def _normalize(self, stack: np.ndarray, dtypes: Sequence[np.dtype] | None = None) -> np.ndarray:
        if self.normalize == "none":
            return stack
        if self.normalize == "ct":
            return self._normalize_ct(stack)
        if self.normalize == "rgb":
            return normalize_rgb(stack, dtypes)
        out = np.empty(stack.shape, np.float32)
        for c in range(stack.shape[0]):
            out[c] = zscore(stack[c], nonzero=self.normalize == "zscore_nonzero")
        return out

    def _normalize_ct(self, stack: np.ndarray) -> np.ndarray:
        """Clip each channel to ``ct_clip``, then z-score it with ``ct_mean`` / ``ct_std`` (every voxel, no mask)."""
        if len(self.ct_mean) != stack.shape[0]:
            raise MedsegError(f"preprocessing.ct_mean: CT statistics for {len(self.ct_mean)} channel(s) but the image has "
                              f"{stack.shape[0]}; give one ct_clip/ct_mean/ct_std entry per channel")
        out = np.empty(stack.shape, np.float32)
        for c, ((lo, hi), mean, std) in enumerate(zip(self.ct_clip, self.ct_mean, self.ct_std)):
            out[c] = (np.clip(stack[c], lo, hi) - mean) / std
        return out

    # ------------------------------------------------------------------ inverse
    def invert(self, array: np.ndarray, prepared: Prepared, *, order: str = "linear", fill: float = 0.0) -> np.ndarray:
        """``(K, *prepared spatial)`` -> ``(K, *original spatial)`` on the first channel's original grid.

        ``order="linear"`` for scores/probabilities, ``"nearest"`` for label maps. Voxels outside the crop
        get ``fill`` (background). ``fill`` may be a sequence with one value per channel.
        """
        k = array.shape[0]
        full = np.empty((k, *prepared.resampled_shape), dtype=array.dtype)
        full[...] = np.asarray(fill, dtype=array.dtype).reshape((-1,) + (1,) * len(prepared.resampled_shape)) if np.ndim(fill) else fill
        sl = tuple(slice(a, b) for a, b in prepared.bbox)
        full[(slice(None), *sl)] = array
        if tuple(prepared.resampled_shape) != tuple(prepared.oriented_shape):
            ndim = full.ndim - 1
            mode = ("trilinear" if ndim == 3 else "bilinear") if order == "linear" else "nearest"
            t = torch.from_numpy(np.ascontiguousarray(full).astype(np.float32))[None]
            kwargs = {"align_corners": False} if order == "linear" else {}
            full = F.interpolate(t, size=tuple(prepared.oriented_shape), mode=mode, **kwargs)[0].numpy().astype(array.dtype)
        if len(prepared.original_shape) == 3:
            inverse = _invert_ornt(prepared.ornt)
            full = np.stack([nib.orientations.apply_orientation(c, inverse) for c in full])
        return np.ascontiguousarray(full)


FENCE = 10.0  # zscore: values beyond the 0.5/99.5 percentiles by more than FENCE x their range are pulled in to there


def zscore(channel: np.ndarray, nonzero: bool = True) -> np.ndarray:
    """One channel z-scored over its non-zero voxels (``nonzero``; the others stay 0) or all voxels, as float32.

    Statistics in float64 (no overflow for values near float32's limit); values further than :data:`FENCE` times
    the 0.5-99.5 percentile range beyond those percentiles are clipped to that fence first. A constant channel is
    only shifted (standard deviation taken as 1), a channel without non-zero voxels is returned as it is.
    """
    x = np.asarray(channel)
    mask = x != 0 if nonzero else None
    values = (x[mask] if mask is not None else x.ravel()).astype(np.float64)
    if values.size == 0:
        return x.astype(np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    margin = FENCE * (hi - lo)
    if values.min() < lo - margin or values.max() > hi + margin:
        np.clip(values, lo - margin, hi + margin, out=values)
    mean, std = values.mean(), values.std()
    if not std > 0 or not np.isfinite(std):
        std = 1.0
    values = (values - mean) / std
    if mask is None:
        return values.astype(np.float32).reshape(x.shape)
    out = x.astype(np.float32, copy=True)
    out[mask] = values
    return out


def rgb_divisor(channel: np.ndarray, dtype: np.dtype | None = None) -> float:
    """What ``normalize: rgb`` divides a channel by: the largest value of its integer type (see module docs)."""
    if dtype is not None and np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16)):
        return float(np.iinfo(dtype).max)
    top = float(channel.max()) if channel.size else 0.0
    if top <= 255:
        return 255.0
    if top <= 65535:
        return 65535.0
    return top


def normalize_rgb(stack: np.ndarray, dtypes: Sequence[np.dtype] | None = None) -> np.ndarray:
    """``(C, *spatial)`` -> float32, each channel divided by :func:`rgb_divisor` (``dtypes``: the channels' array
    types before conversion to float, when known)."""
    out = np.empty(stack.shape, np.float32)
    for c in range(stack.shape[0]):
        out[c] = stack[c] / np.float32(rgb_divisor(stack[c], None if dtypes is None else dtypes[c]))
    return out


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``ornt`` (axis permutation + flips)."""
    inverse = np.zeros_like(ornt)
    for src, (dst, flip) in enumerate(ornt):
        inverse[int(dst)] = [src, flip]
    return inverse


def foreground_bbox(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of the bounding box of ``mask``, grown by ``margin`` within the array;
    the whole array when ``mask`` is empty."""
    shape = mask.shape
    if not mask.any():
        return tuple((0, s) for s in shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((max(0, int(idx[0]) - margin), min(shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(box)
