"""A two-stage cascade: a full-resolution model that predicts only where a coarse model found the object.

nnU-Net's answer to volumes whose full-resolution patch sees too little of the image is a cascade: a low-resolution
model segments the whole image, a full-resolution model refines it. Here the second stage (the *refiner*) is an
ordinary pipeline at the fine spacing, trained on patches centred on the object (``sampling.foreground_fraction:
1.0``), and its pipeline names the first stage (the *localiser*, any run folder ``medseg predict`` accepts)::

    cascade:
      localiser: ../runs/brats_planned   # relative to the pipeline file; a CV folder localises fold K with its fold K
      margin_mm: 6.0                     # the refiner's output is kept within this distance of the localiser's
      average: []                        # regions (or classes) whose probabilities are the mean of both stages

``medseg predict --model REFINER`` runs the localiser on the scan (with its own settings and postprocessing), takes
its foreground dilated by ``margin_mm`` (millimetres, on the scan's grid), runs the refiner and sets its
probabilities to background outside that region, then thresholds and postprocesses as usual. The refiner never
sees a patch without object nearby in training, so outside the localiser's region its output is not trusted.
Everything happens on the scan's own grid, so the geometry of the output is the scan's.

The two stages are also two models of the same scan at two resolutions, and their mean can be better than either
(nnU-Net ensembles its configurations where cross-validation says so). ``average`` names the regions (or classes)
whose probabilities are the mean of the localiser's and the refiner's; cross-validation chooses the set of them
(every subset is scored, :func:`stage_mixes`) on the out-of-fold predictions (:func:`choose_mix`, stored with the
postprocessing choice in
``RUN/postprocessing.json``) and ``medseg predict`` applies the choice to the fold ensemble.

Example:
    >>> import numpy as np
    >>> labels = np.zeros((9, 9, 9), np.uint8); labels[4, 4, 4] = 2
    >>> int(region_of(labels, (1.0, 1.0, 1.0), 1.0).sum())  # the voxel and its 6 face neighbours
    7
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from medseg.errors import MedsegError

if TYPE_CHECKING:  # the predictor imports this module
    from medseg.inference.predictor import Predictor


@dataclass(frozen=True)
class CascadeSettings:
    """The ``cascade`` section of a pipeline: the localiser run and the margin around its foreground (mm)."""

    localiser: Optional[str] = None
    margin_mm: float = 6.0
    average: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "average", tuple(str(n) for n in (self.average or ())))
        if float(self.margin_mm) < 0:
            raise MedsegError(f"margin_mm: {self.margin_mm} must be >= 0 (millimetres around the localiser's foreground)")


def region_of(labels: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """The voxels within ``margin_mm`` (Euclidean, in millimetres on a grid of ``spacing``) of a non-zero label."""
    from scipy import ndimage

    fg = np.asarray(labels) != 0
    if not fg.any():
        return fg
    if margin_mm <= 0:
        return fg
    box = _box(fg, spacing, margin_mm)
    inside = np.zeros_like(fg)
    inside[box] = ndimage.distance_transform_edt(~fg[box], sampling=tuple(float(s) for s in spacing)) <= margin_mm
    return inside


def _box(fg: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...]:
    """The bounding box of ``fg`` grown by the margin (the distance transform is computed only there)."""
    idx = np.nonzero(fg)
    out = []
    for axis, s in enumerate(spacing):
        pad = int(np.ceil(margin_mm / float(s))) + 1
        out.append(slice(max(0, int(idx[axis].min()) - pad), min(fg.shape[axis], int(idx[axis].max()) + pad + 1)))
    return tuple(out)


def restrict(probabilities: np.ndarray, region: np.ndarray, target: str) -> np.ndarray:
    """``(K, *spatial)`` probabilities with background outside ``region``: every region channel 0 for sigmoid
    ``regions``, class 0 certain for softmax ``labels``."""
    if region.shape != probabilities.shape[1:]:
        raise MedsegError(f"cascade: the localiser's region {region.shape} and the refiner's probabilities "
                          f"{probabilities.shape[1:]} are not on one grid")
    out = np.array(probabilities, copy=True)
    outside = ~region
    out[:, outside] = 0.0
    if target != "regions":
        out[0, outside] = 1.0
    return out


def average_channels(names: Sequence[str], scheme, target: str, channels: int) -> list[int]:
    """The probability channels to average for ``names``: those regions of a ``regions`` model; for a softmax
    (``labels``) model every channel as soon as one class is named (a mean of distributions stays a distribution)."""
    available = list(scheme.regions) if target == "regions" else list(scheme.labels)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise MedsegError(f"cascade average {unknown}: not {'regions' if target == 'regions' else 'classes'} of label "
                          f"scheme '{scheme.name}' ({', '.join(map(str, available))})")
    if target == "regions":
        return [available.index(n) for n in names]
    return list(range(channels)) if names else []


def average_stages(refined: np.ndarray, localised: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """``refined`` with the given channels replaced by the mean of both stages' ``(K, *spatial)`` probabilities."""
    if refined.shape != localised.shape:
        raise MedsegError(f"cascade: the localiser's probabilities {localised.shape} and the refiner's {refined.shape} "
                          "differ; averaging needs models of the same label scheme and target")
    out = np.array(refined, copy=True)
    for c in channels:
        out[c] = 0.5 * (refined[c] + localised[c])
    return out


MAX_MIXES = 16  # all subsets of up to 4 regions; with more, none, each region alone and all (stage_mixes)


def stage_mixes(names: Sequence[str], per_region: bool = True) -> list[tuple[str, ...]]:
    """The combinations of the two stages the CV compares, each the tuple of regions averaged with the localiser
    (the others from the refiner alone): every subset of ``names``, none first, then by size in the scheme's order
    (past :data:`MAX_MIXES` subsets: none, each region alone, all); a softmax model's classes all or none
    (``per_region=False``: averaging one class of a distribution is not a distribution)."""
    from itertools import combinations

    names = tuple(names)
    if not per_region or not names:
        return [(), names] if names else [()]
    if 2 ** len(names) > MAX_MIXES:
        return [(), *((n,) for n in names), names]
    return [mix for size in range(len(names) + 1) for mix in combinations(names, size)]


def choose_mix(scores: dict[tuple[str, ...], dict[str, float]]) -> dict:
    """The mix (tuple of averaged regions -> mean out-of-fold Dice per region, each mix scored after the
    postprocessing chosen for it) with the highest mean over the regions; a tie goes to the mix listed first (fewer
    regions averaged). The regions nest (ET inside TC inside WT), so they are chosen together, from label maps made
    of each mix's probabilities, not one at a time. Returns ``{"average": [...], "mixes": [{"average", "dice"}]}``."""
    best = max(scores, key=lambda mix: np.mean(list(scores[mix].values())))  # the first of equal means
    return {"average": list(best), "mixes": [{"average": list(mix), "dice": dict(dice)} for mix, dice in scores.items()]}


def cascade_options(overrides: dict, chosen: dict, inference: dict) -> tuple[Optional[str], float, tuple[str, ...]]:
    """(localiser, margin_mm, average) of a refiner, popped from a prediction's ``overrides`` (``localiser``,
    ``localiser_margin_mm``, ``localiser_average``) and from the CV's ``chosen`` postprocessing, else the
    checkpoint's ``inference`` dict, else the defaults; in that order of precedence."""
    localiser = overrides.pop("localiser", None) or inference.get("localiser")
    margin = overrides.pop("localiser_margin_mm", None)
    average = overrides.pop("localiser_average", None)
    chosen_average = chosen.pop("localiser_average", None)
    if margin is None:
        margin = inference.get("localiser_margin_mm", CascadeSettings.margin_mm)
    if average is None:
        average = inference.get("localiser_average", ()) if chosen_average is None else chosen_average
    return localiser, float(margin), tuple(average or ())


@dataclass
class FirstStage:
    """A refiner's localiser (a :class:`~medseg.inference.predictor.Predictor`), its margin and the probability
    channels averaged with it."""

    localiser: "Predictor"
    margin_mm: float
    channels: tuple[int, ...] = ()

    @classmethod
    def attach(cls, refiner: "Predictor", localiser: "Predictor", margin_mm: float, average: Sequence[str] = ()) -> "FirstStage":
        """The first stage of ``refiner``, checked: same channels and dims, a semantic refiner, and for averaging
        the same target and label scheme."""
        ref, loc = refiner.loaded, localiser.loaded
        if loc.channels != ref.channels:
            raise MedsegError(f"localiser {loc.path} reads channels {list(loc.channels)}, the model {list(ref.channels)}; "
                              "a cascade's two stages read the same scan")
        if refiner.segmenter.instance_model:
            raise MedsegError(f"{ref.path} is an instance model; a cascade refines a semantic model's probabilities")
        if loc.spatial_dims != ref.spatial_dims:
            raise MedsegError(f"localiser {loc.path} is {loc.spatial_dims}D, the model {ref.spatial_dims}D; a cascade's "
                              "two stages must match")
        settings = CascadeSettings(margin_mm=margin_mm, average=tuple(average or ()))
        if settings.average and (loc.target != ref.target or loc.scheme.to_dict() != ref.scheme.to_dict()):
            raise MedsegError(f"cascade average {list(settings.average)}: localiser {loc.path} predicts {loc.target} of "
                              f"scheme '{loc.scheme.name}', the model {ref.target} of '{ref.scheme.name}'; only the same "
                              "outputs can be averaged")
        channels = average_channels(settings.average, ref.scheme, ref.target, refiner.segmenter.out_channels)
        localiser.probabilities = localiser.probabilities or bool(channels)
        return cls(localiser, float(settings.margin_mm), tuple(channels))

    def region(self, images) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Run the localiser on one scan's channels: the region within the margin of its foreground on the grid of
        ``images[0]``, and its ``(K, *spatial)`` probabilities there when channels are averaged (else None)."""
        found = self.localiser.predict_volumes(images)
        region = region_of(found.labels.array, images[0].spacing, self.margin_mm)
        probs = np.moveaxis(np.asarray(found.probabilities.array), -1, 0) if self.channels else None
        return region, probs

    def refine(self, probabilities: np.ndarray, localised: Optional[np.ndarray], region: np.ndarray, target: str) -> np.ndarray:
        """The refiner's ``(K, *spatial)`` probabilities averaged with the localiser's where chosen, then background
        outside the region."""
        if self.channels and localised is not None:
            probabilities = average_stages(probabilities, localised, self.channels)
        return restrict(probabilities, region, target)
