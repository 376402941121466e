"""Inference: sliding-window prediction and writing labels in the scan's own geometry.

* :func:`sliding_window` with :class:`InferenceSettings` — the engine, for any 2D/3D model and array;
* :class:`Predictor` — a trained checkpoint applied to scans (preprocess, windows, invert, postprocess);
* :func:`predict` — the Python face of ``medseg predict``: inputs (files, case folder, manifest, DICOM) -> files.
"""
from __future__ import annotations

from medseg.inference.windows import axis_starts, foreground_box, gaussian_weights, plan_windows

_ENGINE = ("InferenceSettings", "sliding_window", "plan_layout", "autocast_dtype", "cpu_has_bf16")  # import torch: on use

__all__ = [
    "InferenceSettings", "sliding_window", "plan_layout", "autocast_dtype", "cpu_has_bf16",
    "axis_starts", "plan_windows", "gaussian_weights", "foreground_box",
    "Predictor", "Prediction", "PostprocessSettings", "load_model", "predict",
]


def __getattr__(name: str):
    if name in _ENGINE:
        from medseg.inference import engine

        return getattr(engine, name)
    if name in ("Predictor", "Prediction", "load_model"):
        from medseg.inference import predictor

        return getattr(predictor, name)
    if name == "predict":
        from medseg.inference.batch import predict

        return predict
    if name == "PostprocessSettings":
        from medseg.inference.postprocess import PostprocessSettings

        return PostprocessSettings
    raise AttributeError(f"module 'medseg.inference' has no attribute {name!r}")
