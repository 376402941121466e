"""Dataset validation: everything that would otherwise fail hours into training.

For each case: every file exists and reads; every image is 3D (or 2D for 2D datasets) unless a channel index
selects a channel of a 4D file; all channels and the label share one grid (shape, and affine within a
tolerance); image values are finite; label values belong to the label scheme. Each problem is one line naming
the case, the file, what is wrong and how to fix it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from medseg.data.io import read_mask, read_volume
from medseg.data.labels import LabelScheme, get_scheme
from medseg.data.manifest import Case, Manifest, read_manifest
from medseg.errors import MedsegError, ValidationError


def validate_case(case: Case, scheme: LabelScheme | None, atol: float = 1e-3, ndim: int | None = None) -> list[str]:
    """Problems of one case, one line each (empty when the case is valid).

    The grid shared by most files of the case is the reference, so one misfit file is one problem even
    when it is the first channel.
    """
    problems: dict[int, list[str]] = {}
    grids: list[tuple[int, str, tuple[int, ...], np.ndarray]] = []  # (file index, name, shape, affine)
    files = [(name, path) for name, path in case.images.items()] + ([("label", case.label)] if case.label else [])
    for index, (name, path) in enumerate(files):
        found = problems.setdefault(index, [])
        where = f"case {case.id}: {name} {path}"
        try:
            vol = read_mask(path) if name == "label" else read_volume(path)
        except MedsegError as err:
            found.append(f"case {case.id}: {err}")
            continue
        if vol.array.ndim > 3 or (ndim is not None and vol.array.ndim != ndim):
            found.append(
                f"{where}: image is {vol.array.ndim}D with shape {vol.array.shape} where a {ndim or 3}D image is expected; "
                "split 4D files into one file per channel or select a channel with 'file.nii.gz[N]' in the manifest"
            )
            continue
        grids.append((index, name, vol.shape, vol.affine))
        if name == "label":
            if scheme is not None and scheme.decodes:
                try:
                    scheme.decode(vol.array, where)
                except MedsegError as err:
                    found.append(f"{err}" + _lossy_hint(vol.array, scheme))
            elif scheme is not None:
                bad = scheme.unknown_values(vol.array)
                if bad:
                    found.append(f"{where}: label values {bad[:5]} are not in scheme '{scheme.name}' (allowed {list(scheme.values) if not scheme.is_generic else 'non-negative integers'}); fix the label map or choose its scheme with --scheme")
        elif vol.array.dtype.kind == "f" and not np.isfinite(vol.array).all():
            count = int((~np.isfinite(vol.array)).sum())
            found.append(f"{where}: {count} voxels are NaN or infinite; replace them (e.g. with 0) before training")
    for index, name, shape, affine, problem in _grid_problems(grids, atol):
        problems[index].insert(0, f"case {case.id}: {name} {files[index][1]}: {problem}")
    return [line for index in sorted(problems) for line in problems[index]]


def _lossy_hint(array: np.ndarray, scheme: LabelScheme) -> str:
    """A hint for 0/255 masks with a few values in between (JPEG-compressed or resized)."""
    values = np.unique(array)
    if len(scheme.labels) == 1 and 0 in values and 255 in values and len(values) > 3:
        return " (the mask looks like a lossy 0/255 mask: scheme binary_lossy thresholds it at 128)"
    return ""


def colour_problems(manifest: Manifest) -> list[str]:
    """2D datasets: colour images (channels R, G, B from one file each) and grey ones should not be mixed; a grey
    image among colour ones is read as R = G = B, which is rarely what the user meant."""
    from medseg.data.images2d import IMAGE_2D_SUFFIXES

    if list(manifest.channels) != ["R", "G", "B"]:
        return []
    from PIL import Image

    grey = []
    for case in manifest.cases:
        ref = next(iter(case.images.values()))
        if ref.path.suffix.lower() not in IMAGE_2D_SUFFIXES or not ref.path.is_file():
            continue
        try:
            with Image.open(ref.path) as im:
                if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                    grey.append(case.id)
        except OSError:
            continue  # reported by the per-case check
    if grey:
        return [f"{manifest.path or 'manifest'}: {len(grey)} grey image(s) ({', '.join(grey[:3])}) in a colour dataset; they are "
                "read as R = G = B. Convert them to colour or remove them if they are not of this dataset"]
    return []


def _grid_problems(grids, atol: float):
    """Files whose grid differs from the grid most files share (ties: the earliest file's)."""
    def same(a, b) -> bool:
        return a[2] == b[2] and bool(np.allclose(a[3], b[3], atol=atol))

    if not grids:
        return
    reference = max(grids, key=lambda g: (sum(same(g, other) for other in grids), -g[0]))
    ref_name = reference[1]
    for grid in grids:
        index, name, shape, affine = grid
        if shape != reference[2]:
            yield (*grid, f"shape {shape} differs from {ref_name} {reference[2]}; all channels and the label of a case must share one grid: resample it onto the {ref_name} image")
        elif not same(grid, reference):
            diff = float(np.abs(affine - reference[3]).max())
            yield (*grid, f"affine differs from {ref_name} by up to {diff:.4g} mm (tolerance {atol}); all channels must share one grid: register/resample it onto the {ref_name} image or fix its header")


def validate_manifest(manifest: Manifest | str | Path, scheme: str | dict | LabelScheme | None = None, *,
                      atol: float = 1e-3, workers: int = 2, progress: bool = False) -> list[str]:
    """Validate every case; returns the list of problems (one line each, empty when valid)."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    scheme_obj = get_scheme(scheme or manifest.label_scheme) if (scheme or manifest.label_scheme) else None
    cases: Iterable[Case] = manifest.cases
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda c: validate_case(c, scheme_obj, atol), cases)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(manifest.cases), desc="validate", unit="case")
        problems = [p for case_problems in results for p in case_problems]
    problems += colour_problems(manifest)
    if any(c.label for c in manifest.cases) and scheme_obj is None:
        problems.append(f"{manifest.path}: the manifest has labels but no label scheme; add a label_scheme column "
                        "with brats (or brats2023, msd, labels) on every row, or pass --scheme")
    return problems


def check_manifest(manifest: Manifest | str | Path, scheme=None, **kwargs) -> None:
    """Raise :class:`ValidationError` (one problem per line) unless the manifest is valid."""
    problems = validate_manifest(manifest, scheme, **kwargs)
    if problems:
        raise ValidationError(problems)
