"""Validation during training: sliding-window inference on whole validation volumes, Dice per region/class."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from medseg.data.dataset import CaseData
from medseg.data.labels import LabelScheme
from medseg.training.config import Pipeline


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; both empty counts as 1 (the BraTS convention)."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (p + r)


def predict_labels(model: torch.nn.Module, image: np.ndarray, p: Pipeline, scheme: LabelScheme, device: torch.device,
                   autocast: dict | None) -> np.ndarray:
    """Label map (scheme values) for a prepared image ``(C, *spatial)`` by sliding-window inference.

    Uses the inference engine with the pipeline's inference settings, so validation measures what
    ``medseg predict`` will do (a 2D model runs slice by slice on the volume).
    """
    from medseg.inference.engine import InferenceSettings, sliding_window
    from medseg.inference.predictor import background_logits

    settings = InferenceSettings(roi_size=p.roi_size, overlap=p.inference.overlap, blend=p.inference.blend,
                                 sw_batch_size=p.inference.sw_batch_size, tta=False, amp="on" if autocast else "off",
                                 device=str(device), channels_last=False)
    k = len(scheme.regions) if p.data.target == "regions" else len(scheme.values)
    scores = sliding_window(model, torch.from_numpy(image), settings, fill=background_logits(p.data.target, k))
    scores = scores.float().cpu().numpy()
    if p.data.target == "regions":
        return scheme.from_regions(scores > 0.0)  # sigmoid(x) > 0.5  <=>  x > 0
    return scheme.from_indices(scores.argmax(0))


def case_scores(pred: np.ndarray, ref: np.ndarray, scheme: LabelScheme) -> dict[str, float]:
    """Dice per region (schemes with regions) or per class."""
    if scheme.regions:
        pr, rr = scheme.to_regions(pred), scheme.to_regions(ref)
        return {name: dice(pr[i], rr[i]) for i, name in enumerate(scheme.region_names)}
    return {name: dice(pred == v, ref == v) for name, v in scheme.labels.items()}


def validate(model: torch.nn.Module, cases: Iterable[CaseData], p: Pipeline, scheme: LabelScheme, device: torch.device,
             autocast: dict | None) -> dict[str, float]:
    """Mean Dice per region/class over the validation cases, plus ``mean`` (their average)."""
    per_case = []
    model.eval()
    with torch.inference_mode():
        for case in cases:
            pred = predict_labels(model, case.image, p, scheme, device, autocast)
            per_case.append(case_scores(pred, case.label, scheme))
    model.train()
    if not per_case:
        return {}
    names = list(per_case[0])
    out = {f"dice_{n}": float(np.mean([c[n] for c in per_case])) for n in names}
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in names]))
    return out
