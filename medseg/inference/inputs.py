"""What ``medseg predict --input`` accepts, turned into a list of cases with one file per model channel.

* several files: one scan, one file per channel in the model's channel order;
* one image file: a single-channel model's scan, or a 4D NIfTI holding all channels (MSD style);
* a manifest (``.csv`` / ``.json``): every case it lists, channels matched to the model's by name;
* a folder: a dataset root in a known layout (all its cases), a case folder of such a layout (that case),
  or a DICOM series (single-channel models).

Example:
    >>> resolve_inputs(["scan.nii.gz"], ["t2"])  # doctest: +SKIP
    [CaseInput(id='scan', images=(ImageRef(path=PosixPath('scan.nii.gz'), channel=None),))]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from medseg.data.io import ImageRef
from medseg.data.manifest import Manifest, check_case_id, read_manifest
from medseg.errors import MedsegError

MANIFEST_SUFFIXES = (".csv", ".json")
_IMAGE_SUFFIX = re.compile(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd|dcm|png|jpe?g|bmp|gif|tiff?)$", re.IGNORECASE)


@dataclass(frozen=True)
class CaseInput:
    """One scan to predict: its id (the output file name) and one image per model channel, in order."""

    id: str
    images: tuple[ImageRef, ...]


def _channel_list(channels: Sequence[str]) -> str:
    return f"{len(channels)} channel{'s' if len(channels) != 1 else ''} ({', '.join(channels)})"


def case_id_from_file(path: str | Path | ImageRef, channels: Sequence[str]) -> str:
    """``Brats18_X_flair.nii.gz`` -> ``Brats18_X``; ``case_0000.nii.gz`` -> ``case``; ``t2.nii.gz`` -> ``t2``."""
    file = ImageRef.parse(path).path
    stem = _IMAGE_SUFFIX.sub("", file.name) or file.name
    names = "|".join(re.escape(c) for c in sorted(channels, key=len, reverse=True))
    short = re.sub(rf"[_-](?:{names}|\d{{4}})$", "", stem, flags=re.IGNORECASE) if names else stem
    return short or stem


def resolve_inputs(paths: Sequence[str | Path], channels: Sequence[str], case_id: str | None = None) -> list[CaseInput]:
    """The cases named by ``paths`` for a model with ``channels``; a :class:`MedsegError` with the fix otherwise."""
    refs = [ImageRef.parse(p) for p in paths]
    channels = list(channels)
    if not refs:
        raise MedsegError(f"no --input given; give the scan's {_channel_list(channels)}, a case folder or a manifest")
    if len(refs) > 1:
        if len(refs) != len(channels):
            raise MedsegError(f"{len(refs)} input files given but the model needs {_channel_list(channels)}, in this order; "
                              "give one file per channel")
        for ref in refs:
            _require(ref)
        if case_id is not None:
            check_case_id(case_id, "--id")
        return _checked_ids([CaseInput(case_id or case_id_from_file(refs[0], channels), tuple(refs))], refs[0])
    ref = refs[0]
    file = ref.path
    if case_id is not None:
        check_case_id(case_id, "--id")
    _require(ref)
    if file.is_file() and file.suffix.lower() in MANIFEST_SUFFIXES:
        cases = from_manifest(read_manifest(file), channels)
    elif file.is_dir():
        cases = _from_folder(file, channels)
    else:
        cases = [CaseInput(case_id_from_file(ref, channels), _single_file_channels(ref, channels))]
    if case_id is not None:
        if len(cases) != 1:
            raise MedsegError(f"--id names one case but {ref} holds {len(cases)} cases; drop --id")
        cases = [CaseInput(case_id, cases[0].images)]
    return _checked_ids(cases, ref)


def _checked_ids(cases: list[CaseInput], source) -> list[CaseInput]:
    """Case ids name the output files: each one must stay inside the output folder (see
    :func:`medseg.data.manifest.case_id_problem`)."""
    for case in cases:
        check_case_id(case.id, str(case.images[0] if case.images else source))
    return cases


def _require(ref: ImageRef) -> None:
    if not ref.path.exists():
        raise MedsegError(f"{ref.path}: file not found; check the --input path")


def from_manifest(manifest: Manifest, channels: Sequence[str]) -> list[CaseInput]:
    """Cases of a manifest with their images in the model's channel order (matched by channel name)."""
    where = manifest.path or "the manifest"
    have = [c.lower() for c in manifest.channels]
    missing = [c for c in channels if c.lower() not in have]
    if missing:
        raise MedsegError(f"{where}: no column for the model's channel(s) {missing}; the model needs {_channel_list(channels)} "
                          f"and the manifest has {list(manifest.channels)}: name the manifest's image columns after the model's channels")
    index = {c.lower(): c for c in manifest.channels}
    cases = []
    for case in manifest.cases:
        images = tuple(case.images[index[c.lower()]] for c in channels)
        for ref in images:
            _require(ref)
        cases.append(CaseInput(case.id, images))
    return cases


def _from_folder(folder: Path, channels: Sequence[str]) -> list[CaseInput]:
    from medseg.data.layouts import build_manifest, detect_layout

    try:
        return from_manifest(build_manifest("auto", folder), channels)
    except MedsegError as err:
        first_error = err
    try:  # a case folder: its parent is a dataset root in a known layout
        layout = detect_layout(folder.parent)
    except MedsegError:
        layout = None
    if layout is not None:
        manifest = build_manifest(layout, folder.parent)  # an incomplete case is reported as such
        if folder.name in manifest.ids:
            return from_manifest(replace(manifest, cases=(manifest[folder.name],)), channels)
    from medseg.data.images2d import IMAGE_2D_SUFFIXES

    pictures = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_2D_SUFFIXES and not f.name.startswith("."))
    if pictures:  # a folder of 2D images: one case per image, named by its file
        return [CaseInput(f.stem, _single_file_channels(ImageRef(f), channels)) for f in pictures]
    if _looks_like_dicom(folder):
        if len(channels) != 1:
            raise MedsegError(f"{folder}: a DICOM series is one channel but the model needs {_channel_list(channels)}; "
                              "give one file or series per channel with --input")
        return [CaseInput(folder.name, (ImageRef(folder),))]
    raise MedsegError(f"{folder}: not a case folder of a known layout nor a DICOM series ({first_error}); "
                      "give the scan's files, a manifest, or a dataset folder")


def _looks_like_dicom(folder: Path) -> bool:
    for p in folder.iterdir():
        if p.is_file() and (p.suffix.lower() == ".dcm" or not p.suffix):
            try:
                with open(p, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if p.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
                return True
    return False


def _single_file_channels(ref: ImageRef, channels: Sequence[str]) -> tuple[ImageRef, ...]:
    if ref.channel is None and _colour_image(ref.path):
        # a colour 2D image: its channels for an RGB model; for a one-channel model its first channel (the
        # layouts give grey content stored as RGB/RGBA one channel, file[0])
        if len(channels) == 1:
            return (ImageRef(ref.path, 0),)
        if len(channels) == 3:
            return tuple(ImageRef(ref.path, i) for i in range(3))
        _wrong_count(ref, 3, channels)
    if len(channels) == 1:
        return (ref,)
    n = _nifti_channels(ref.path) if ref.channel is None else 1
    if n == len(channels):
        return tuple(ImageRef(ref.path, i) for i in range(n))
    raise MedsegError(f"{ref}: one image with {n} channel{'s' if n != 1 else ''} but the model needs {_channel_list(channels)}; "
                      "give one file per channel, in this order")


def _wrong_count(ref: ImageRef, n: int, channels: Sequence[str]):
    raise MedsegError(f"{ref}: one image with {n} channels but the model needs {_channel_list(channels)}; "
                      "give one file per channel, in this order")


def _colour_image(file: Path) -> bool:
    """A 2D colour image (RGB, RGBA, CMYK...): read as three channels."""
    from medseg.data.images2d import IMAGE_2D_SUFFIXES, is_colour_file

    if file.suffix.lower() not in IMAGE_2D_SUFFIXES or not file.is_file():
        return False
    try:
        return is_colour_file(file)
    except MedsegError:
        return False  # read_volume reports it with the fix


def _nifti_channels(file: Path) -> int:
    """Channels of a 4D NIfTI (from its header only), 1 for anything else."""
    if not file.name.lower().endswith((".nii", ".nii.gz")):
        return 1
    import nibabel as nib

    try:
        shape = nib.load(str(file)).shape
    except Exception:  # noqa: BLE001 - unreadable: read_volume reports it with the fix
        return 1
    return int(shape[3]) if len(shape) == 4 else 1
