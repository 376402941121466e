"""From probabilities to a label map, and the usual clean-ups of tumour label maps.

* :func:`to_labels` — regions (sigmoid per region) are thresholded and painted innermost-last with
  ``scheme.from_regions``; labels (softmax over classes 0..K) take the argmax, mapped with ``scheme.from_indices``;
* :func:`remove_small_components` — connected components of the foreground smaller than a size become background;
* :func:`keep_largest_component` — a region (or class) reduced to its largest connected component (nnU-Net's
  postprocessing, applied only where cross-validation shows it helps: ``medseg train --folds all`` chooses it);
* :func:`relabel_small_enhancing` — the BraTS rule: when fewer than N voxels are enhancing tumour (ET), they are
  relabelled as necrotic core (NCR), since a handful of ET voxels is more often a false positive than a lesion;
* :func:`crf_refine` — the probabilities refined by a dense CRF on the scan's intensities (``medseg predict --crf``,
  :mod:`medseg.classical.crf`), before threshold / argmax.

Sizes are counted in voxels of the grid the label map is on (the input scan's grid in ``medseg predict``).

Example:
    >>> from medseg.data.labels import get_scheme
    >>> lab = np.zeros((6, 6, 6), np.uint8); lab[0, 0, 0] = 2; lab[2:5, 2:5, 2:5] = 2; lab[3, 3, 3] = 4
    >>> out = postprocess(lab, get_scheme("brats"), PostprocessSettings(min_component_size=2, et_min_voxels=5))
    >>> int(out[0, 0, 0]), int(out[3, 3, 3])
    (0, 1)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.data.labels import LabelScheme
from medseg.errors import MedsegError

TARGETS = ("regions", "labels")


@dataclass(frozen=True)
class PostprocessSettings:
    """Attributes:
        threshold: probability above which a region is present (``target="regions"``).
        min_component_size: remove foreground components with fewer voxels (0: keep all).
        et_min_voxels: relabel ET as NCR when the map has fewer ET voxels than this (0: never).
        largest_component: names of regions (schemes with regions) or classes kept as their largest connected
            component only.
    """

    threshold: float = 0.5
    min_component_size: int = 0
    et_min_voxels: int = 0
    largest_component: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "largest_component", tuple(str(n) for n in self.largest_component))
        if not 0.0 < float(self.threshold) < 1.0:
            raise MedsegError(f"threshold {self.threshold} must be within (0, 1), e.g. 0.5")
        if int(self.min_component_size) < 0 or int(self.et_min_voxels) < 0:
            raise MedsegError("min_component_size and et_min_voxels are voxel counts: give 0 (off) or a positive number")

    @classmethod
    def from_dict(cls, d: dict | None) -> "PostprocessSettings":
        """Settings from a checkpoint's ``inference`` dict (other keys are ignored)."""
        d = d or {}
        return cls(**{k: d[k] for k in ("threshold", "min_component_size", "et_min_voxels", "largest_component")
                      if d.get(k) is not None})


def to_labels(probabilities: np.ndarray, target: str, scheme: LabelScheme, threshold: float = 0.5) -> np.ndarray:
    """``(K, *spatial)`` probabilities -> label map ``(*spatial)`` in the scheme's values (uint8 when they fit)."""
    if target == "regions":
        if probabilities.shape[0] != len(scheme.regions):
            raise MedsegError(f"the model gives {probabilities.shape[0]} region maps but scheme '{scheme.name}' has "
                              f"{len(scheme.regions)} regions {list(scheme.regions)}; the checkpoint's label scheme does not match its model")
        return scheme.from_regions(probabilities, threshold)
    if target == "labels":
        indices = np.argmax(probabilities, axis=0)
        if not scheme.is_generic and probabilities.shape[0] != len(scheme.values):
            raise MedsegError(f"the model gives {probabilities.shape[0]} classes but scheme '{scheme.name}' has "
                              f"{len(scheme.values)} (background included); the checkpoint's label scheme does not match its model")
        return scheme.from_indices(indices)
    raise MedsegError(f"target '{target}' is not one of {TARGETS}")


def remove_small_components(labels: np.ndarray, min_size: int, connectivity: int = 1) -> np.ndarray:
    """Set foreground components (non-zero voxels, ``connectivity`` as in ``scipy.ndimage``) under ``min_size`` to 0."""
    if min_size <= 0:
        return labels
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    components, n = ndimage.label(labels != 0, structure=structure)
    if n == 0:
        return labels
    sizes = np.bincount(components.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[components]] = 0
    return out


def relabel_small_enhancing(labels: np.ndarray, scheme: LabelScheme, min_voxels: int) -> np.ndarray:
    """When fewer than ``min_voxels`` voxels are ET, relabel them NCR (needs a scheme with ET and NCR classes)."""
    if min_voxels <= 0:
        return labels
    if "ET" not in scheme.labels or "NCR" not in scheme.labels:
        raise MedsegError(f"the small-ET rule needs a tumour scheme with ET and NCR classes; scheme '{scheme.name}' has "
                          f"{list(scheme.labels) or 'no named classes'}: drop --et-min-voxels")
    et = labels == scheme.labels["ET"]
    count = int(et.sum())
    if count == 0 or count >= min_voxels:
        return labels
    out = labels.copy()
    out[et] = scheme.labels["NCR"]
    return out


def _largest(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_component(labels: np.ndarray, scheme: LabelScheme, names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Reduce each named region (or class) to its largest connected component (face connectivity).

    For a region, voxels cut away leave it and every region nested inside it (TC and ET outside the kept WT become
    background; NCR cut from TC stays in WT as oedema); for a class, they become background.
    """
    if not names:
        return labels
    if scheme.regions:
        unknown = [n for n in names if n not in scheme.regions]
        if unknown:
            raise MedsegError(f"largest_component: {unknown} are not regions of scheme '{scheme.name}' ({', '.join(scheme.regions)})")
        order = list(scheme.regions)
        masks = scheme.to_regions(labels)
        sets = [set(scheme.regions[n]) for n in order]
        for name in names:
            i = order.index(name)
            masks[i] = _largest(masks[i])
            for j, inner in enumerate(sets):
                if j != i and inner < sets[i]:
                    masks[j] &= masks[i]
        return scheme.from_regions(masks).astype(labels.dtype)
    out = labels.copy()
    for name in names:
        if name not in scheme.labels:
            raise MedsegError(f"largest_component: '{name}' is not a class of scheme '{scheme.name}' ({', '.join(scheme.labels)})")
        mask = labels == scheme.labels[name]
        out[mask & ~_largest(mask)] = 0
    return out


def crf_refine(probabilities: np.ndarray, images, target: str, **options) -> np.ndarray:
    """``(K, *spatial)`` probabilities on the grid of ``images`` (the scan's channel volumes) refined by a dense CRF
    (:func:`medseg.classical.crf.dense_crf`; ``options`` are its keyword arguments). Softmax classes
    (``target="labels"``) are refined jointly, sigmoid regions one at a time. A 2D image (one voxel thick) is refined
    in 2D."""
    from medseg.classical.crf import dense_crf

    first = images[0]
    image = np.stack([np.asarray(v.array, np.float32) for v in images], axis=-1)
    two_d = image.ndim == 4 and image.shape[2] == 1
    probs = probabilities[:, :, :, 0] if two_d else probabilities
    image = image[:, :, 0, :] if two_d else image
    spacing = first.spacing[:2] if two_d else first.spacing
    refined = dense_crf(image, probs, spacing=spacing, softmax=target == "labels", **options)
    return refined[:, :, :, None] if two_d else refined


def postprocess(labels: np.ndarray, scheme: LabelScheme, settings: PostprocessSettings) -> np.ndarray:
    """Small components removed, regions reduced to their largest component, then the small-ET rule applied."""
    labels = remove_small_components(labels, int(settings.min_component_size))
    labels = keep_largest_component(labels, scheme, tuple(settings.largest_component))
    return relabel_small_enhancing(labels, scheme, int(settings.et_min_voxels))
