"""A trained checkpoint applied to patient scans, with the prediction written in each scan's own geometry.

For one scan: read the channels -> the checkpoint's preprocessing (canonical orientation, optional resampling,
foreground crop, z-score) -> sliding-window logits -> sigmoid (regions) or softmax (labels) -> invert the
preprocessing onto the first channel's original grid -> threshold / argmax -> the scheme's label values ->
postprocessing -> a uint8 NIfTI with the first channel's exact affine.

Example:
    >>> written = predict("runs/unet3d", ["Brats18_X_flair.nii.gz", "..._t1.nii.gz", "..._t1ce.nii.gz", "..._t2.nii.gz"],
    ...                   "predictions")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medseg.checkpoint import find_checkpoint, load_checkpoint
from medseg.data.io import read_volume, write_volume
from medseg.data.labels import LabelScheme, get_scheme
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.inference.engine import (InferenceSettings, autocast_dtype, channels_last_format, resolve_device,
                                     sliding_window)
from medseg.inference.inputs import CaseInput, resolve_inputs
from medseg.inference.postprocess import PostprocessSettings, postprocess, to_labels

BACKGROUND_LOGIT = 30.0  # |logit| given to voxels no window evaluated: sigmoid/softmax ~1e-13 from 0 or 1
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

    @property
    def spatial_dims(self) -> int:
        return int(self.config.get("spatial_dims", 3))


@dataclass(frozen=True)
class Prediction:
    """``labels`` on the first channel's grid; ``probabilities`` ``(*spatial, K)`` there too when asked for."""

    labels: Volume
    probabilities: Volume | None = None


def background_logits(target: str, k: int) -> list[float]:
    """Logits of a confident background for ``k`` outputs: what voxels that no window evaluated receive."""
    if target == "regions":
        return [-BACKGROUND_LOGIT] * k
    return [BACKGROUND_LOGIT] + [-BACKGROUND_LOGIT] * (k - 1)


def build_model(config: dict) -> torch.nn.Module:
    """The network described by a checkpoint's ``model`` entry (through the model registry)."""
    from medseg.models import build_from_config

    return build_from_config(config)


def load_model(run_or_file: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run directory or checkpoint file into a :class:`LoadedModel` on ``device``."""
    from medseg.data.preprocess import Preprocessing

    path = find_checkpoint(run_or_file)
    ckpt = load_checkpoint(path)
    model = build_model(dict(ckpt["model"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise MedsegError(f"{path}: the weights do not fit model {ckpt['model'].get('name')} ({str(err).splitlines()[0][:150]})") from None
    model = model.to(resolve_device(str(device)) if not isinstance(device, torch.device) else device).eval()
    return LoadedModel(model, dict(ckpt["model"]), tuple(ckpt["channels"]), get_scheme(ckpt["label_scheme"]), str(ckpt["target"]),
                       Preprocessing.from_dict(ckpt.get("preprocessing")), dict(ckpt.get("inference") or {}), path)


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


class Predictor:
    """Apply a loaded model to scans. ``predict_volumes`` works on arrays in memory; ``predict_case`` on files."""

    def __init__(self, loaded: LoadedModel, settings: InferenceSettings, post: PostprocessSettings | None = None,
                 probabilities: bool = False):
        self.loaded = loaded
        self.settings = settings
        self.post = post or PostprocessSettings()
        self.probabilities = probabilities
        device = resolve_device(settings.device)
        self.loaded.model.to(device)
        if settings.channels_last and device.type == "cpu" and autocast_dtype(settings.amp, device) == torch.bfloat16:
            self.loaded.model.to(memory_format=channels_last_format(loaded.spatial_dims))

    @classmethod
    def from_checkpoint(cls, run_or_file: str | Path, *, probabilities: bool = False, **overrides) -> "Predictor":
        loaded = load_model(run_or_file)
        infer, post = settings_for(loaded, overrides)
        return cls(loaded, infer, post, probabilities)

    def _fill(self, k: int) -> list[float]:
        return background_logits(self.loaded.target, k)

    def predict_volumes(self, images: Sequence[Volume]) -> Prediction:
        """Label map (and probabilities) on the grid of ``images[0]`` for one scan's channels, in model order."""
        channels = self.loaded.channels
        if len(images) != len(channels):
            raise MedsegError(f"{len(images)} channel image(s) given but the model needs {len(channels)} ({', '.join(channels)})")
        first = images[0]
        for name, vol in zip(channels[1:], images[1:]):
            if not first.same_grid(vol, atol=1e-3):
                raise MedsegError(f"channel {name} ({vol.meta.get('path', '?')}) has shape {vol.shape} / another affine than channel "
                                  f"{channels[0]} ({first.shape}); all channels of a scan must share one grid: resample them onto the first")
        prep = self.loaded.preprocessing.apply(list(images))
        k = int(self.loaded.config.get("out_channels", 0)) or None
        logits = sliding_window(self.loaded.model, torch.from_numpy(prep.image), self.settings,
                                fill=self._fill(k) if k else 0.0)
        if self.loaded.target == "regions":
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=0)
        probs = probs.float().cpu().numpy()
        del logits
        background = [0.0] * probs.shape[0] if self.loaded.target == "regions" else [1.0] + [0.0] * (probs.shape[0] - 1)
        full = self.loaded.preprocessing.invert(probs, prep, order="linear", fill=background)
        labels = to_labels(full, self.loaded.target, self.loaded.scheme, self.post.threshold)
        labels = postprocess(labels, self.loaded.scheme, self.post)
        prob_vol = first.with_array(np.ascontiguousarray(np.moveaxis(full, 0, -1))) if self.probabilities else None
        return Prediction(first.with_array(labels), prob_vol)

    def predict_case(self, case: CaseInput) -> Prediction:
        return self.predict_volumes([read_volume(p) for p in case.images])

    def output_paths(self, case_id: str, output_dir: Path) -> list[Path]:
        paths = [Path(output_dir) / f"{case_id}.nii.gz"]
        return paths + ([Path(output_dir) / f"{case_id}_prob.nii.gz"] if self.probabilities else [])

    def write(self, prediction: Prediction, case_id: str, output_dir: str | Path) -> list[Path]:
        """Write ``<id>.nii.gz`` (uint8 labels) and ``<id>_prob.nii.gz`` (float32) atomically; labels last."""
        labels_path, *prob_path = self.output_paths(case_id, Path(output_dir))
        if int(prediction.labels.array.max(initial=0)) > 255:
            raise MedsegError(f"case {case_id}: label values above 255 do not fit the uint8 output; use a scheme with values < 256")
        written = []
        if prob_path and prediction.probabilities is not None:
            written.append(write_volume(prediction.probabilities, prob_path[0], dtype=np.float32))
        written.insert(0, write_volume(prediction.labels, labels_path, dtype=np.uint8))
        return written


def predict(model: str | Path, inputs: str | Path | Sequence[str | Path], output: str | Path, *, case_id: str | None = None,
            probabilities: bool = False, overwrite: bool = False, shard: tuple[int, int] = (0, 1), progress: bool = False,
            **options) -> list[Path]:
    """Predict every case named by ``inputs`` with ``model``; write ``<output>/<case_id>.nii.gz`` per case.

    Args:
        model: a run folder (``checkpoints/best.pt``, else ``last.pt``) or a checkpoint file.
        inputs: one scan's channel files, one file, a case or dataset folder, a manifest, or a DICOM folder.
        output: folder for the predictions (created when the first one is written).
        shard: ``(i, n)``: predict only cases ``i, i + n, i + 2n, ...`` (for several processes or machines).
        overwrite: predict cases whose output already exists (they are skipped otherwise).
        options: :class:`InferenceSettings` and :class:`PostprocessSettings` fields overriding the checkpoint's.

    Returns:
        The files written (label maps first per case).
    """
    predictor = Predictor.from_checkpoint(model, probabilities=probabilities, **options)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    cases = resolve_inputs(list(inputs), predictor.loaded.channels, case_id)
    index, count = shard
    if not 0 <= index < count:
        raise MedsegError(f"shard {index}/{count}: the index must be within 0..{count - 1}")
    cases = cases[index::count]
    output = Path(output)
    todo = [c for c in cases if overwrite or not all(p.exists() for p in predictor.output_paths(c.id, output))]
    written: list[Path] = []
    bar = None
    if progress and len(todo) > 0:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="predict", unit="case")
    for case in todo:
        written += predictor.write(predictor.predict_case(case), case.id, output)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(case.id)
    if bar is not None:
        bar.close()
    return written
