"""Checkpoints: one dict of plain types and tensors, written atomically, loadable with ``weights_only=True``.

Keys: ``format`` ("medseg-checkpoint"), ``version``, ``model`` ({name, spatial_dims, in_channels, out_channels,
kwargs}), ``state_dict``, ``channels``, ``label_scheme`` (dict), ``target`` ("regions" | "labels"),
``preprocessing`` (dict), ``inference`` (dict), ``pipeline`` (the resolved pipeline), and for resuming:
``epoch`` (completed epochs), ``best_metric``, ``best_epoch``, ``history`` (one dict per epoch),
``optimizer``, ``scheduler``, ``scaler``, ``rng``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medseg.atomic import atomic_path
from medseg.errors import MedsegError

FORMAT = "medseg-checkpoint"
VERSION = 1


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
        raise MedsegError(f"{path}: checkpoint not found; give a run directory or its checkpoints/best.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a medseg checkpoint"
        raise MedsegError(f"{path}: not a medseg checkpoint ({type(err).__name__}); give a run directory written by 'medseg train'") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedsegError(f"{path}: not a medseg checkpoint (no 'format: {FORMAT}'); give a run directory written by 'medseg train'")
    return state


def find_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """``RUN_DIR`` -> ``RUN_DIR/checkpoints/{which}.pt`` (falling back to last.pt); a file is returned as is."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    for name in (which, "last", "best"):
        candidate = p / "checkpoints" / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise MedsegError(f"{p}: not a medseg run (no checkpoints/best.pt or checkpoints/last.pt); give the output folder of 'medseg train' or a .pt file")
