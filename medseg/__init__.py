"""medseg: medical volumetric segmentation.

Train on BraTS-style multi-modal scans, predict in the scan's own geometry, and report Dice.
The Python API mirrors the command line: ``medseg.train``, ``medseg.predict``, ``medseg.evaluate``, ``medseg.plan``
(imported on first use, so ``import medseg`` stays light).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "train": ("medseg.training.trainer", "train"),
    "train_folds": ("medseg.training.crossval", "train_folds"),
    "load_pipeline": ("medseg.training.config", "load_pipeline"),
    "predict": ("medseg.inference", "predict"),
    "evaluate": ("medseg.evaluation", "evaluate"),
    "plan": ("medseg.planning", "plan"),
    "create_model": ("medseg.models", "create_model"),
    "read_volume": ("medseg.data.io", "read_volume"),
    "write_volume": ("medseg.data.io", "write_volume"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


__all__ = list(_LAZY)
