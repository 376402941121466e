"""Manifests: the one description of a dataset that everything downstream reads.

A manifest lists cases: an id, one image path per channel in a fixed channel order, an optional label path,
and optional split / fold. It is CSV or JSON; paths may be relative to the manifest file. The format is
documented in ``data_manifests/README.md``.

CSV (a plain table: ``pandas.read_csv`` and spreadsheets read it as is)::

    id,flair,t1,t1ce,t2,label,split,fold,label_scheme
    Brats18_2013_11_1,Brats18_2013_11_1/Brats18_2013_11_1_flair.nii.gz,...,train,0,brats

Reserved columns are ``id``, ``label``, ``split``, ``fold`` and ``label_scheme`` (the same scheme name, or compact
JSON of a custom scheme, on every row); every other column is a channel, in column order. An image cell is the
text of an :class:`~medseg.data.io.ImageRef`: a path, with ``[N]`` for channel N of a 4D file. Manifests written
before the ``label_scheme`` column existed carry the scheme in a ``# label_scheme: brats`` line above the header;
they are still read.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

from medseg.atomic import write_text_atomic
from medseg.data.io import ImageRef
from medseg.errors import MedsegError

RESERVED = ("id", "label", "split", "fold", "label_scheme")


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot name a case (its outputs are ``<id>.nii.gz`` files in the output folder), or ``None``.

    A case id is not empty, holds no path separator (``/``, ``\\``) and no control character, is not ``.`` or
    ``..`` and does not start with ``.`` (a hidden file, which evaluation does not read)."""
    if not isinstance(case_id, str) or not case_id.strip():
        return "is empty"
    if "/" in case_id or "\\" in case_id:
        return "holds a path separator ('/' or '\\'), so its outputs would be written outside the output folder"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in case_id):
        return "holds a control character (tab, newline...)"
    if case_id.startswith("."):
        return "starts with '.' ('..' or a hidden file name)"
    return None


def check_case_id(case_id: object, where: str | None = None) -> str:
    """``case_id`` when it can name a case (:func:`case_id_problem`), else a :class:`MedsegError` naming ``where``."""
    problem = case_id_problem(case_id)
    if problem:
        raise MedsegError(f"{where + ': ' if where else ''}case id {case_id!r} {problem}; a case id names its output files: "
                          "use letters, digits, '-', '_' and '.' (e.g. Brats18_2013_11_1)")
    return case_id


@dataclass(frozen=True)
class Case:
    """One case: ``images`` maps channel name -> :class:`ImageRef` (in channel order); ``label`` may be ``None``.

    Paths (or ``file[N]`` text) given for the images or the label are taken as :class:`ImageRef`.
    """

    id: str
    images: Mapping[str, ImageRef]
    label: ImageRef | None = None
    split: str | None = None
    fold: int | None = None

    def __post_init__(self) -> None:
        check_case_id(self.id)
        object.__setattr__(self, "images", {ch: ImageRef.parse(ref) for ch, ref in self.images.items()})
        if self.label is not None:
            object.__setattr__(self, "label", ImageRef.parse(self.label))

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.images)


@dataclass(frozen=True)
class Manifest:
    """Cases sharing one channel order, plus the label scheme name (or dict) of their labels."""

    channels: tuple[str, ...]
    cases: tuple[Case, ...]
    label_scheme: str | dict | None = None
    path: Path | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        return iter(self.cases)

    def __getitem__(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise KeyError(case_id)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def select(self, split: str | None = None, folds: Iterable[int] | None = None, exclude_folds: Iterable[int] | None = None) -> "Manifest":
        """Cases of one split and/or some folds."""
        keep = list(self.cases)
        if split is not None:
            keep = [c for c in keep if c.split == split]
        if folds is not None:
            fs = set(folds)
            keep = [c for c in keep if c.fold in fs]
        if exclude_folds is not None:
            fs = set(exclude_folds)
            keep = [c for c in keep if c.fold not in fs]
        return replace(self, cases=tuple(keep))


def _relative(base: Path, ref: ImageRef) -> str:
    """The manifest text of ``ref``: its path relative to ``base`` (absolute on another drive), ``[N]`` kept."""
    try:
        text = os.path.relpath(ref.path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        text = str(ref.path.resolve())
    return str(ImageRef(Path(text), ref.channel))


def read_manifest(path: str | Path) -> Manifest:
    """Read a CSV or JSON manifest; paths are resolved against the manifest's folder.

    Raises a :class:`MedsegError` naming the file and the problem for an empty manifest, a missing id
    column, duplicate case ids, a case with no image for a channel, or an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: manifest not found; build one with 'medseg manifest --layout auto DATA_DIR -o {path.name}'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MedsegError(f"{path}: not a text file; a manifest is CSV or JSON text (see data_manifests/README.md)") from None
    if path.suffix.lower() == ".json":
        manifest = _parse_json(text, path)
    else:
        manifest = _parse_csv(text, path)
    _check_cases(manifest, path)
    return manifest


def _parse_csv(text: str, path: Path) -> Manifest:
    lines = text.splitlines()
    meta: dict[str, str] = {}
    skipped = 0
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        skipped += 1
        line = lines.pop(0).lstrip("#").strip()
        if ":" in line:
            key, value = line.split(":", 1)
            meta[key.strip()] = value.strip()
    if not lines:
        raise MedsegError(f"{path}: the manifest is empty; it needs a header 'id,<channel>...,label' and one row per case")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "id" not in header:
        raise MedsegError(f"{path}: the header has no 'id' column (found {header}); the first column must be 'id'")
    channels = tuple(h for h in header if h not in RESERVED)
    if not channels:
        raise MedsegError(f"{path}: no image columns; add one column per channel (e.g. flair,t1,t1ce,t2)")
    base = path.parent
    cases = []
    schemes: dict[str, int] = {}  # label_scheme cell -> first row giving it
    for row_no, row in enumerate(reader, start=2 + skipped):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        cases.append(_case_from_row(row, channels, base, path, row_no))
        if "label_scheme" in header:
            schemes.setdefault(row.get("label_scheme", ""), row_no)
    return Manifest(channels, tuple(cases), _csv_scheme(schemes, meta.get("label_scheme"), path), path)


def _csv_scheme(cells: Mapping[str, int], comment: str | None, path: Path) -> str | dict | None:
    """The one label scheme of a CSV manifest: its ``label_scheme`` column, the same on every row, or the
    ``# label_scheme:`` line above the header of manifests written before the column existed."""
    sources = {f"row {row}": text for text, row in cells.items()}
    if comment:
        sources["the '# label_scheme:' line"] = comment
    parsed = {where: _parse_scheme(text, where, path) for where, text in sources.items()}
    distinct: dict[str, str] = {}  # scheme -> where it first appears
    for where, value in parsed.items():
        distinct.setdefault(json.dumps(value, sort_keys=True), where)
    if len(distinct) > 1:
        shown = ", ".join(f"{repr(sources[w]) if sources[w] else 'an empty cell'} in {w}" for w in list(distinct.values())[:3])
        raise MedsegError(f"{path}: label_scheme is not the same on every row ({shown}); a manifest has one label scheme: "
                          "write the same value (e.g. brats) in the label_scheme column of every row")
    return next(iter(parsed.values()), None)


def _parse_scheme(text: str, where: str, path: Path) -> str | dict | None:
    """A scheme cell: empty (``None``), a scheme name, or a custom scheme as JSON."""
    text = text.strip()
    if not text.startswith("{"):
        return text or None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MedsegError(f"{path}: the label_scheme of {where} is not valid JSON ({err}); give a scheme name "
                          "such as brats or a JSON object {\"name\": ..., \"labels\": {...}}") from None


def _case_from_row(row: Mapping[str, str], channels: tuple[str, ...], base: Path, path: Path, where) -> Case:
    case_id = row.get("id", "")
    if not case_id:
        raise MedsegError(f"{path}: row {where} has an empty id; every case needs a unique id")
    check_case_id(case_id, f"{path}: row {where}")
    missing = [ch for ch in channels if not row.get(ch)]
    if missing:
        raise MedsegError(f"{path}: case {case_id} has no image for channel(s) {missing}; every case needs all of {list(channels)}")
    fold = row.get("fold") or None
    if fold is not None:
        try:
            fold = int(fold)
        except ValueError:
            raise MedsegError(f"{path}: case {case_id} has fold {fold!r}; folds are integers") from None
    return Case(
        id=case_id,
        images={ch: ImageRef.parse(row[ch], base) for ch in channels},
        label=ImageRef.parse(row["label"], base) if row.get("label") else None,
        split=row.get("split") or None,
        fold=fold,
    )


def _parse_json(text: str, path: Path) -> Manifest:
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise MedsegError(f"{path}: not valid JSON ({err}); fix the syntax or write the manifest as CSV") from None
    if not isinstance(data, dict) or not data.get("cases"):
        raise MedsegError(f"{path}: the manifest is empty; it needs {{\"channels\": [...], \"cases\": [{{\"id\": ..., \"images\": ...}}]}}")
    if not isinstance(data["cases"], list) or not all(isinstance(e, dict) for e in data["cases"]):
        raise MedsegError(f"{path}: 'cases' must be a list of objects such as {{\"id\": ..., \"images\": {{...}}, \"label\": ...}}")
    channels = tuple(data.get("channels") or ())
    if not channels:
        first = data["cases"][0].get("images")
        channels = tuple(first) if isinstance(first, dict) else tuple(f"ch{i}" for i in range(len(first or [])))
    cases = []
    for i, entry in enumerate(data["cases"]):
        images = entry.get("images") or {}
        if isinstance(images, list):
            if len(images) != len(channels):
                raise MedsegError(f"{path}: case #{i} lists {len(images)} images but the manifest has {len(channels)} channels "
                                  f"{list(channels)}; give one image per channel")
            images = dict(zip(channels, images))
        row = {"id": str(entry.get("id", "")), "label": entry.get("label") or "", "split": entry.get("split") or "",
               "fold": "" if entry.get("fold") is None else str(entry["fold"]), **{k: str(v) for k, v in images.items()}}
        cases.append(_case_from_row(row, channels, path.parent, path, f"#{i}"))
    return Manifest(channels, tuple(cases), data.get("label_scheme"), path)


def _check_cases(manifest: Manifest, path: Path) -> None:
    if not manifest.cases:
        raise MedsegError(f"{path}: the manifest lists no cases; add one row per case")
    seen: set[str] = set()
    for case in manifest.cases:
        if case.id in seen:
            raise MedsegError(f"{path}: case id {case.id} appears more than once; case ids must be unique")
        seen.add(case.id)


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write a manifest (CSV or JSON by extension) atomically, with paths relative to its folder."""
    path = Path(path)
    base = path.parent.resolve() if path.parent.exists() else path.parent.absolute()
    _check_cases(manifest, path)
    has_label = any(c.label for c in manifest.cases)
    has_split = any(c.split for c in manifest.cases)
    has_fold = any(c.fold is not None for c in manifest.cases)
    if path.suffix.lower() == ".json":
        data = {"channels": list(manifest.channels), "label_scheme": manifest.label_scheme, "cases": []}
        for c in manifest.cases:
            entry: dict = {"id": c.id, "images": {ch: _relative(base, c.images[ch]) for ch in manifest.channels}}
            if c.label:
                entry["label"] = _relative(base, c.label)
            if c.split:
                entry["split"] = c.split
            if c.fold is not None:
                entry["fold"] = c.fold
            data["cases"].append(entry)
        text = json.dumps(data, indent=2) + "\n"
    else:
        out = io.StringIO()
        scheme = manifest.label_scheme
        if scheme is not None and not isinstance(scheme, str):
            scheme = json.dumps(scheme, separators=(",", ":"))
        optional = {"label": has_label, "split": has_split, "fold": has_fold, "label_scheme": bool(scheme)}
        header = ["id", *manifest.channels, *(name for name, present in optional.items() if present)]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for c in manifest.cases:
            row = [c.id, *(_relative(base, c.images[ch]) for ch in manifest.channels)]
            row += [_relative(base, c.label) if c.label else ""] if has_label else []
            row += [c.split or ""] if has_split else []
            row += ["" if c.fold is None else c.fold] if has_fold else []
            row += [scheme] if scheme else []
            writer.writerow(row)
        text = out.getvalue()
    write_text_atomic(path, text)
    return path


def check_fold_count(n_folds: int, n_cases: int, where: str = "--folds") -> int:
    """``n_folds`` when cross-validation can use it: 2 <= K <= the number of cases (every fold validates on at least
    one case and trains on the others); else a :class:`MedsegError` with the range."""
    if n_cases < 2:
        raise MedsegError(f"{where} {n_folds}: cross-validation needs at least 2 cases and there are {n_cases}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or not 2 <= n_folds <= n_cases:
        raise MedsegError(f"{where} {n_folds}: give 2 to {n_cases} folds (at most the number of cases); 5 is usual")
    return n_folds


def assign_folds(manifest: Manifest, n_folds: int = 5, seed: int = 0) -> Manifest:
    """Assign cases to ``n_folds`` folds deterministically (a shuffled round-robin); ``n_folds`` must be >= 1
    (``medseg manifest --folds K`` also requires K <= the number of cases: :func:`check_fold_count`)."""
    import numpy as np

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise MedsegError(f"folds: {n_folds!r} is not a number of folds; give a whole number >= 2, e.g. 5")

    order = np.random.default_rng(seed).permutation(len(manifest.cases))
    folds = {int(i): int(k % n_folds) for k, i in enumerate(order)}
    return replace(manifest, cases=tuple(replace(c, fold=folds[i]) for i, c in enumerate(manifest.cases)))
