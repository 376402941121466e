"""Cases loaded, preprocessed and cached for training and validation.

A :class:`CaseData` holds one case on the prepared grid (reoriented, cropped, normalised), its label values,
optionally each region's share of every prepared voxel (soft targets) and the voxel coordinates of each class, computed once per case so that choosing
foreground patch centres costs nothing per patch. :class:`CaseCache` loads cases in worker threads and keeps
them in memory, or (``cache_dir``, ``data.cache: disk``) writes each prepared case once to a folder of ``.npy``
files keyed by the files and the preprocessing and maps them from there: a dataset larger than the memory trains,
patches read only the pages they touch, the operating system keeps in its page cache what fits, and a second run
starts at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data.checks import check_images
from medseg.data.io import read_mask, read_volume
from medseg.data.labels import IGNORE, LabelScheme
from medseg.data.manifest import Case
from medseg.data.preprocess import Prepared, Preprocessing


@dataclass
class CaseData:
    """One prepared case. ``image``: (C, *spatial) float32; ``label``: (*spatial) label values or None;
    ``class_coords``: label value -> (N, ndim) int32 voxel coordinates of that value (background excluded);
    ``geometry``: the :class:`Prepared` record without its arrays, to invert a prediction onto the scan's grid;
    ``soft``: ``(R, *spatial)`` float16, the share of each prepared voxel that each of the scheme's regions covers
    on the label's own grid (``data.soft_targets``), or None."""

    id: str
    image: np.ndarray
    label: np.ndarray | None
    class_coords: dict[int, np.ndarray]
    geometry: Prepared | None = None
    soft: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def foreground_coords(self) -> np.ndarray:
        coords = [c for c in self.class_coords.values() if len(c)]
        return np.concatenate(coords) if coords else np.zeros((0, self.image.ndim - 1), np.int32)


def _class_coords(label: np.ndarray | None, scheme: LabelScheme | None = None, max_per_class: int = 200_000,
                  seed: int = 0) -> dict[int, np.ndarray]:
    """Voxel coordinates per label value, background and ignored voxels left out (never a patch centre)."""
    if label is None:
        return {}
    rng = np.random.default_rng(seed)
    out = {}
    skip = {0, IGNORE} if scheme is not None and scheme.has_ignore else {0}
    for value in np.unique(label):
        if value in skip:
            continue
        coords = np.argwhere(label == value).astype(np.int32)
        if len(coords) > max_per_class:  # a subset is enough to draw centres from
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[int(value)] = coords
    return out


def load_case(case: Case, preprocessing: Preprocessing, scheme: LabelScheme | None, nan_policy: str = "error",
              soft_targets: bool = False) -> CaseData:
    """Read, check and preprocess one case; the label is decoded to label values by the scheme (0/255 masks,
    thresholds, ignored values: see :mod:`medseg.data.labels`). ``soft_targets``: also the share of each prepared
    voxel covered by each of the scheme's regions on the label's grid (the regions resampled as the images are).

    The images and the label go through :func:`medseg.data.checks.check_images`, the check of ``medseg validate``
    (one grid, 3D, invertible affine, finite values; ``nan_policy="zero"`` sets non-finite voxels to 0 with a
    warning), before any preprocessing."""
    images = [read_volume(path) for path in case.images.values()]
    label_vol = read_mask(case.label) if case.label else None
    where = [f"case {case.id}: {name} {path}" for name, path in case.images.items()]
    images = check_images(images, list(case.images), where, label=label_vol, label_where=f"case {case.id}: label {case.label}",
                          nan_policy=nan_policy)
    if label_vol is not None and scheme is not None:
        label_vol = label_vol.with_array(scheme.decode(label_vol.array, f"case {case.id}: label {case.label}"))
    masks = None
    if soft_targets and label_vol is not None and scheme is not None:
        masks = scheme.to_regions(label_vol.array).astype(np.float32)
    prepared = preprocessing.apply(images, label_vol, masks)
    label = None if prepared.label is None else prepared.label.astype(np.uint8 if prepared.label.max(initial=0) < 256 else np.int32)
    soft = None if prepared.masks is None else prepared.masks.astype(np.float16)
    return CaseData(case.id, prepared.image, label, _class_coords(label, scheme), replace(prepared, image=None, label=None, masks=None), soft)


_COMPLETE = "geometry.npz"  # written last: a case folder without it is incomplete and prepared again


def _write_case(data: CaseData, folder: Path) -> None:
    """One prepared case as ``.npy`` files (mapped by :func:`_map_case`) plus its geometry and the offsets of its
    class coordinates; written in a temporary folder renamed into place, so a killed run leaves no half case."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(data.image))
        if data.label is not None:
            np.save(tmp / "label.npy", np.ascontiguousarray(data.label))
        if data.soft is not None:
            np.save(tmp / "soft.npy", np.ascontiguousarray(data.soft))
        values = sorted(data.class_coords)
        ndim = data.image.ndim - 1
        coords = [data.class_coords[v] for v in values]
        np.save(tmp / "coords.npy", np.concatenate(coords) if coords else np.zeros((0, ndim), np.int32))
        counts = np.asarray([len(c) for c in coords], np.int64)
        with open(tmp / _COMPLETE, "wb") as fh:
            np.savez(fh, class_values=np.asarray(values, np.int64), class_counts=counts, **_geometry_arrays(data.geometry))
        if folder.exists() and not (folder / _COMPLETE).exists():  # not written by this function: damaged
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same case first: same key, same content
            if not (folder / _COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _map_case(case_id: str, folder: Path) -> CaseData:
    """A case written by :func:`_write_case`, its arrays memory-mapped read-only."""
    def mapped(name: str) -> np.ndarray | None:
        path = folder / name
        return np.load(path, mmap_mode="r") if path.exists() else None

    with np.load(folder / _COMPLETE) as z:
        geometry = _geometry_from(z)
        values, counts = z["class_values"], z["class_counts"]
    coords, ends = mapped("coords.npy"), np.cumsum(counts)
    class_coords = {int(v): coords[end - n:end] for v, n, end in zip(values, counts, ends)}
    return CaseData(case_id, mapped("image.npy"), mapped("label.npy"), class_coords, geometry, mapped("soft.npy"))


_GEOMETRY = ("affine", "original_shape", "original_affine", "ornt", "oriented_shape", "resampled_shape", "bbox")


def _geometry_arrays(g: Prepared) -> dict[str, np.ndarray]:
    return {f"geometry_{k}": np.asarray(getattr(g, k)) for k in _GEOMETRY}


def _geometry_from(z) -> Prepared | None:
    if "geometry_bbox" not in z.files:
        return None
    g = {k: z[f"geometry_{k}"] for k in _GEOMETRY}
    shapes = {k: tuple(int(v) for v in g[k]) for k in ("original_shape", "oriented_shape", "resampled_shape")}
    bbox = tuple((int(a), int(b)) for a, b in g["bbox"])
    return Prepared(None, None, g["affine"], shapes["original_shape"], g["original_affine"], g["ornt"],
                    shapes["oriented_shape"], shapes["resampled_shape"], bbox)


LABEL_RESAMPLING_VERSION = 2  # 2: each value's share, aligned with the image (1: nearest neighbour, half a voxel off)


class CaseCache:
    """Prepared cases by id, loaded once (threads) and kept in memory; with ``cache_dir``, memory-mapped from a
    folder of ``.npy`` files per case (written on first use, atomically), so the cases need not fit in memory."""

    def __init__(self, cases: Sequence[Case], preprocessing: Preprocessing, scheme: LabelScheme | None,
                 cache_dir: str | Path | None = None, workers: int = 2, progress: bool = False, nan_policy: str = "error",
                 soft_targets: bool = False):
        self.preprocessing = preprocessing
        self.nan_policy = nan_policy
        self.soft_targets = soft_targets
        self.scheme = scheme
        self.cache_dir = Path(cache_dir) if cache_dir else None
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(self._load, cases)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(cases), desc="load cases", unit="case")
            self.cases: dict[str, CaseData] = {c.id: c for c in results}

    def _key(self, case: Case) -> str:
        refs = [*case.images.values(), *([case.label] if case.label else [])]
        stamp = [(str(r), os.path.getmtime(r.path), os.path.getsize(r.path)) for r in refs]
        key = [stamp, self.preprocessing.to_dict()] + ([self.nan_policy] if self.nan_policy != "error" else [])
        key.append(self.scheme.to_dict() if self.scheme is not None else "raw labels")  # decoded labels differ by scheme
        key.append(f"labels resampled v{LABEL_RESAMPLING_VERSION}")  # a cache of an older label resampling is prepared again
        if self.soft_targets:
            key.append("soft targets")
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def _load(self, case: Case) -> CaseData:
        if self.cache_dir is None:
            return load_case(case, self.preprocessing, self.scheme, self.nan_policy, self.soft_targets)
        folder = self.cache_dir / f"{case.id}_{self._key(case)}"
        if not (folder / _COMPLETE).exists():
            _write_case(load_case(case, self.preprocessing, self.scheme, self.nan_policy, self.soft_targets), folder)
        return _map_case(case.id, folder)

    def __getitem__(self, case_id: str) -> CaseData:
        return self.cases[case_id]

    def __len__(self) -> int:
        return len(self.cases)

    def values(self):
        return self.cases.values()
