"""Trained models as ``medseg predict`` uses them: a checkpoint (or the folds of a cross-validation) loaded with
everything it records about its use (channels, label scheme, target, preprocessing, inference and postprocessing
settings), the ensemble check, and the settings of a prediction (the checkpoint's, then the user's overrides).

Example:
    >>> loaded = load_model("runs/unet3d")  # doctest: +SKIP
    >>> infer, post = settings_for(loaded, {"overlap": 0.25})  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from medseg.checkpoint import find_checkpoint, load_checkpoint
from medseg.data.labels import LabelScheme, get_scheme
from medseg.data.preprocess import Preprocessing
from medseg.errors import MedsegError
from medseg.inference.engine import InferenceSettings, resolve_device
from medseg.inference.postprocess import PostprocessSettings

SETTING_KEYS = {f.name for f in dataclasses.fields(InferenceSettings)}
POST_KEYS = {f.name for f in dataclasses.fields(PostprocessSettings)}


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode with everything its checkpoint says about using it."""

    model: torch.nn.Module
    config: dict
    channels: tuple[str, ...]
    scheme: LabelScheme
    target: str
    preprocessing: object  # medseg.data.preprocess.Preprocessing
    inference: dict
    path: Path
    fold: int | None = None  # the fold the model validated on (data.val_fold of its pipeline), None when unknown

    @property
    def spatial_dims(self) -> int:
        return int(self.config.get("spatial_dims", 3))


def build_model(config: dict) -> torch.nn.Module:
    """The network described by a checkpoint's ``model`` entry (through the model registry)."""
    from medseg.models import build_from_config

    return build_from_config(config)


def find_members(run_or_file: str | Path) -> list[Path]:
    """The checkpoints a model path names: a checkpoint file or run folder gives one; a cross-validation folder
    (``fold_0/``, ``fold_1/``, ... each a run written by ``medseg train --folds``) gives every fold's, an ensemble."""
    p = Path(run_or_file)
    if p.is_dir() and not (p / "checkpoints").is_dir():
        folds = sorted((d for d in p.glob("fold_*") if (d / "checkpoints").is_dir()), key=lambda d: d.name)
        if folds:
            return [find_checkpoint(d) for d in folds]
    return [find_checkpoint(p)]


def chosen_postprocessing(run_dir: str | Path) -> dict:
    """The postprocessing that cross-validation chose for a fold ensemble (``RUN/postprocessing.json``), or {}."""
    path = Path(run_dir) / "postprocessing.json"
    if not path.is_file():
        return {}
    import json

    try:
        return dict(json.loads(path.read_text())["postprocessing"])
    except (ValueError, KeyError, TypeError):
        raise MedsegError(f"{path}: not a postprocessing choice written by 'medseg train --folds all'; delete it or "
                          "run the cross-validation summary again") from None


def check_ensemble(members: Sequence[LoadedModel]) -> None:
    """Models averaged together must read the same channels the same way and predict the same labels."""
    first = members[0]
    for m in members[1:]:
        for what, a, b in (("channels", first.channels, m.channels), ("target", first.target, m.target),
                           ("label scheme", first.scheme.to_dict(), m.scheme.to_dict()),
                           ("preprocessing", first.preprocessing, m.preprocessing), ("spatial_dims", first.spatial_dims, m.spatial_dims)):
            if a != b:
                raise MedsegError(f"{m.path}: its {what} differ from {first.path}'s; an ensemble needs models trained "
                                  "with one pipeline (medseg train --folds all)")


def load_model(run_or_file: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run directory or checkpoint file into a :class:`LoadedModel` on ``device``."""
    path = find_checkpoint(run_or_file)
    ckpt = load_checkpoint(path)
    model = build_model(dict(ckpt["model"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise MedsegError(f"{path}: the weights do not fit model {ckpt['model'].get('name')} ({str(err).splitlines()[0][:150]})") from None
    model = model.to(resolve_device(str(device)) if not isinstance(device, torch.device) else device).eval()
    fold = ((ckpt.get("pipeline") or {}).get("data") or {}).get("val_fold")
    return LoadedModel(model, dict(ckpt["model"]), tuple(ckpt["channels"]), get_scheme(ckpt["label_scheme"]), str(ckpt["target"]),
                       Preprocessing.from_dict(ckpt.get("preprocessing")), dict(ckpt.get("inference") or {}), path,
                       None if fold is None else int(fold))


def settings_for(loaded: LoadedModel, overrides: dict | None = None) -> tuple[InferenceSettings, PostprocessSettings]:
    """Inference and postprocessing settings: the checkpoint's ``inference`` dict, then non-None ``overrides``."""
    merged = {**loaded.inference, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = set(overrides or {}) - SETTING_KEYS - POST_KEYS
    if unknown:
        raise MedsegError(f"unknown prediction option(s) {sorted(unknown)}; valid: {sorted(SETTING_KEYS | POST_KEYS)}")
    if not merged.get("roi_size"):
        raise MedsegError(f"{loaded.path}: the checkpoint records no inference.roi_size; give --roi")
    roi = tuple(int(r) for r in merged["roi_size"])
    if len(roi) != loaded.spatial_dims:
        raise MedsegError(f"roi {roi} has {len(roi)} sizes but the model is {loaded.spatial_dims}D; give {loaded.spatial_dims} sizes")
    infer = InferenceSettings(**{k: v for k, v in {**merged, "roi_size": roi}.items() if k in SETTING_KEYS})
    post = PostprocessSettings(**{k: v for k, v in merged.items() if k in POST_KEYS})
    return infer, post
