"""Sliding-window inference: run a network over planned windows and stitch the blended outputs.

Less work than evaluating windows over the whole array, same answer where it matters:

* the array is cropped to the bounding box of its foreground (non-zero voxels of any channel, or a given
  ``mask``) and the result pasted back;
* windows that contain no foreground voxel are not evaluated;
* window positions tile the crop with the fewest windows for the overlap (:mod:`medseg.inference.windows`).

Every voxel covered by at least one evaluated window gets the weighted mean of those windows' outputs, exactly
as if nothing had been skipped (a skipped window holds no foreground voxel, so no foreground voxel ever lost a
contribution). Voxels outside every evaluated window get ``fill`` (the caller's background logits).

Windows run on ``device`` (GPU if asked) under ``torch.inference_mode()`` with optional autocast (CUDA fp16/bf16;
CPU bf16 where the CPU has AMX or AVX512-BF16); outputs are stitched on the same device, or on the CPU when the
volume is large, and a CUDA out-of-memory error while stitching on the GPU is retried with CPU stitching.

A model with one spatial axis fewer than the image (a 2D model on a volume) predicts slice by slice: windows
are one slice thick along ``slice_axis`` and batches of slices go through the model together.

Example:
    >>> import torch
    >>> net = torch.nn.Conv3d(2, 3, 3, padding=1)
    >>> out = sliding_window(net, torch.randn(2, 40, 36, 20), InferenceSettings(roi_size=(24, 24, 16)))
    >>> tuple(out.shape)
    (3, 40, 36, 20)
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from medseg.errors import MedsegError, check_choice
from medseg.runtime import PRECISIONS, cpu_has_bf16, resolve_device, resolve_precision  # noqa: F401  (re-exported)
from medseg.inference import windows as W

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class InferenceSettings:
    """How to run sliding-window inference.

    Attributes:
        roi_size: window size per spatial axis of the model (2 values for a 2D model, 3 for a 3D model); ``None``
            only in a pipeline file, where it means the training patch size.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        blend: ``"gaussian"`` (centre-weighted) or ``"constant"`` (plain mean).
        sigma_scale: Gaussian sigma as a fraction of the window size.
        sw_batch_size: windows per forward pass.
        tta: average over all mirrorings of the spatial axes (``2**spatial_dims`` passes).
        amp: mixed precision, one of :data:`medseg.runtime.PRECISIONS`: ``"auto"`` (bf16 on CUDA and on CPUs with
            AMX/AVX512-BF16, fp16 on GPUs without bf16, else float32), ``"bf16"``, ``"fp16"`` (CUDA) or ``"off"``.
        device: where windows run: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        stitch: where outputs are accumulated: ``"auto"`` (on the device unless the volume is large), ``"device"`` or ``"cpu"``.
        crop_foreground: window only the bounding box of the foreground.
        skip_empty: do not evaluate windows without a foreground voxel.
        channels_last: under CPU bf16 autocast, feed windows in channels-last memory format (oneDNN's fast
            bf16 kernels; give the model ``.to(memory_format=torch.channels_last_3d)`` too — the Predictor does).
            It is slower in fp32 on CPU, so it is not used there.
        slice_axis: the axis a 2D model slices a volume along.
    """

    roi_size: Optional[tuple[int, ...]] = None
    overlap: float = 0.5
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch_size: int = 2
    tta: bool = False
    amp: str = "auto"
    device: str = "auto"
    stitch: str = "auto"
    crop_foreground: bool = True
    skip_empty: bool = True
    channels_last: bool = True
    slice_axis: int = -1

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", tuple(int(r) for r in self.roi_size))
        if self.roi_size is not None and (len(self.roi_size) not in (2, 3) or min(self.roi_size) < 1):
            raise MedsegError(f"roi_size {self.roi_size}: give 2 (2D model) or 3 (3D model) positive sizes")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise MedsegError(f"overlap {self.overlap} must be within [0, 1), e.g. 0.5")
        for name, value, allowed in (("blend", self.blend, W.BLENDS), ("amp", self.amp, PRECISIONS), ("stitch", self.stitch, W.STITCH_MODES)):
            check_choice(value, allowed, name)
        if int(self.sw_batch_size) < 1:
            raise MedsegError(f"sw_batch_size {self.sw_batch_size} must be >= 1")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None``: float32), by :func:`medseg.runtime.resolve_precision`."""
    return resolve_precision(amp, device).dtype


def sliding_window(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray,
                   settings: InferenceSettings, *, mask: np.ndarray | torch.Tensor | None = None,
                   fill: float | Sequence[float] = 0.0) -> torch.Tensor:
    """Blended network outputs ``(K, *spatial)`` float32 for one image ``(C, *spatial)``.

    Args:
        model: maps ``(B, C, *roi)`` to ``(B, K, *roi)``; put it in eval mode and on ``settings.device`` first.
        image: ``(C, *spatial)``; 2 or 3 spatial axes.
        settings: see :class:`InferenceSettings`.
        mask: foreground ``(*spatial)`` (bool); default: voxels non-zero in any channel. Only used when
            ``settings.crop_foreground`` or ``settings.skip_empty``.
        fill: output value (per output channel, or one for all) where no window was evaluated; pass the
            background logits of the model.

    Returns:
        A tensor on the stitching device (the CPU unless stitching on a GPU).
    """
    image = torch.as_tensor(image)
    if settings.roi_size is None:
        raise MedsegError("roi_size is not set: give the window size (--roi, or inference.roi_size in the pipeline)")
    if image.ndim not in (3, 4):
        raise MedsegError(f"image of shape {tuple(image.shape)}: expected (C, *spatial) with 2 or 3 spatial axes")
    device = resolve_device(settings.device)
    stitch = _stitch_device(settings, device, image)
    try:
        return _run(model, image, settings, mask, fill, device, stitch)
    except torch.cuda.OutOfMemoryError:
        if stitch.type != "cuda":
            raise
        log.warning("CUDA out of memory while stitching on the GPU; retrying with stitching on the CPU")
        torch.cuda.empty_cache()
        return _run(model, image, settings, mask, fill, device, torch.device("cpu"))


def _stitch_device(settings: InferenceSettings, device: torch.device, image: torch.Tensor) -> torch.device:
    if device.type != "cuda" or settings.stitch == "cpu":
        return torch.device("cpu")
    if settings.stitch == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = image[0].numel() * 4 * (image.shape[0] + 10)  # input + about 8 output channels + weights, float32
    return device if need < 0.5 * free else torch.device("cpu")


@dataclass(frozen=True)
class _Layout:
    """Where the windowed region sits: crop box in the image, padding of the crop, window size and positions."""

    box: W.Box
    pad: tuple[tuple[int, int], ...]
    roi: tuple[int, ...]
    starts: list[tuple[int, ...]]
    slice_axis: int | None  # axis squeezed for a 2D model on a volume


def plan_layout(shape: Sequence[int], settings: InferenceSettings, mask: np.ndarray | None) -> _Layout:
    """Crop box, padding and windows for an image of spatial ``shape`` (pure: no model, no tensors)."""
    ndim = len(shape)
    roi = settings.roi_size
    slice_axis = None
    if len(roi) == ndim - 1:
        slice_axis = settings.slice_axis % ndim
        roi = roi[:slice_axis] + (1,) + roi[slice_axis:]
    elif len(roi) != ndim:
        raise MedsegError(f"roi_size {settings.roi_size} is for a {len(roi)}D model but the image has {ndim} spatial axes")
    use_mask = mask is not None and mask.any() and not mask.all()
    box = W.foreground_box(mask, roi) if use_mask and settings.crop_foreground else tuple((0, int(n)) for n in shape)
    crop_shape = [b - a for a, b in box]
    pad = W.symmetric_padding(crop_shape, roi)
    padded = [n + a + b for n, (a, b) in zip(crop_shape, pad)]
    starts = W.plan_windows(padded, roi, settings.overlap)
    if use_mask and settings.skip_empty:
        sub = mask[tuple(slice(a, b) for a, b in box)]
        sub = np.pad(sub, pad) if any(p != (0, 0) for p in pad) else sub
        starts = W.windows_with_foreground(starts, roi, sub)
    return _Layout(box, pad, roi, starts, slice_axis)


def _mask_of(image: torch.Tensor, mask, settings: InferenceSettings) -> np.ndarray | None:
    if not (settings.crop_foreground or settings.skip_empty):
        return None
    if mask is None:
        return (image != 0).any(0).cpu().numpy()
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if mask.shape != tuple(image.shape[1:]):
        raise MedsegError(f"mask shape {mask.shape} does not match the image's spatial shape {tuple(image.shape[1:])}")
    return mask


def _run(model, image, settings, mask, fill, device, stitch) -> torch.Tensor:
    layout = plan_layout(tuple(image.shape[1:]), settings, _mask_of(image, mask, settings))
    crop = image[(slice(None), *(slice(a, b) for a, b in layout.box))]
    if any(p != (0, 0) for p in layout.pad):
        crop = torch.nn.functional.pad(crop, [v for p in reversed(layout.pad) for v in p])
    crop = crop.to(device=device, dtype=torch.float32)
    weights = _weights(layout.roi, settings).to(stitch)
    acc, wsum = None, torch.zeros((1, *crop.shape[1:]), dtype=torch.float32, device=stitch)
    dtype = autocast_dtype(settings.amp, device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    memory_format = channels_last_format(len(layout.roi) - (layout.slice_axis is not None)) \
        if settings.channels_last and device.type == "cpu" and dtype == torch.bfloat16 else None
    with torch.inference_mode(), amp:
        for batch in _batches(layout.starts, settings.sw_batch_size):
            regions = [W.window_slices(s, layout.roi) for s in batch]
            x = torch.stack([crop[(slice(None), *r)] for r in regions])
            y = _forward(model, x, settings.tta, layout.slice_axis, memory_format).to(stitch, torch.float32)
            if acc is None:
                acc = torch.zeros((y.shape[1], *crop.shape[1:]), dtype=torch.float32, device=stitch)
            for r, out in zip(regions, y):
                acc[(slice(None), *r)] += out * weights
                wsum[(slice(None), *r)] += weights
    return _assemble(acc, wsum, layout, tuple(image.shape[1:]), fill, stitch)


def _weights(roi: tuple[int, ...], settings: InferenceSettings) -> torch.Tensor:
    if settings.blend == "constant":
        return torch.ones(roi, dtype=torch.float32)
    return torch.from_numpy(W.gaussian_weights(roi, settings.sigma_scale))


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _forward(model, x: torch.Tensor, tta: bool, slice_axis: int | None, memory_format) -> torch.Tensor:
    """Model output for windows ``(B, C, *roi)``, mirrored TTA averaged; 2D models get the slice axis squeezed."""
    if slice_axis is not None:
        x = x.squeeze(2 + slice_axis)
    spatial = tuple(range(2, x.ndim))
    flips = [()]
    if tta:
        flips = [c for k in range(len(spatial) + 1) for c in itertools.combinations(spatial, k)]
    total = None
    for axes in flips:
        xi = torch.flip(x, axes) if axes else x
        if memory_format is not None:
            xi = xi.contiguous(memory_format=memory_format)
        y = model(xi)
        if not isinstance(y, torch.Tensor) or y.shape[2:] != x.shape[2:]:
            got = type(y).__name__ if not isinstance(y, torch.Tensor) else tuple(y.shape)
            raise MedsegError(f"the model returned {got} for windows {tuple(xi.shape)}; it must return (B, K, *window) tensors")
        y = y.float()
        y = torch.flip(y, axes) if axes else y
        total = y if total is None else total + y
    total = total / len(flips)
    return total.unsqueeze(2 + slice_axis) if slice_axis is not None else total


def _assemble(acc, wsum, layout: _Layout, shape: tuple[int, ...], fill, device) -> torch.Tensor:
    if acc is None:  # nothing to evaluate cannot happen with a non-empty plan; keep a clear error
        raise MedsegError("no window was evaluated; the image has no foreground voxel")
    k = acc.shape[0]
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=device).reshape(-1)
    if fill_t.numel() not in (1, k):
        raise MedsegError(f"fill has {fill_t.numel()} values but the model gives {k} output channels")
    fill_t = fill_t.expand(k).reshape((k,) + (1,) * len(shape))
    covered = wsum > 0
    out_crop = torch.where(covered, acc / wsum.clamp_min(1e-12), fill_t)
    inner = tuple(slice(before, before + hi - lo) for (before, _), (lo, hi) in zip(layout.pad, layout.box))
    out_crop = out_crop[(slice(None), *inner)]
    if tuple(out_crop.shape[1:]) == shape:
        return out_crop.contiguous()
    out = fill_t.expand((k, *shape)).clone()
    out[(slice(None), *(slice(a, b) for a, b in layout.box))] = out_crop
    return out
