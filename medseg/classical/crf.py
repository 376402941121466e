"""Dense CRF refinement of a probability map (Krähenbühl & Koltun 2011, NeurIPS).

A fully connected CRF over the voxels: unary -log P(label) from the network (or any soft segmentation), pairwise
Potts terms with two Gaussian kernels,

    w_s exp(-|p_i - p_j|^2 / 2 theta_s^2)                                        smoothness
    w_a exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_I^2)         appearance (bilateral)

positions in mm (the voxel spacing), intensities of every channel scaled to 0..255 by their robust range; the
defaults (theta_s 3, w_s 3, theta_a 80, theta_I 13, w_a 10, 5 iterations) are those of the pydensecrf examples, not
tuned on any data set here. Mean-field
inference on the permutohedral lattice: ``pydensecrf2`` (a maintained build of Krähenbühl's code; its generic
``DenseCRF`` takes features of any dimension, so 3D volumes and any number of channels work). Probabilities that
do not sum to 1 over the channels (sigmoid regions, e.g. BraTS WT/TC/ET) are refined one region at a time as
binary problems. On large volumes only the bounding box of the uncertain voxels (plus a margin) is refined.

Example:
    >>> import numpy as np
    >>> image = np.zeros((40, 40, 1), np.float32); image[10:30, 10:30] = 1
    >>> p = np.clip(image[..., 0] * 0.6 + 0.2 + np.random.default_rng(0).normal(0, 0.15, (40, 40)), 0, 1)
    >>> q = dense_crf(image, np.stack([1 - p, p]))
    >>> int((q.argmax(0) == image[..., 0]).mean() > ((p > 0.5) == image[..., 0]).mean())
    1
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.classical import require
from medseg.classical.features import check_image
from medseg.classical.graph import bounding_box, unit_range
from medseg.errors import MedsegError


def _is_softmax(probs: np.ndarray) -> bool:
    return probs.shape[0] > 1 and bool(np.allclose(probs.sum(axis=0), 1.0, atol=1e-2))


def dense_crf(image: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float] | None = None, iterations: int = 5,
              smooth_sxy: float = 3.0, smooth_weight: float = 3.0, appearance_sxy: float = 80.0,
              appearance_srgb: float = 13.0, appearance_weight: float = 10.0, margin: int = 10,
              softmax: bool | None = None) -> np.ndarray:
    """Refined probabilities ``(K, *spatial)`` float32 for ``probabilities`` ``(K, *spatial)`` on the grid of
    ``image`` ``(*spatial, C)``. ``*_sxy`` in mm, ``appearance_srgb`` in intensity units of 0..255; ``softmax``:
    the channels are classes summing to 1 (None: detected), else independent regions."""
    image = check_image(image, "crf")
    probs = np.asarray(probabilities, np.float32)
    spatial = image.shape[:-1]
    if probs.ndim != len(spatial) + 1 or probs.shape[1:] != spatial:
        raise MedsegError(f"crf: probabilities of shape {probs.shape} do not fit the image grid {spatial}; give the "
                          "'<id>_prob.nii.gz' that medseg predict --probabilities wrote for this image")
    if not np.isfinite(probs).all() or probs.min() < -1e-4 or probs.max() > 1 + 1e-4:
        raise MedsegError("crf: the probability map holds values outside [0, 1]; give probabilities, not logits")
    softmax = _is_softmax(probs) if softmax is None else bool(softmax)
    if not softmax:
        out = np.empty_like(probs)
        for k in range(probs.shape[0]):
            out[k] = dense_crf(image, np.stack([1.0 - probs[k], probs[k]]), spacing, iterations, smooth_sxy, smooth_weight,
                               appearance_sxy, appearance_srgb, appearance_weight, margin, softmax=True)[1]
        return out
    uncertain = probs.max(axis=0) < 0.999
    if not uncertain.any():
        return probs.copy()
    box = bounding_box(uncertain, margin=int(margin))
    refined = _mean_field(image[box], probs[(slice(None),) + box], spacing, iterations, smooth_sxy, smooth_weight,
                          appearance_sxy, appearance_srgb, appearance_weight)
    out = probs.copy()
    out[(slice(None),) + box] = refined
    return out


def _mean_field(image, probs, spacing, iterations, smooth_sxy, smooth_weight, appearance_sxy, appearance_srgb, appearance_weight):
    dcrf = require("pydensecrf.densecrf", "crf")
    spatial = image.shape[:-1]
    k, n = probs.shape[0], int(np.prod(spatial))
    spacing = np.asarray(spacing if spacing is not None else (1.0,) * len(spatial), np.float32)
    crf = dcrf.DenseCRF(n, k)
    unary = -np.log(np.clip(probs, 1e-6, 1.0)).reshape(k, n)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    pos = np.indices(spatial, dtype=np.float32).reshape(len(spatial), n) * spacing[:, None]
    crf.addPairwiseEnergy(np.ascontiguousarray(pos / float(smooth_sxy), dtype=np.float32), compat=float(smooth_weight))
    colour = (unit_range(image) * 255.0).reshape(n, image.shape[-1]).T / float(appearance_srgb)
    feats = np.concatenate([pos / float(appearance_sxy), colour], axis=0)
    crf.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=float(appearance_weight))
    q = np.asarray(crf.inference(int(iterations)), np.float32)
    return q.reshape((k,) + spatial)
