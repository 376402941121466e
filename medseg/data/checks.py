"""The one check of input images, shared by ``medseg validate``, training (:func:`medseg.data.dataset.load_case`) and
``medseg predict`` (:meth:`medseg.inference.predictor.Predictor.predict_volumes`), so that training and prediction
refuse what validation refuses, before any compute.

Per image: 3D (or 2D) unless a channel index selects a channel of a 4D file; an invertible voxel-to-world affine
with positive spacing (finite entries); finite values that float32 can hold (NaN, infinity, or a float64 value beyond
float32's range, which becomes infinity when the image is converted). Per case: every channel (and the label) on one
grid. Each problem is one line naming the file, what is wrong and how to fix it.

Non-finite values are an error unless the caller asks for ``nan_policy="zero"`` (``--nan-policy zero`` on
``medseg validate``, ``train`` and ``predict``): they are then set to 0 and a warning says how many.

Example:
    >>> import numpy as np
    >>> from medseg.data.volume import Volume
    >>> vol = Volume(np.array([[[1.0, np.nan]]], np.float32), np.eye(4))
    >>> checked = check_image(vol, "scan.nii.gz", nan_policy="zero")
    >>> checked.volume.array.tolist(), checked.warnings
    ([[[1.0, 0.0]]], ['scan.nii.gz: 1 NaN or infinite voxel(s) set to 0 (--nan-policy zero)'])
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from medseg.data.volume import Volume
from medseg.errors import ValidationError, check_choice

NAN_POLICIES = ("error", "zero")
FLOAT32_MAX = float(np.finfo(np.float32).max)
HUGE = 1e15  # |value| above this is far outside any scanner's range: worth a warning (values are still normalised)


@dataclass
class CheckedImage:
    """An image after :func:`check_image`: the volume (non-finite voxels set to 0 under ``nan_policy="zero"``),
    the problems (errors) and the warnings, one line each."""

    volume: Volume
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def warn(lines: Sequence[str]) -> None:
    """Print warnings as ``warning: ...`` lines on stderr (the command line's style)."""
    for line in lines:
        print(f"warning: {line}", file=sys.stderr, flush=True)


def dims_problem(vol: Volume, ndim: int | None = None) -> str | None:
    """A 4D image where a 3D one is expected (a channel index selects one channel of a 4D file), or a 2D array
    (the readers give one slice ``(W, H, 1)`` for 2D NIfTI/NRRD/MHA files and PNG/TIFF images; this guards the rest)."""
    if ndim is None and vol.array.ndim < 3:
        return (f"a {vol.array.ndim}D array of shape {vol.shape}; scans are read as 3D volumes: save it as one slice of "
                "shape (X, Y, 1) (numpy: array[..., None]), or as PNG/TIFF, which are read as 2D images")
    if vol.array.ndim > 3 or (ndim is not None and vol.array.ndim != ndim):
        return (f"image is {vol.array.ndim}D with shape {vol.array.shape} where a {ndim or 3}D image is expected; "
                "split 4D files into one file per channel or select a channel with 'file.nii.gz[N]' in the manifest")
    return None


def affine_problem(vol: Volume) -> str | None:
    """A voxel-to-world affine that cannot be inverted: non-finite entries, a zero spacing, or collinear axes."""
    affine = np.asarray(vol.affine, dtype=np.float64)
    fix = "fix the header (qform/sform, or spacing and direction) of the file, e.g. by re-exporting it from the scanner software or 3D Slicer"
    if not np.isfinite(affine).all():
        return f"the affine (voxel-to-world matrix) holds NaN or infinite values; {fix}"
    n = vol.spatial_ndim
    axes = affine[:3, :n]
    spacing = np.sqrt((axes ** 2).sum(axis=0))
    if not (spacing > 0).all():
        return f"voxel spacing {tuple(round(float(s), 6) for s in spacing)} is not positive on every axis; {fix}"
    singular = np.linalg.svd(axes / spacing, compute_uv=False)
    if singular.min() < 1e-6:
        det = float(np.linalg.det(affine[:3, :3])) if n == 3 else 0.0
        return (f"the affine (voxel-to-world matrix) is not invertible (determinant {det:.3g}: two voxel axes point the "
                f"same way); {fix}")
    return None


def value_problem(array: np.ndarray) -> tuple[np.ndarray | None, int]:
    """The mask of voxels that are not finite in float32 (NaN, infinity, or beyond float32's range) and their
    count; ``(None, 0)`` when every value is fine (integer arrays always are)."""
    if array.dtype.kind not in "fc":
        return None, 0
    bad = ~np.isfinite(array)
    if array.dtype.itemsize > 4 and array.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad |= np.abs(array) > FLOAT32_MAX
    count = int(np.count_nonzero(bad))
    return (bad, count) if count else (None, 0)


def check_image(vol: Volume, where: str, *, ndim: int | None = None, nan_policy: str = "error") -> CheckedImage:
    """Problems of one image channel (module docs), and the volume to use (non-finite voxels zeroed when asked)."""
    check_choice(nan_policy, NAN_POLICIES, "--nan-policy")
    out = CheckedImage(vol)
    dims = dims_problem(vol, ndim)
    if dims:
        out.problems.append(f"{where}: {dims}")
        return out
    affine = affine_problem(vol)
    if affine:
        out.problems.append(f"{where}: {affine}")
    bad, count = value_problem(vol.array)
    if count:
        beyond = " or beyond float32's range" if vol.array.dtype.itemsize > 4 else ""
        if nan_policy == "zero":
            out.volume = vol.with_array(np.where(bad, 0, vol.array).astype(vol.array.dtype, copy=False))
            out.warnings.append(f"{where}: {count} NaN or infinite{beyond} voxel(s) set to 0 (--nan-policy zero)")
        else:
            out.problems.append(f"{where}: {count} voxels are NaN or infinite{beyond} (of {vol.array.size}); replace them "
                                "(e.g. with 0: numpy.nan_to_num) or pass --nan-policy zero to set them to 0")
    if not out.problems and vol.array.dtype.kind == "f" and vol.array.size:
        top = float(np.max(np.abs(out.volume.array)))
        if top > HUGE:
            out.warnings.append(f"{where}: values up to {top:.3g}, far outside any scanner's range (a wrong scale factor "
                                "in the header?); normalisation copes, but check the file")
    return out


def label_problem(vol: Volume) -> str | None:
    """A label map with NaN or infinite values (never zeroed: a label must be exact)."""
    _, count = value_problem(vol.array)
    if count:
        return f"{count} voxels of the label map are NaN or infinite; a label map holds integer class values: fix or re-export it"
    return dims_problem(vol)


def grid_problems(grids: Sequence[tuple[int, str, tuple[int, ...], np.ndarray]], atol: float = 1e-3):
    """``(*grid, problem)`` for each file whose grid differs from the grid most files share (ties: the earliest
    file's). ``grids``: ``(file index, name, spatial shape, affine)`` per file."""
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


def check_images(images: Sequence[Volume], names: Sequence[str], where: Sequence[str], *, label: Volume | None = None,
                 label_where: str = "label", nan_policy: str = "error", atol: float = 1e-3) -> list[Volume]:
    """The images of one scan (and its label), checked as ``medseg validate`` checks them; returns the images to use
    (non-finite voxels zeroed under ``nan_policy="zero"``, with a warning), or raises a :class:`ValidationError` with
    one line per problem. ``where``: how each image is named in messages (``case X: flair path``)."""
    checked = [check_image(vol, w, nan_policy=nan_policy) for vol, w in zip(images, where)]
    problems = [p for c in checked for p in c.problems]
    grids = [(i, name, c.volume.shape, c.volume.affine) for i, (name, c) in enumerate(zip(names, checked)) if not c.problems]
    if label is not None:
        found = label_problem(label)
        if found:
            problems.append(f"{label_where}: {found}")
        else:
            grids.append((len(checked), "label", label.shape, label.affine))
    wheres = [*where, label_where]
    problems += [f"{wheres[index]}: {problem}" for index, _, _, _, problem in grid_problems(grids, atol)]
    if problems:
        raise ValidationError(problems)
    warn([w for c in checked for w in c.warnings])
    return [c.volume for c in checked]


def check_nan_policy(value: str) -> str:
    """``value`` if it is a valid ``--nan-policy``, else a :class:`~medseg.errors.MedsegError` listing the choices."""
    return check_choice(value, NAN_POLICIES, "--nan-policy")


__all__ = ["NAN_POLICIES", "CheckedImage", "check_image", "check_images", "affine_problem", "dims_problem", "value_problem",
           "label_problem", "grid_problems", "warn", "check_nan_policy"]
