"""Manifest builders for the dataset layouts users arrive with.

================ ==================================================================== ==============
layout           files                                                                label scheme
================ ==================================================================== ==============
brats2018        ``ID/ID_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2018-2020)            brats
brats2021        ``BraTS2021_xxxxx/BraTS2021_xxxxx_{flair,t1,t1ce,t2,seg}.nii.gz``    brats
brats2023        ``BraTS-GLI-xxxxx-xxx/...-{t2f,t1n,t1c,t2w,seg}.nii.gz``             brats2023
msd              ``imagesTr/BRATS_xxx.nii.gz`` (4D) + ``labelsTr/BRATS_xxx.nii.gz``    msd
nnunet           ``imagesTr/case_0000.nii.gz``... + ``labelsTr/case.nii.gz`` + dataset.json  from dataset.json
images-masks     ``images/NAME.jpg`` + ``masks/NAME.png`` (2D; :mod:`medseg.data.layouts2d`)   from mask values
instance-masks   ``images/NAME.png`` + ``masks/NAME/*.png`` (one mask per object)          foreground
isbi-em          ``images/N.png`` + ``labels/N.png`` (ISBI 2012 EM)                        em_membrane
================ ==================================================================== ==============

BraTS layouts share one channel order, ``flair, t1, t1ce, t2`` (2023: t2f, t1n, t1c, t2w), so a model
trained on one release runs on another. ``auto`` detects the layout.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

from medseg.data.io import ImageRef
from medseg.data.manifest import Case, Manifest
from medseg.errors import MedsegError, check_choice

BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")
_BRATS2023_FILES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
LAYOUTS: dict[str, Callable[[Path], Manifest]] = {}


def _layout(name: str):
    def deco(fn):
        LAYOUTS[name] = fn
        return fn

    return deco


def _nii(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.exists():
            return p
    return None


def _brats_cases(root: Path, pattern: str, files: dict[str, str], layout: str) -> list[Case]:
    cases = []
    sep = "-" if layout == "brats2023" else "_"
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(pattern, p.name)):
        if not any(folder.glob(f"{folder.name}{sep}*.nii*")):
            continue  # not a case folder (no image named after it): ignored, like any other stray folder
        images = {}
        for channel, suffix in files.items():
            path = _nii(folder, f"{folder.name}_{suffix}" if layout != "brats2023" else f"{folder.name}-{suffix}")
            if path is None:
                raise MedsegError(
                    f"{folder}: case {folder.name} has no {channel} image ({folder.name}{sep}{suffix}.nii.gz); "
                    "add the missing modality or move the incomplete case out of the dataset folder"
                )
            images[channel] = path
        seg = _nii(folder, f"{folder.name}_seg" if layout != "brats2023" else f"{folder.name}-seg")
        cases.append(Case(folder.name, images, seg))
    return cases


@_layout("brats2018")
def brats2018(root: Path) -> Manifest:
    """BraTS 2018-2020: ``ID/ID_{flair,t1,t1ce,t2,seg}.nii.gz`` (labels 1, 2, 4)."""
    files = {c: c for c in BRATS_CHANNELS}
    pattern = r"(?!BraTS2021_).+"
    cases = [c for c in _brats_cases(root, pattern, files, "brats2018")]
    return Manifest(BRATS_CHANNELS, tuple(cases), "brats")


@_layout("brats2021")
def brats2021(root: Path) -> Manifest:
    """BraTS 2021: ``BraTS2021_xxxxx/BraTS2021_xxxxx_{flair,t1,t1ce,t2,seg}.nii.gz`` (labels 1, 2, 4)."""
    files = {c: c for c in BRATS_CHANNELS}
    return Manifest(BRATS_CHANNELS, tuple(_brats_cases(root, r"BraTS2021_\d+", files, "brats2021")), "brats")


@_layout("brats2023")
def brats2023(root: Path) -> Manifest:
    """BraTS 2023: ``BraTS-GLI-xxxxx-xxx/BraTS-GLI-xxxxx-xxx-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (labels 1, 2, 3)."""
    cases = _brats_cases(root, r"BraTS-[A-Z]+-\d+-\d+", _BRATS2023_FILES, "brats2023")
    return Manifest(BRATS_CHANNELS, tuple(cases), "brats2023")


@_layout("msd")
def msd(root: Path) -> Manifest:
    """Medical Segmentation Decathlon Task01: 4D ``imagesTr/BRATS_xxx.nii.gz`` + ``labelsTr``."""
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise MedsegError(f"{root}: no imagesTr folder; an MSD task folder holds imagesTr/, labelsTr/ and dataset.json")
    channels = BRATS_CHANNELS
    meta = _read_dataset_json(root) if (root / "dataset.json").exists() else {}
    modality = meta.get("modality") or meta.get("channel_names")
    if modality and len(modality) != 4:
        channels = tuple(str(modality[k]).lower() for k in sorted(modality, key=int))
    cases = []
    for image in sorted(images_dir.glob("*.nii*")):
        if image.name.startswith("."):
            continue
        case_id = image.name.split(".nii")[0]
        label = _nii(root / "labelsTr", case_id)
        cases.append(Case(case_id, {ch: ImageRef(image, i) for i, ch in enumerate(channels)}, label))
    scheme = "msd" if len(channels) == 4 else _scheme_from_labels(meta.get("labels"), root)
    return Manifest(channels, tuple(cases), scheme)


@_layout("nnunet")
def nnunet(root: Path) -> Manifest:
    """nnU-Net raw: ``imagesTr/<case>_0000.nii.gz``... + ``labelsTr/<case>.nii.gz`` + ``dataset.json``."""
    meta = _read_dataset_json(root)
    names = meta.get("channel_names") or meta.get("modality")
    if not names:
        raise MedsegError(f"{root / 'dataset.json'}: no 'channel_names'; nnU-Net v2 dataset.json lists channels as {{\"0\": \"FLAIR\", ...}}")
    channels = tuple(str(names[k]).lower().replace(" ", "_") for k in sorted(names, key=int))
    if len(set(channels)) != len(channels):
        channels = tuple(f"{c}_{i}" for i, c in enumerate(channels))
    ending = meta.get("file_ending", ".nii.gz")
    images_dir = root / "imagesTr"
    ids = sorted({p.name[: -len(ending)][:-5] for p in images_dir.glob(f"*_0000{ending}") if not p.name.startswith(".")})
    cases = []
    for case_id in ids:
        images = {}
        for i, ch in enumerate(channels):
            p = images_dir / f"{case_id}_{i:04d}{ending}"
            if not p.exists():
                raise MedsegError(f"{images_dir}: case {case_id} has no channel {i} ({p.name}); every case needs {len(channels)} channel files")
            images[ch] = p
        label = root / "labelsTr" / f"{case_id}{ending}"
        cases.append(Case(case_id, images, label if label.exists() else None))
    return Manifest(channels, tuple(cases), _scheme_from_labels(meta.get("labels"), root))


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.exists():
        raise MedsegError(f"{root}: no dataset.json; an nnU-Net raw dataset folder holds imagesTr/, labelsTr/ and dataset.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedsegError(f"{path}: not valid JSON ({err})") from None


def _scheme_from_labels(labels, root: Path) -> dict | None:
    """nnU-Net v2 ``{"background": 0, "edema": 1}`` or v1 ``{"0": "background", "1": "edema"}`` -> scheme dict."""
    if not labels:
        return None
    pairs = {}
    for k, v in labels.items():
        if isinstance(v, (list, tuple)):  # nnU-Net region-based entries; not a plain label
            continue
        name, value = (v, k) if str(k).isdigit() else (k, v)
        if int(value) != 0:
            pairs[str(name)] = int(value)
    return {"name": root.name, "labels": pairs, "regions": {}}


def detect_layout(root: Path) -> str:
    """Name of the layout of ``root``; a :class:`MedsegError` when none matches."""
    from medseg.data.layouts2d import detect_2d

    if (root / "imagesTr").is_dir():
        if (root / "dataset.json").exists() and any((root / "imagesTr").glob("*_0000.nii*")):
            return "nnunet"
        return "msd"
    subdirs = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if any(re.fullmatch(r"BraTS-[A-Z]+-\d+-\d+", n) for n in subdirs):
        return "brats2023"
    if any(re.fullmatch(r"BraTS2021_\d+", n) for n in subdirs):
        return "brats2021"
    if any(_nii(root / n, f"{n}_flair") for n in subdirs):
        return "brats2018"
    two_d = detect_2d(root) if root.is_dir() else None
    if two_d:
        return two_d
    raise MedsegError(
        f"{root}: no known layout found (BraTS 2018-2023 case folders, MSD or nnU-Net imagesTr/, images/ + masks/); "
        "give --layout explicitly or write a manifest by hand (see data_manifests/README.md)"
    )


def build_manifest(layout: str, root: str | Path, *more_roots: str | Path, label_scheme: str | dict | None = None,
                   notes: list[str] | None = None) -> Manifest:
    """Build a manifest for the dataset folder ``root`` in ``layout`` (or ``"auto"``).

    ``more_roots`` are further folders of the same dataset in the same layout (a release split over several
    downloads): their cases are listed after those of ``root``, in folder order. Case ids must be unique across
    the folders, and the folders must give the same channels and label scheme. ``label_scheme`` replaces the
    layout's scheme (2D layouts otherwise infer one from the mask values and append why to ``notes``).
    """
    check_choice(layout, ("auto", *LAYOUTS), "layout")
    if isinstance(label_scheme, str):
        from medseg.data.labels import get_scheme

        get_scheme(label_scheme)  # an unknown name fails here, before any file is read
    parts = [(Path(r), _build_one(layout, Path(r), label_scheme, notes)) for r in (root, *more_roots)]
    return parts[0][1] if len(parts) == 1 else _merge(parts)


def _build_one(layout: str, root: Path, label_scheme, notes) -> Manifest:
    if not root.is_dir():
        raise MedsegError(f"{root}: not a folder; give the dataset's root folder")
    if layout == "auto":
        layout = detect_layout(root)
    if layout in LAYOUTS_2D:
        manifest = LAYOUTS[layout](root, label_scheme=label_scheme, notes=notes)
    else:
        manifest = LAYOUTS[layout](root)
        if label_scheme is not None:
            manifest = replace(manifest, label_scheme=label_scheme)
    if not manifest.cases:
        raise MedsegError(f"{root}: no {layout} cases found; check the folder or the --layout")
    return manifest


def _merge(parts: list[tuple[Path, Manifest]]) -> Manifest:
    """One manifest from the manifests of several folders of one dataset (cases in folder order)."""
    first_root, first = parts[0]
    owner: dict[str, Path] = {}
    cases = []
    for root, manifest in parts:
        if manifest.channels != first.channels:
            raise MedsegError(f"{root}: channels {list(manifest.channels)} differ from {list(first.channels)} in {first_root}; "
                              "give folders of one dataset (the same modalities) or build one manifest per folder")
        if manifest.label_scheme != first.label_scheme:
            raise MedsegError(f"{root}: label scheme {manifest.label_scheme!r} differs from {first.label_scheme!r} in {first_root}; "
                              "give folders of one release (one label convention) or build one manifest per folder")
        for case in manifest.cases:
            if case.id in owner:
                where = f"twice in {root}" if owner[case.id] == root else f"in both {owner[case.id]} and {root}"
                raise MedsegError(f"case id {case.id} is {where}; case ids must be unique across the folders: "
                                  "remove the duplicate case or give each folder only once")
            owner[case.id] = root
            cases.append(case)
    return replace(first, cases=tuple(cases))


def _register_2d() -> tuple[str, ...]:
    from medseg.data import layouts2d

    LAYOUTS.update({"images-masks": layouts2d.images_masks, "instance-masks": layouts2d.instance_masks,
                    "isbi-em": layouts2d.isbi_em})
    return ("images-masks", "instance-masks", "isbi-em")


LAYOUTS_2D = _register_2d()
