"""Dataset validation: everything that would otherwise fail hours into training.

For each case: every file exists and reads; every image is 3D (or 2D for 2D datasets) unless a channel index
selects a channel of a 4D file; all channels and the label share one grid (shape, and affine within a
tolerance); every image has an invertible affine and finite values (:mod:`medseg.data.checks`, the check that
training and ``medseg predict`` apply too); label values belong to the label scheme. Each problem is one line naming
the case, the file, what is wrong and how to fix it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from medseg.data.checks import affine_problem, check_image, dims_problem, grid_problems, label_problem
from medseg.data.io import read_mask, read_volume
from medseg.data.labels import LabelScheme, get_scheme
from medseg.data.manifest import Case, Manifest, read_manifest
from medseg.errors import MedsegError, ValidationError


def validate_case(case: Case, scheme: LabelScheme | None, atol: float = 1e-3, ndim: int | None = None,
                  nan_policy: str = "error", warnings: list[str] | None = None) -> list[str]:
    """Problems of one case, one line each (empty when the case is valid).

    Images go through :func:`medseg.data.checks.check_image` (the check training and prediction apply too): 3D,
    invertible affine, finite values (with ``nan_policy="zero"`` non-finite values are a warning, appended to
    ``warnings``). The grid shared by most files of the case is the reference, so one misfit file is one problem
    even when it is the first channel.
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
        problem = (label_problem(vol) if name == "label" else None) or dims_problem(vol, ndim)
        if problem:
            found.append(f"{where}: {problem}")
            continue
        if name != "label":
            checked = check_image(vol, where, ndim=ndim, nan_policy=nan_policy)
            found += checked.problems
            if warnings is not None:
                warnings += checked.warnings
            if affine_problem(vol):
                continue  # reported; comparing a broken affine with the others would report it twice
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
    for index, name, shape, affine, problem in grid_problems(grids, atol):
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
    from medseg.data.images2d import IMAGE_2D_SUFFIXES, is_colour_file

    if list(manifest.channels) != ["R", "G", "B"]:
        return []
    grey = []
    for case in manifest.cases:
        ref = next(iter(case.images.values()))
        if ref.path.suffix.lower() not in IMAGE_2D_SUFFIXES or not ref.path.is_file():
            continue
        try:
            if not is_colour_file(ref.path):
                grey.append(case.id)
        except MedsegError:
            continue  # reported by the per-case check
    if grey:
        return [f"{manifest.path or 'manifest'}: {len(grey)} grey image(s) ({', '.join(grey[:3])}) in a colour dataset; they are "
                "read as R = G = B. Convert them to colour or remove them if they are not of this dataset"]
    return []


def validate_manifest(manifest: Manifest | str | Path, scheme: str | dict | LabelScheme | None = None, *,
                      atol: float = 1e-3, workers: int = 2, progress: bool = False, nan_policy: str = "error",
                      warnings: list[str] | None = None) -> list[str]:
    """Validate every case; returns the list of problems (one line each, empty when valid). With
    ``nan_policy="zero"`` non-finite image values are not problems but warnings, appended to ``warnings``."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    scheme_obj = get_scheme(scheme or manifest.label_scheme) if (scheme or manifest.label_scheme) else None
    cases: Iterable[Case] = manifest.cases
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda c: validate_case(c, scheme_obj, atol, nan_policy=nan_policy, warnings=warnings), cases)
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
