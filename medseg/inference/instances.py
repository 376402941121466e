"""Objects from a semantic label map: connected components, or a marker-based watershed that splits touching ones.

``medseg predict --instances`` writes an instance label map (``<id>_instances.nii.gz`` / ``<id>_instances.png``,
uint16, or uint32 beyond 65,535 objects; 0 background, objects 1..N) beside the semantic one, on the same grid, and
``<id>_instances.json`` with each object's score, class and size. The objects come from

* ``components``: connected components of the chosen foreground (full connectivity: 8 neighbours in 2D, 26 in 3D);
* ``watershed``: the components are split by a watershed on the distance to the background (in mm, so anisotropic
  voxels are handled), flooded from markers at the distance maxima at least ``min_distance`` voxels apart (after a
  light smoothing, so a ragged edge does not make a marker); two touching discs become two objects;
* ``model``: an instance model's own objects (``maskrcnn``, ``yolact``), kept where their score reaches
  ``score_threshold``.

Objects smaller than ``min_size`` voxels (or ``min_volume_ml`` millilitres) are dropped. The foreground is every
non-background label by default, or one class or region (``target``: e.g. ``ET``, ``WT``, a class name). An object's
score is the mean foreground probability under it when probabilities are known (1 otherwise); an instance model
gives its own.

Example:
    >>> lab = np.zeros((40, 24), np.uint8)
    >>> yy, xx = np.mgrid[:40, :24]
    >>> lab[(yy - 12) ** 2 + (xx - 12) ** 2 <= 64] = 1; lab[(yy - 26) ** 2 + (xx - 12) ** 2 <= 64] = 1  # touching
    >>> int(semantic_instances(lab, InstanceSettings("components"))[0].max())
    1
    >>> int(semantic_instances(lab, InstanceSettings("watershed", min_distance=5))[0].max())
    2
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from medseg.data.labels import LabelScheme
from medseg.errors import MedsegError, check_choice

METHODS = ("auto", "components", "watershed", "model")


@dataclass(frozen=True)
class InstanceSettings:
    """How objects are made (see the module docstring). ``method="auto"``: the model's own objects for an instance
    model, connected components otherwise."""

    method: str = "auto"
    target: Optional[str] = None
    min_size: int = 0
    min_volume_ml: float = 0.0
    min_distance: int = 5
    score_threshold: float = 0.5
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "--instances")
        if self.min_size < 0 or self.min_volume_ml < 0 or self.min_distance < 1:
            raise MedsegError(f"instance settings: min_size {self.min_size} and min_volume_ml {self.min_volume_ml} must be >= 0 "
                              f"and min_distance {self.min_distance} >= 1 voxel")
        for name in ("score_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise MedsegError(f"instance settings: {name} {getattr(self, name)} must be within [0, 1)")


def foreground_of(labels: np.ndarray, scheme: LabelScheme | None, target: str | None) -> np.ndarray:
    """The mask the objects are taken from: every label but background, or one class / region of ``scheme``."""
    if target is None:
        return labels > 0
    if scheme is None:
        raise MedsegError(f"--instance-target {target}: needs the model's label scheme")
    if target in scheme.regions:
        return np.isin(labels, list(scheme.regions[target]))
    names = {str(k): v for k, v in scheme.labels.items()}
    if target in names:
        return labels == names[target]
    options = [*scheme.regions, *names]
    raise MedsegError(f"--instance-target {target}: scheme '{scheme.name}' has no class or region of that name; "
                      f"choose one of {', '.join(options)}")


def watershed_split(mask: np.ndarray, spacing: Sequence[float] | None = None, min_distance: int = 5) -> np.ndarray:
    """Instance map ``(*S)`` int32 of ``mask`` split by a watershed of its distance transform (markers: maxima of
    the smoothed distance at least ``min_distance`` voxels apart, one per component at least)."""
    try:
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed
    except ImportError:
        raise MedsegError("--instances watershed needs scikit-image: pip install scikit-image (or medseg[classical]); "
                          "--instances components works without it") from None

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * mask.ndim))[: mask.ndim]
    distance = ndimage.distance_transform_edt(mask, sampling=spacing)
    smooth = ndimage.gaussian_filter(distance, sigma=1.0) * mask
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    peaks = peak_local_max(smooth, min_distance=int(min_distance), labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    missing = np.setdiff1d(np.arange(1, n + 1), np.unique(components[markers > 0]))
    if missing.size:  # a component without a peak (a flat plateau) still becomes one object
        where = ndimage.maximum_position(smooth, components, missing)
        for k, pos in enumerate(where, start=len(peaks) + 1):
            markers[tuple(int(c) for c in pos)] = k
    return watershed(-smooth, markers, mask=mask).astype(np.int32)


def semantic_instances(labels: np.ndarray, settings: InstanceSettings = InstanceSettings(), *,
                       scheme: LabelScheme | None = None, spacing: Sequence[float] | None = None,
                       probabilities: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, float]]:
    """Objects of a label map ``(*S)``: an instance map (int32, ids 1..N) and ``{id: score}``.

    ``probabilities`` ``(K, *S)`` (softmax classes or sigmoid regions) give each object the mean foreground
    probability under it as its score: 1 - background for classes, the region's for regions.
    """
    from medseg.evaluation.objects import label_components, relabel_sequential

    method = "components" if settings.method in ("auto", "model") else settings.method
    mask = foreground_of(labels, scheme, settings.target)
    if method == "watershed":
        instances = watershed_split(mask, spacing, settings.min_distance)
        instances = drop_small(instances, settings, spacing)
    else:
        instances = label_components(mask, min_size=settings.min_size, spacing=spacing, min_volume_ml=settings.min_volume_ml)
    instances = relabel_sequential(instances).astype(np.int32)
    return instances, object_scores(instances, _foreground_probability(probabilities, scheme, settings.target))


def drop_small(instances: np.ndarray, settings: InstanceSettings, spacing: Sequence[float] | None) -> np.ndarray:
    """Objects below ``settings.min_size`` voxels or ``settings.min_volume_ml`` set to background."""
    sizes = np.bincount(instances.ravel())
    voxel_ml = float(np.prod(spacing[: instances.ndim])) / 1000.0 if spacing is not None else 0.0
    small = (sizes < settings.min_size) | (sizes * voxel_ml < settings.min_volume_ml if voxel_ml else False)
    small[0] = False
    return np.where(small[instances], 0, instances)


def _foreground_probability(probabilities: np.ndarray | None, scheme: LabelScheme | None, target: str | None) -> np.ndarray | None:
    if probabilities is None:
        return None
    if scheme is not None and scheme.regions and probabilities.shape[0] == len(scheme.regions):
        names = list(scheme.regions)
        return probabilities[names.index(target) if target in names else 0]  # WT is the outermost region
    if target is not None and scheme is not None:
        values = {str(k): v for k, v in scheme.labels.items()}
        if target in values:
            return probabilities[list(scheme.values).index(values[target])]
    return 1.0 - probabilities[0]


def object_scores(instances: np.ndarray, probability: np.ndarray | None) -> dict[int, float]:
    """``{id: mean of probability under the object}`` (1.0 each without a probability map)."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if probability is None:
        return {int(i): 1.0 for i in ids}
    sums = np.bincount(instances.ravel(), weights=probability.ravel(), minlength=int(ids.max(initial=0)) + 1)
    counts = np.bincount(instances.ravel(), minlength=sums.size)
    return {int(i): float(sums[i] / counts[i]) for i in ids}


def object_table(instances: np.ndarray, scores: dict[int, float], spacing: Sequence[float] | None,
                 classes: dict[int, int] | None = None) -> list[dict]:
    """Rows of ``<id>_instances.json``: id, score, class, voxels, volume in mL (3D) and the centre of mass in voxel
    coordinates."""
    ids = sorted(scores)
    if not ids:
        return []
    sizes = np.bincount(instances.ravel(), minlength=max(ids) + 1)
    centres = ndimage.center_of_mass(np.ones(instances.shape), instances, ids)
    voxel_ml = float(np.prod(spacing[: instances.ndim])) / 1000.0 if spacing is not None else float("nan")
    rows = []
    for i, centre in zip(ids, centres):
        row = {"id": int(i), "score": round(float(scores[i]), 6), "voxels": int(sizes[i]),
               "centre_of_mass": [round(float(c), 2) for c in centre]}
        if instances.ndim == 3:
            row["volume_ml"] = round(float(sizes[i]) * voxel_ml, 6)
        if classes:
            row["class"] = int(classes.get(i, 1))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- objects at prediction time
def check_settings(instances, instance_model: bool, model_path) -> InstanceSettings | None:
    """``predict(instances=...)`` (settings, a method name, True for auto, or None/False for no objects) as
    settings, checked against the kind of model."""
    if not instances:
        return None
    settings = instances if isinstance(instances, InstanceSettings) else InstanceSettings("auto" if instances is True else str(instances))
    if settings.method == "model" and not instance_model:
        raise MedsegError(f"--instances model: {model_path} is a semantic model; use components or watershed "
                          "(or a model trained with data.target: instances)")
    if instance_model and settings.method in ("auto", "model") and settings.target is not None:
        raise MedsegError(f"--instance-target {settings.target}: {model_path} is an instance model, whose objects are "
                          "all its classes; leave --instance-target out (or use --instances components to split one class)")
    return settings


def model_objects(model, image, out_channels: int, mask_threshold: float = 0.5,
                  score_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict[int, float], dict[int, int]]:
    """An instance model on a whole prepared image ``(C, *spatial)``: the semantic probabilities rendered from its
    objects ``(K, *spatial)``, the instance map, ``{id: score}`` and ``{id: class index}``. A 2D model on a volume
    (or on a 2D image stored ``W x H x 1``) runs per slice of the last axis; ids stay unique over slices, but objects
    are not linked across them."""
    import torch

    from medseg.models.instance import instance_map, render_semantic

    device = next(model.parameters()).device
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim - 1 == model.spatial_dims:
        slices = [image]
    elif image.ndim - 1 == model.spatial_dims + 1:
        slices = list(image.unbind(dim=-1))
    else:
        raise MedsegError(f"a {model.spatial_dims}D instance model cannot segment an image of shape {tuple(image.shape[1:])}")
    probs, maps, scores, classes = [], [], {}, {}
    for plane in slices:
        with torch.inference_mode():
            objects = model.predict_instances(plane[None].to(device))[0]
        probs.append(render_semantic(objects, out_channels, tuple(plane.shape[1:])).float().cpu().numpy())
        imap, sc, cl = instance_map(objects, mask_threshold, score_threshold)
        offset = len(scores)
        maps.append(np.where(imap > 0, imap + offset, 0).astype(np.int32))
        scores.update({i + offset: v for i, v in sc.items()})
        classes.update({i + offset: v for i, v in cl.items()})
    if len(slices) == 1 and image.ndim - 1 == model.spatial_dims:
        return probs[0], maps[0], scores, classes
    return np.stack(probs, axis=-1), np.stack(maps, axis=-1), scores, classes


def in_plane(array: np.ndarray, image2d: bool, spacing: Sequence[float], channels_first: bool = False
             ) -> tuple[np.ndarray, tuple[float, ...]]:
    """A 2D image's array ``(W, H, 1)`` (or ``(K, W, H, 1)``) as ``(W, H)`` with its pixel spacing, so objects are
    found in the plane; volumes unchanged."""
    axis = 3 if channels_first else 2
    if image2d and array.ndim == axis + 1 and array.shape[axis] == 1:
        return array[..., 0], tuple(spacing[:2])
    return array, tuple(spacing)


def write_object_table(path, case_id: str, objects: Sequence[dict], map_name: str, method: str, target: str | None):
    """``<id>_instances.json``: how the objects were made (``method``; ``target``: the class or region they are
    objects of, null = all foreground) and one entry per object (:func:`object_table`), atomically."""
    import json
    from pathlib import Path

    from medseg.atomic import write_text_atomic

    body = {"case": case_id, "instances": map_name, "method": method, "target": target, "objects": list(objects)}
    write_text_atomic(Path(path), json.dumps(body, indent=1))
    return Path(path)
