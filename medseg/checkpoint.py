"""Checkpoints: one dict of plain types and tensors, written atomically, loadable with ``weights_only=True``.

Keys: ``format`` ("medseg-checkpoint"), ``version``, ``model`` ({name, spatial_dims, in_channels, out_channels,
kwargs}), ``state_dict``, ``channels``, ``label_scheme`` (dict), ``target`` ("regions" | "labels"),
``preprocessing`` (dict), ``inference`` (dict), ``pipeline`` (the resolved pipeline), and for resuming:
``epoch`` (completed epochs), ``best_metric``, ``best_epoch``, ``history`` (one dict per epoch),
``smoothed``, ``optimizer``, ``scaler``, ``rng`` (the learning rate follows from the epoch; a ``scheduler`` entry of older
checkpoints is ignored).
"""
from __future__ import annotations

from pathlib import Path

import torch

from medseg.atomic import atomic_path
from medseg.errors import MedsegError

FORMAT = "medseg-checkpoint"
VERSION = 1
REQUIRED = ("model", "state_dict", "channels", "label_scheme", "target")  # what predicting needs


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + rename)."""
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a medseg checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path} is not a medseg run or checkpoint (not found); give the output folder of 'medseg train' or its checkpoints/best.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a medseg checkpoint"
        raise MedsegError(f"{path} is not a medseg run or checkpoint ({type(err).__name__}); give a run folder or .pt written by 'medseg train'") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedsegError(f"{path} is not a medseg run or checkpoint (no 'format: {FORMAT}'); give a run folder or .pt written by 'medseg train'")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise MedsegError(f"{path}: the medseg checkpoint lacks {missing}; it is damaged or from another version: re-save it with 'medseg train'")
    return state


def for_fold(run: str | Path, fold: int | None) -> Path:
    """The model of one fold: ``RUN/fold_K`` when ``run`` is a cross-validation folder with that fold (so a model
    used for fold K, a cascade's localiser or a warm start, never trained on fold K's validation cases), else ``run``."""
    path = Path(run)
    if fold is not None and (path / f"fold_{fold}" / "checkpoints").is_dir():
        return path / f"fold_{fold}"
    return path


def find_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """``RUN_DIR`` -> ``RUN_DIR/checkpoints/{which}.pt`` (falling back to the other one); a file is returned as is."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    for name in dict.fromkeys((which, "best", "last")):
        candidate = p / "checkpoints" / f"{name}.pt"
        if candidate.is_file():
            return candidate
    why = "not found" if not p.exists() else "no checkpoints/best.pt or checkpoints/last.pt"
    raise MedsegError(f"{p} is not a medseg run or checkpoint ({why}); give the output folder of 'medseg train' or its checkpoints/best.pt")
