"""Validation during training: what ``medseg predict`` would write, scored by ``medseg.evaluation``.

Each validation case is segmented by the inference core (:class:`medseg.inference.predictor.Segmenter`: sliding
window with the pipeline's inference settings, probabilities inverted onto the scan's own grid, the pipeline's
postprocessing) and compared with its original label map on that grid by :func:`medseg.evaluation.compute_metrics`
(Dice only: surface distances are left to ``medseg evaluate``). So the numbers in ``metrics.csv`` are the Dice
that ``medseg predict`` + ``medseg evaluate`` give for the same model.

A cascade's refiner (a pipeline with ``cascade.localiser``) is validated as ``medseg predict`` runs it: its output is
kept within the margin of the localiser's foreground (:func:`localised`; the localiser's fold for a CV fold), once
the localiser exists; the regions averaged with the localiser (chosen later, by the CV) are not averaged here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from medseg.data.dataset import CaseData
from medseg.data.io import read_label
from medseg.data.labels import LabelScheme
from medseg.data.manifest import Case
from medseg.errors import MedsegError
from medseg.evaluation.metrics import MetricSettings, compute_metrics
from medseg.inference.predictor import Segmenter
from medseg.runtime import Precision
from medseg.training.config import Pipeline


@dataclass(frozen=True)
class ValidationCase:
    """A prepared case (``data``: image on the prepared grid and the inversion record) and its original label map."""

    data: CaseData
    label: np.ndarray
    spacing: tuple[float, ...]
    region: np.ndarray | None = None  # a cascade's: the output is kept within it (the label's grid)


def validation_cases(prepared: Sequence[CaseData], cases: Sequence[Case], scheme: LabelScheme | None = None) -> list[ValidationCase]:
    """Pair prepared cases with their original label maps, decoded by ``scheme`` (read once; cases without a
    label are left out)."""
    by_id = {c.id: c for c in cases}
    out = []
    for data in prepared:
        case = by_id[data.id]
        if case.label is None:
            continue
        vol = read_label(case.label, scheme)
        out.append(ValidationCase(data, np.asarray(vol.array), tuple(float(s) for s in vol.spacing)))
    return out


def localised(cases: Sequence[ValidationCase], manifest_cases: Sequence[Case], p: Pipeline) -> list[ValidationCase]:
    """``cases`` with the region of a cascade's localiser (module doc), or unchanged, with a warning, when the
    pipeline's localiser has not been trained yet."""
    from medseg.data.checks import warn
    from medseg.data.io import read_volume
    from medseg.checkpoint import for_fold
    from medseg.inference.cascade import FirstStage
    from medseg.inference.predictor import Predictor

    if not cases or not p.cascade.localiser:
        return list(cases)
    path = p.resolve(p.cascade.localiser)
    if not path.exists():
        warn([f"cascade.localiser {path} does not exist yet: validation scores the refiner alone over the whole image "
              "(far below what medseg predict gives once the first stage is trained)"])
        return list(cases)
    stage = FirstStage(Predictor.from_checkpoint(for_fold(path, p.data.val_fold), device=p.training.device),
                       p.cascade.margin_mm)
    channels = stage.localiser.loaded.channels
    by_id = {c.id: c for c in manifest_cases}
    out = []
    for case in cases:
        images = by_id[case.data.id].images
        missing = [ch for ch in channels if ch not in images]
        if missing:
            raise MedsegError(f"cascade.localiser {path} reads channel(s) {missing} that case {case.data.id} lacks")
        region, _ = stage.region([read_volume(images[ch]) for ch in channels])
        out.append(replace(case, region=region))
    return out


def segmenter_for(model: torch.nn.Module, p: Pipeline, scheme: LabelScheme, precision: Precision) -> Segmenter:
    """The inference core for ``model`` with the pipeline's settings, in the training's precision, without TTA."""
    settings = replace(p.inference, roi_size=p.roi_size, tta=False, amp=_amp_name(precision),
                       device=str(precision.device), channels_last=False)
    return Segmenter((model,), p.preprocessing, scheme, p.data.target, settings, p.postprocessing)


def _amp_name(precision: Precision) -> str:
    return {"fp32": "off"}.get(precision.name, precision.name)


def case_dice(segmenter: Segmenter, case: ValidationCase) -> dict[str, float]:
    """Dice per region (schemes with regions) or per class of one case, on the scan's own grid."""
    probabilities = segmenter.probabilities(case.data.image, case.data.geometry)
    if case.region is not None:
        from medseg.inference.cascade import restrict

        probabilities = restrict(probabilities, case.region, segmenter.target)
    labels = segmenter.labels(probabilities)
    which, kind = ("regions", "region") if segmenter.scheme.regions else ("classes", "class")
    table = compute_metrics(labels, case.label, case.spacing, segmenter.scheme, MetricSettings(distances=False, targets=(which,)))
    rows = table[table["kind"] == kind]
    return {str(t): float(d) for t, d in zip(rows["target"], rows["dice"])}


def validate(model: torch.nn.Module, cases: Sequence[ValidationCase], p: Pipeline, scheme: LabelScheme,
             precision: Precision) -> dict[str, float]:
    """Mean Dice per region/class over the validation cases (``dice_<name>``), plus ``dice_mean`` (their average)."""
    if not cases:
        return {}
    segmenter = segmenter_for(model, p, scheme, precision)
    was_training = model.training
    model.eval()
    try:
        per_case = [case_dice(segmenter, c) for c in cases]
    finally:
        model.train(was_training)
    names = [n for n in per_case[0] if n != "background"]
    out = {f"dice_{n}": float(np.mean([c[n] for c in per_case])) for n in names}
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in names]))
    return out
