"""The fingerprint of a dataset: what planning needs to know about its labelled cases.

Per case, on the grid the preprocessing gives (reoriented to RAS, cropped to the non-zero voxels of any channel
with its margin, native spacing): spacing, shape, voxels per label value, and each channel's minimum. Per channel,
over the foreground (label > 0) of all cases: mean, standard deviation, 0.5/99.5 percentiles, min and max of at most
``samples_per_case`` voxels drawn per case with a seeded generator (nnU-Net pools foreground samples the same way).
Per class: the fraction of cases that contain it and its volume in mL. Per channel: the modality, ``ct`` or ``mri``.

Cases are read one at a time (one case in memory), with a progress bar when stderr is a terminal.
:meth:`Fingerprint.save` writes JSON with the manifest path relative to the JSON file and no other path.

Example:
    >>> fp = fingerprint_manifest("data_manifests/brats18_20.csv")  # doctest: +SKIP
    >>> fp.median_spacing, fp.modalities  # doctest: +SKIP
    ((1.0, 1.0, 1.0), {'flair': 'mri', 't1': 'mri', 't1ce': 'mri', 't2': 'mri'})
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medseg.data.manifest import Manifest, read_manifest
from medseg.errors import MedsegError, check_choice

MODALITIES = ("ct", "mri")  # ct: clip + z-score with dataset statistics; mri (and anything else): z-score per image
HOUNSFIELD_AIR = (-3100.0, -900.0)  # a channel minimum in this range looks like CT air or padding in HU
_CT_NAME = re.compile(r"(?<![a-z])ct(?![a-z])", re.IGNORECASE)
FORMAT = 1


@dataclass(frozen=True)
class CaseFingerprint:
    """One labelled case on the prepared grid. ``class_voxels``: label value -> voxel count (background excluded)."""

    id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    class_voxels: Mapping[int, int] = field(default_factory=dict)
    image_min: tuple[float, ...] = ()
    fold: int | None = None

    def volume_ml(self, value: int) -> float:
        return self.class_voxels.get(value, 0) * float(np.prod(self.spacing)) / 1000.0


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensities of one channel over all cases (pooled samples)."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float
    samples: int
    integer: bool | None = None  # every sample a whole number (8-bit images are); None: not recorded (older JSON)


@dataclass(frozen=True)
class Fingerprint:
    channels: tuple[str, ...]
    cases: tuple[CaseFingerprint, ...]
    intensity: Mapping[str, IntensityStats]
    modalities: Mapping[str, str]
    modality_reasons: Mapping[str, str]
    label_scheme: str | dict | None = None
    unlabelled_cases: int = 0
    read_seconds: float = 0.0  # reading + preparing every case once, as training's start does

    @property
    def spatial_dims(self) -> int:
        return len(self.cases[0].shape)

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes(self) -> np.ndarray:
        return np.array([c.shape for c in self.cases], dtype=float)

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.median(self.spacings, axis=0))

    @property
    def anisotropy(self) -> float:
        """Largest / smallest median spacing."""
        m = self.median_spacing
        return max(m) / min(m)

    @property
    def class_values(self) -> list[int]:
        return sorted({v for c in self.cases for v in c.class_voxels})

    def class_summary(self) -> dict[int, dict[str, float]]:
        """Per label value: fraction of cases containing it, median and mean volume (mL) where present."""
        out = {}
        for value in self.class_values:
            vols = [c.volume_ml(value) for c in self.cases if c.class_voxels.get(value, 0) > 0]
            out[value] = {"frequency": len(vols) / len(self.cases), "volume_ml_median": float(np.median(vols)),
                          "volume_ml_mean": float(np.mean(vols))}
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self, manifest: str | None = None) -> dict:
        return {
            "format": FORMAT, "manifest": manifest, "channels": list(self.channels), "label_scheme": self.label_scheme,
            "spatial_dims": self.spatial_dims, "labelled_cases": len(self.cases), "unlabelled_cases": self.unlabelled_cases,
            "median_spacing": list(self.median_spacing), "anisotropy": self.anisotropy,
            "median_shape": [float(s) for s in np.median(self.shapes, axis=0)],
            "modalities": dict(self.modalities), "modality_reasons": dict(self.modality_reasons),
            "intensity": {ch: asdict(s) for ch, s in self.intensity.items()},
            "classes": {str(v): s for v, s in self.class_summary().items()},
            "read_seconds": round(self.read_seconds, 2),
            "cases": [{"id": c.id, "fold": c.fold, "spacing": list(c.spacing), "shape": list(c.shape),
                       "class_voxels": {str(v): n for v, n in c.class_voxels.items()},
                       "class_volume_ml": {str(v): round(c.volume_ml(v), 3) for v in c.class_voxels},
                       "image_min": list(c.image_min)} for c in self.cases],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Fingerprint":
        cases = tuple(CaseFingerprint(c["id"], tuple(c["spacing"]), tuple(c["shape"]),
                                      {int(v): int(n) for v, n in c["class_voxels"].items()}, tuple(c["image_min"]), c.get("fold"))
                      for c in d["cases"])
        return cls(tuple(d["channels"]), cases, {ch: IntensityStats(**s) for ch, s in d["intensity"].items()},
                   dict(d["modalities"]), dict(d["modality_reasons"]), d.get("label_scheme"),
                   int(d.get("unlabelled_cases", 0)), float(d.get("read_seconds", 0.0)))

    def save(self, path: str | Path, manifest: str | Path | None = None) -> Path:
        """Write JSON; ``manifest`` is recorded relative to the JSON file's folder (no absolute path is written)."""
        from medseg.atomic import write_text_atomic

        path = Path(path)
        rel = None
        if manifest is not None:
            rel = os.path.relpath(Path(manifest).resolve(), path.parent.resolve()).replace(os.sep, "/")
        write_text_atomic(path, json.dumps(self.to_dict(rel), indent=1) + "\n")
        return path


def intensity_stats(samples: np.ndarray) -> IntensityStats:
    """Statistics of pooled foreground samples of one channel."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return IntensityStats(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return IntensityStats(float(x.mean()), float(x.std()), float(lo), float(hi), float(x.min()), float(x.max()), int(x.size),
                          bool(np.all(x == np.round(x))))


def guess_modality(channel: str, case_minima: Sequence[float]) -> tuple[str, str]:
    """``("ct", why)`` when the channel is named CT (``ct`` as a word: ``ct``, ``CT_0``, ``ct-arterial``) and its
    images reach air in Hounsfield units (median case minimum within -3100..-900); otherwise ``("mri", why)``."""
    low = float(np.median(case_minima)) if len(case_minima) else 0.0
    named = bool(_CT_NAME.search(channel))
    hounsfield = HOUNSFIELD_AIR[0] <= low <= HOUNSFIELD_AIR[1]
    if named and hounsfield:
        return "ct", f"named '{channel}' and its minimum {low:g} looks like air in Hounsfield units"
    if named:
        return "mri", f"named '{channel}' but its minimum {low:g} is not air in Hounsfield units (-1000); z-scored per image"
    if hounsfield:
        return "mri", f"minimum {low:g} looks like Hounsfield units but '{channel}' is not named ct; give --modality ct if it is CT"
    return "mri", f"minimum {low:g}: not CT; z-scored per image"


def _parse_modality(modality: str | Sequence[str] | None, channels: tuple[str, ...]) -> list[str | None]:
    if modality is None:
        return [None] * len(channels)
    items = modality.split(",") if isinstance(modality, str) else list(modality)
    items = [m.strip().lower() for m in items]
    if len(items) == 1:
        items = items * len(channels)
    if len(items) != len(channels):
        raise MedsegError(f"--modality: {len(items)} values for {len(channels)} channels {list(channels)}; "
                          "give one (for all channels) or one per channel, e.g. --modality ct or --modality ct,mri")
    return [check_choice(m, MODALITIES, "--modality") for m in items]


def _case_fingerprint(case, index: int, scheme, samples_per_case: int, seed: int):
    from medseg.data.dataset import load_case
    from medseg.data.preprocess import Preprocessing

    data = load_case(case, Preprocessing(orientation="RAS", spacing=None, normalize="none"), scheme)
    geometry = data.geometry
    ndim = len(data.shape)
    spacing = tuple(float(round(s, 5)) for s in np.sqrt((geometry.affine[:3, :3] ** 2).sum(axis=0))[:ndim])
    label = data.label
    counts = np.bincount(label.ravel().astype(np.int64))
    class_voxels = {int(v): int(n) for v, n in enumerate(counts) if v > 0 and n > 0}
    flat = data.image.reshape(data.image.shape[0], -1)
    fg = np.flatnonzero(label.ravel() > 0)
    rng = np.random.default_rng([seed, index])
    if len(fg) > samples_per_case:
        fg = np.sort(rng.choice(fg, samples_per_case, replace=False))
    image_min = tuple(float(m) for m in flat.min(axis=1))
    return CaseFingerprint(case.id, spacing, tuple(int(s) for s in data.shape), class_voxels, image_min, case.fold), flat[:, fg]


def fingerprint_manifest(manifest: str | Path | Manifest, *, modality: str | Sequence[str] | None = None,
                         samples_per_case: int = 10_000, seed: int = 0, progress: bool | None = None) -> Fingerprint:
    """Fingerprint the labelled cases of ``manifest`` (a path or a :class:`Manifest`).

    ``modality``: ``"ct"``/``"mri"`` for every channel, or one per channel (a list or ``"ct,mri"``); default: guessed
    by :func:`guess_modality`. ``progress``: a progress bar (default: when stderr is a terminal).
    """
    from medseg.data.labels import get_scheme

    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    given = _parse_modality(modality, m.channels)
    labelled = [c for c in m.cases if c.label is not None]
    if not labelled:
        raise MedsegError(f"{m.path or 'manifest'}: no case has a label; planning needs labelled training cases (a label column)")
    scheme = get_scheme(m.label_scheme) if m.label_scheme else None
    if progress is None:
        progress = sys.stderr.isatty()
    cases_iter = labelled
    if progress:
        from tqdm import tqdm

        cases_iter = tqdm(labelled, desc="fingerprint", unit="case")
    cases, pooled = [], [[] for _ in m.channels]
    start = time.perf_counter()
    for i, case in enumerate(cases_iter):
        fp, samples = _case_fingerprint(case, i, scheme, samples_per_case, seed)
        cases.append(fp)
        for c in range(len(m.channels)):
            pooled[c].append(samples[c])
    seconds = time.perf_counter() - start
    dims = {len(c.shape) for c in cases}
    if len(dims) > 1:
        raise MedsegError(f"{m.path or 'manifest'}: cases mix 2D and 3D images; plan 2D and 3D data separately")
    intensity = {ch: intensity_stats(np.concatenate(pooled[c])) for c, ch in enumerate(m.channels)}
    modalities, reasons = {}, {}
    for c, ch in enumerate(m.channels):
        if given[c] is not None:
            modalities[ch], reasons[ch] = given[c], "given by --modality"
        else:
            modalities[ch], reasons[ch] = guess_modality(ch, [case.image_min[c] for case in cases])
    return Fingerprint(tuple(m.channels), tuple(cases), intensity, modalities, reasons, m.label_scheme,
                       len(m.cases) - len(labelled), seconds)


def with_modalities(fp: Fingerprint, modality: str | Sequence[str]) -> Fingerprint:
    """The fingerprint with the modalities given (as ``--modality``) instead of guessed."""
    given = _parse_modality(modality, fp.channels)
    return replace(fp, modalities=dict(zip(fp.channels, given)), modality_reasons={ch: "given by --modality" for ch in fp.channels})
