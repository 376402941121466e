"""Intensity transforms of the augmentation (:mod:`medseg.data.augment`), in nnU-Net's order: Gaussian noise, Gaussian
blur, multiplicative brightness, contrast, [saturation, hue of RGB patches], simulated low resolution, gamma of the
inverted image, gamma.

Each transform takes the patch as a (C, *S) float32 tensor and the value :func:`medseg.data.augment.draw` chose for
it (per channel where the transform is per channel, ``None`` for a channel left alone), and may work in place.
:data:`INTENSITY` lists them as (field of :class:`medseg.data.augment.Params`, transform) in the order
:func:`medseg.data.augment.apply` runs them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _noise(x: torch.Tensor, value: tuple[float, int]) -> torch.Tensor:
    variance, seed = value
    generator = torch.Generator().manual_seed(seed)
    return x.add_(torch.randn(x.shape, generator=generator) * math.sqrt(variance))


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma)`` (mode reflect, truncate 4) as separable shifted sums: 6x faster."""
    r = int(4 * sigma + 0.5)
    if r == 0 or min(x.shape) <= r:
        return torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).tolist()
    for d, n in enumerate(x.shape):
        padded = torch.cat([x.narrow(d, 0, r).flip(d), x, x.narrow(d, n - r, r).flip(d)], d)
        out = padded.narrow(d, 0, n) * k[0]
        for t in range(1, 2 * r + 1):
            out.add_(padded.narrow(d, t, n), alpha=k[t])
        x = out
    return x


def _blur(x: torch.Tensor, sigmas: tuple) -> torch.Tensor:
    for c, sigma in enumerate(sigmas):
        if sigma is not None:
            x[c] = _gaussian(x[c], sigma)
    return x


def _brightness(x: torch.Tensor, factors: tuple) -> torch.Tensor:
    return x.mul_(torch.tensor(factors, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1)))


def _contrast(x: torch.Tensor, factors: tuple) -> torch.Tensor:
    for c, factor in enumerate(factors):
        lo, hi, mean = x[c].min(), x[c].max(), x[c].mean()
        x[c] = ((x[c] - mean) * factor + mean).clamp_(lo, hi)
    return x


# RGB -> YIQ (NTSC). Row 0 is the luma of ITU-R BT.601; rows 1 and 2 sum to 0, so greys have I = Q = 0.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def _colour(x: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Each pixel's (R, G, B) times ``matrix``, clipped to [0, 1] — or to the patch's own range where that is wider
    (values over 1 from brightness, or an image not normalized with ``rgb``, are not cut by the clip)."""
    lo, hi = min(0.0, float(x.min())), max(1.0, float(x.max()))
    m = torch.tensor(matrix, dtype=x.dtype)
    return torch.tensordot(m, x, dims=1).clamp_(lo, hi)


def _saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend each pixel with its grey value (luma) by ``factor``: 0 grey, 1 unchanged, > 1 more saturated."""
    return _colour(x, factor * np.eye(3) + (1.0 - factor) * np.outer(np.ones(3), _YIQ[0]))


def _hue(x: torch.Tensor, turn: float) -> torch.Tensor:
    """Rotate each pixel's colour about the grey axis by ``turn`` of a full turn: a rotation of (I, Q) in YIQ
    space, which keeps the luma Y (before the clip) and leaves greys grey."""
    c, s = math.cos(2 * math.pi * turn), math.sin(2 * math.pi * turn)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _colour(x, np.linalg.solve(_YIQ, rotation @ _YIQ))


def _lowres(x: torch.Tensor, zooms: tuple) -> torch.Tensor:
    size = x.shape[1:]
    mode = "trilinear" if len(size) == 3 else "bicubic"
    for c, zoom in enumerate(zooms):
        if zoom is not None:
            small = F.interpolate(x[c][None, None], size=[max(1, round(s * zoom)) for s in size], mode="nearest")
            x[c] = F.interpolate(small, size=size, mode=mode, align_corners=False)[0, 0]
    return x


def _gamma(x: torch.Tensor, gammas: tuple, invert: bool = False) -> torch.Tensor:
    """nnU-Net's gamma: rescale to [0, 1], power, back to the channel's range, then restore its mean and std."""
    sign = -1.0 if invert else 1.0
    for c, gamma in enumerate(gammas):
        v = x[c] * sign
        mean, std, lo = v.mean(), v.std(correction=0), v.min()
        span = v.max() - lo + 1e-7
        v = ((v - lo) / span).pow_(gamma).mul_(span).add_(lo)
        v = (v - v.mean()) / (v.std(correction=0) + 1e-8) * std + mean
        x[c] = v * sign
    return x


INTENSITY = (  # (field of Params, transform), in nnU-Net's order
    ("noise", _noise),
    ("blur", _blur),
    ("brightness", _brightness),
    ("contrast", _contrast),
    ("saturation", _saturation),  # colour jitter of RGB patches (off by default)
    ("hue", _hue),
    ("lowres", _lowres),
    ("gamma_inverted", functools.partial(_gamma, invert=True)),
    ("gamma", _gamma),
)
