"""Label schemes as data: class values, class names and nested regions.

A scheme names the label values a label map may contain and, for tumour data, the regions evaluated and
trained on (BraTS whole tumour WT, tumour core TC, enhancing tumour ET). Converting a label map to regions
and back, and from one convention to another (ET = 4 vs ET = 3), is driven by these tables, never by a
code path per dataset. A value that the scheme does not know is an error, never a silent zero.

Built-in schemes:

========== ============================================== =====================================
name       labels                                         regions
========== ============================================== =====================================
brats      1 NCR (necrotic/non-enhancing), 2 ED, 4 ET     WT {1,2,4}, TC {1,4}, ET {4}
brats2023  1 NCR, 2 ED, 3 ET                              WT {1,2,3}, TC {1,3}, ET {3}
msd        1 ED, 2 NCR (non-enhancing), 3 ET (Task01)     WT {1,2,3}, TC {2,3}, ET {3}
binary     1 foreground (masks stored 0/255 read as 0/1)  —
binary_lossy 1 foreground: file values >= 128             —
foreground 1 foreground: any non-zero file value          —
em_membrane 1 membrane: file 0 (ISBI 2012 EM: 0 membrane,  —
           255 cell interior)
trimap     1 foreground (file 1), file 2 background,      —
           file 3 boundary ignored (Oxford-IIIT Pet)
labels     any non-negative integer (generic multi-class) —
========== ============================================== =====================================

**How mask files map to labels.** A scheme's labels are the values a network is trained on and a prediction is
written with (0 background, then the class values). Mask files often store classes differently: 0/255 PNGs,
1-bit BMPs (True/False), an inverted convention (ISBI EM: 0 is the membrane), JPEG masks with values near 0 and
255, instance maps (one value per object), trimaps with an "unknown" value. :meth:`LabelScheme.decode` turns a
mask file's values into labels, driven by three optional fields of the scheme, and only where the scheme says so:

- ``mask_values``: file value -> label value (``{255: 1}``; values not listed are kept as they are);
- ``threshold``: for one-class schemes, file values ``>= threshold`` are the class and the rest background
  (lossy masks; ``1`` for "any non-zero"), applied instead of ``mask_values``;
- ``ignore``: file values excluded from training losses, patch sampling and metrics; they become
  :data:`IGNORE` (255) in a decoded label map and class index -1 for the loss.

A decoded map holds only label values and :data:`IGNORE`; anything else is an error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from medseg.errors import MedsegError, check_choice


@dataclass(frozen=True)
class LabelScheme:
    """Label values with names, and named regions (sets of label values).

    Attributes:
        name: scheme name.
        labels: class name -> label value, background (0) excluded. Empty for the generic scheme, which
            accepts any non-negative integer.
        regions: region name -> label values it contains (nested regions, e.g. ET ⊂ TC ⊂ WT).

    Example:
        >>> s = get_scheme("brats")
        >>> s.to_regions(np.array([0, 1, 2, 4])).astype(int).tolist()
        [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
        >>> s.from_regions(s.to_regions(np.array([0, 1, 2, 4]))).tolist()
        [0, 1, 2, 4]
    """

    name: str
    labels: Mapping[str, int] = field(default_factory=dict)
    regions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    description: str = ""
    mask_values: Mapping[int, int] = field(default_factory=dict)
    threshold: float | None = None
    ignore: tuple[int, ...] = ()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, spec: Mapping) -> "LabelScheme":
        """Build a scheme from ``{"name", "labels": {name: value}, "regions": {name: [values]}}``."""
        unknown = set(spec) - set(_SPEC_KEYS)
        if unknown:
            raise MedsegError(f"label scheme: unknown keys {sorted(unknown)}; allowed: {', '.join(_SPEC_KEYS)}")
        labels = dict(spec.get("labels") or {})
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
            raise MedsegError(f"label scheme {spec.get('name')!r}: label values must be integers, got {labels}")
        labels = {str(k): int(v) for k, v in labels.items()}
        if any(v <= 0 for v in labels.values()) or len(set(labels.values())) != len(labels):
            raise MedsegError(f"label scheme {spec.get('name')!r}: label values must be distinct positive integers (0 is background), got {labels}")
        regions = {str(k): tuple(int(x) for x in v) for k, v in dict(spec.get("regions") or {}).items()}
        for rname, values in regions.items():
            bad = [v for v in values if v not in labels.values()]
            if bad:
                raise MedsegError(f"label scheme {spec.get('name')!r}: region {rname} uses values {bad} that are not labels {sorted(labels.values())}")
        name = spec.get("name")
        try:
            mask_values = {int(k): int(v) for k, v in dict(spec.get("mask_values") or {}).items()}
            ignore = tuple(int(v) for v in (spec.get("ignore") or ()))
            threshold = None if spec.get("threshold") is None else float(spec["threshold"])
        except (TypeError, ValueError):
            raise MedsegError(f"label scheme {name!r}: mask_values must map integers to integers, ignore must be a list of "
                              "integers and threshold a number, e.g. {mask_values: {255: 1}, ignore: [3], threshold: 128}") from None
        bad = [v for v in mask_values.values() if v != 0 and v not in labels.values()]
        if bad:
            raise MedsegError(f"label scheme {name!r}: mask_values map to {bad}, which are not labels {sorted(labels.values())} or 0")
        if threshold is not None and len(labels) != 1:
            raise MedsegError(f"label scheme {name!r}: threshold needs exactly one class (a binary mask), the scheme has {len(labels)}")
        if ignore and max(labels.values(), default=0) >= IGNORE:
            raise MedsegError(f"label scheme {name!r}: an ignore value needs label values below {IGNORE}")
        return cls(str(name or "custom"), labels, regions, str(spec.get("description", "")), mask_values, threshold, ignore)

    def to_dict(self) -> dict:
        out = {"name": self.name, "labels": dict(self.labels), "regions": {k: list(v) for k, v in self.regions.items()}, "description": self.description}
        if self.mask_values:
            out["mask_values"] = {int(k): int(v) for k, v in self.mask_values.items()}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.ignore:
            out["ignore"] = list(self.ignore)
        return out

    # ----------------------------------------------------------------- queries
    @property
    def is_generic(self) -> bool:
        return not self.labels

    @property
    def values(self) -> tuple[int, ...]:
        """Allowed label values, background included, sorted."""
        return (0, *sorted(self.labels.values()))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in order of label value (background excluded)."""
        return tuple(sorted(self.labels, key=self.labels.get))

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(self.regions)

    @property
    def has_ignore(self) -> bool:
        """True when the scheme declares file values to ignore (decoded maps may hold :data:`IGNORE`)."""
        return bool(self.ignore)

    @property
    def decodes(self) -> bool:
        """True when mask files are not read as they are (``mask_values``, ``threshold`` or ``ignore`` set)."""
        return bool(self.mask_values) or self.threshold is not None or bool(self.ignore)

    def unknown_values(self, array: np.ndarray) -> list[int | float]:
        """Values in ``array`` that the scheme does not allow (empty list when all are valid); :data:`IGNORE`
        is allowed when the scheme ignores some values."""
        values = present_values(array)
        if self.is_generic:
            return [v for v in values if v < 0 or v != int(v)]
        allowed = set(self.values) | ({IGNORE} if self.has_ignore else set())
        return [v for v in values if v not in allowed]

    def decode(self, array: np.ndarray, where: str, *, prediction: bool = False) -> np.ndarray:
        """Mask file values -> label values (and :data:`IGNORE`), checked; see the module docstring.

        ``prediction=True`` reads a label map written by a model (already label values): only the parts of
        ``mask_values`` that send a non-label file value to a label (``255 -> 1``) are applied, so a 0/255
        prediction from another tool reads like a 0/1 one; thresholds and inverted conventions are not applied.
        """
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8)
        if not self.decodes:
            self.check(array, where)
            return array
        if array.dtype.kind == "f" and not (self.threshold is not None and not prediction):
            if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
                raise MedsegError(f"{where}: the mask holds non-integer values; a label map holds integer class values")
        dtype = np.uint8 if max(self.values) < 256 else np.int32
        if prediction:
            mapping = {k: v for k, v in self.mask_values.items() if k not in self.values}
            ignored = np.zeros(array.shape, bool)
        else:
            ignored = np.isin(array, self.ignore) if self.ignore else np.zeros(array.shape, bool)
            mapping = dict(self.mask_values)
        if self.threshold is not None and not prediction:
            out = np.where(array >= self.threshold, next(iter(self.labels.values())), 0).astype(dtype)
        else:
            out = array.astype(np.int64, copy=True) if mapping else array
            if mapping:
                src = array.astype(np.int64, copy=False)
                for file_value, label_value in mapping.items():
                    out[src == file_value] = label_value
        if ignored.any():
            out = np.where(ignored, IGNORE, out)
        self.check(np.where(ignored, 0, out) if ignored.any() else out, where)
        return np.asarray(out).astype(dtype, copy=False)

    def check(self, array: np.ndarray, where: str) -> None:
        """Raise a :class:`MedsegError` naming ``where`` if ``array`` holds values outside the scheme."""
        bad = self.unknown_values(array)
        if bad:
            shown = ", ".join(_fmt(v) for v in bad[:5])
            allowed = "non-negative integers" if self.is_generic else ", ".join(map(str, self.values))
            raise MedsegError(
                f"{where}: label value(s) {shown} are not in label scheme '{self.name}' (allowed: {allowed}); "
                f"choose the scheme the labels were made with (one of {', '.join(list_schemes())}) or fix the label map"
            )

    # ----------------------------------------------------------------- conversions
    def to_regions(self, label: np.ndarray) -> np.ndarray:
        """Label map ``(*spatial)`` -> boolean regions ``(R, *spatial)`` in the order of ``regions``."""
        if not self.regions:
            raise MedsegError(f"label scheme '{self.name}' defines no regions; use a tumour scheme (brats, brats2023, msd) or train on labels")
        return np.stack([np.isin(label, values) for values in self.regions.values()])

    def from_regions(self, regions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Regions ``(R, *spatial)`` (masks or probabilities) -> label map, innermost region winning.

        Each region owns the label values it contains that no smaller nested region contains (for BraTS:
        WT owns ED, TC owns NCR, ET owns ET); regions are painted from the largest to the smallest.
        """
        masks = regions > threshold if regions.dtype != bool else regions
        out = np.zeros(masks.shape[1:], dtype=np.uint8 if max(self.values) < 256 else np.int32)
        for index, value in self._region_paint_order():
            out[masks[index]] = value
        return out

    def _region_paint_order(self) -> list[tuple[int, int]]:
        names = list(self.regions)
        sets = [set(self.regions[n]) for n in names]
        order = sorted(range(len(names)), key=lambda i: -len(sets[i]))
        painted = []
        for i in order:
            inner = set().union(*[s for j, s in enumerate(sets) if j != i and s < sets[i]])
            own = sorted(sets[i] - inner)
            if len(own) != 1:
                raise MedsegError(f"label scheme '{self.name}': region {names[i]} does not own exactly one label ({own}); regions must be nested")
            painted.append((i, own[0]))
        return painted

    def to_indices(self, label: np.ndarray) -> np.ndarray:
        """Label values -> contiguous class indices 0..K (for softmax training); :data:`IGNORE` -> -1 when the
        scheme ignores values. Generic: unchanged."""
        if self.is_generic:
            return label.astype(np.int64, copy=False)
        lut = np.zeros(max(*self.values, IGNORE if self.has_ignore else 0) + 1, dtype=np.int64)
        for index, value in enumerate(self.values):
            lut[value] = index
        if self.has_ignore:
            lut[IGNORE] = -1
        return lut[label.astype(np.int64, copy=False)]

    def from_indices(self, indices: np.ndarray) -> np.ndarray:
        """Contiguous class indices 0..K -> label values of the scheme."""
        if self.is_generic:
            return indices.astype(np.int32, copy=False)
        lut = np.asarray(self.values, dtype=np.uint8 if max(self.values) < 256 else np.int32)
        return lut[indices]

    def convert_to(self, label: np.ndarray, target: "LabelScheme") -> np.ndarray:
        """Relabel a map from this convention to ``target`` by class name (e.g. ET = 3 -> ET = 4)."""
        if self.is_generic or target.is_generic:
            raise MedsegError(f"cannot convert between '{self.name}' and '{target.name}': the generic scheme has no class names")
        missing = [n for n in self.labels if n not in target.labels]
        if missing:
            raise MedsegError(f"cannot convert '{self.name}' to '{target.name}': classes {missing} have no counterpart")
        lut = np.zeros(max(self.values) + 1, dtype=np.int32)
        for name, value in self.labels.items():
            lut[value] = target.labels[name]
        self.check(label, f"conversion {self.name}->{target.name}")
        return lut[label.astype(np.int64, copy=False)].astype(np.uint8 if max(target.values) < 256 else np.int32)


IGNORE = 255  # the value of ignored voxels in a decoded label map (class index -1 for losses)
_SPEC_KEYS = ("name", "labels", "regions", "description", "mask_values", "threshold", "ignore")


def present_values(array: np.ndarray) -> list[int | float]:
    """Sorted distinct values of ``array`` (fast path for small non-negative integers)."""
    if array.dtype.kind in "ui":
        flat = array.ravel()
        lo, hi = int(flat.min(initial=0)), int(flat.max(initial=0))
        if lo >= 0 and hi < 65536:
            counts = np.bincount(flat.astype(np.int64, copy=False), minlength=1)
            return [int(v) for v in np.nonzero(counts)[0]]
    values = np.unique(array)
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        LabelScheme("brats", {"NCR": 1, "ED": 2, "ET": 4}, {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
                    "BraTS 2012-2021: 1 necrotic/non-enhancing core, 2 edema, 4 enhancing tumour"),
        LabelScheme("brats2023", {"NCR": 1, "ED": 2, "ET": 3}, {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
                    "BraTS 2023: 1 necrotic core, 2 edema, 3 enhancing tumour"),
        LabelScheme("msd", {"ED": 1, "NCR": 2, "ET": 3}, {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
                    "Medical Segmentation Decathlon Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour"),
        LabelScheme("binary", {"foreground": 1}, {}, "0 background, 1 foreground; masks stored as 0/255 read as 0/1",
                    mask_values={255: 1}),
        LabelScheme("binary_lossy", {"foreground": 1}, {},
                    "binary masks saved lossily (JPEG, resized): file values >= 128 are foreground", threshold=128),
        LabelScheme("foreground", {"foreground": 1}, {},
                    "any non-zero file value is foreground (instance label maps, 0/1 or 0/255 masks)", threshold=1),
        LabelScheme("em_membrane", {"membrane": 1}, {},
                    "ISBI 2012 EM: file 0 is membrane (label 1), file 255 cell interior (background)",
                    mask_values={0: 1, 255: 0}),
        LabelScheme("trimap", {"foreground": 1}, {},
                    "trimaps (Oxford-IIIT Pet): file 1 foreground, 2 background, 3 boundary/unknown (ignored)",
                    mask_values={2: 0}, ignore=(3,)),
        LabelScheme("labels", {}, {}, "generic multi-class: any non-negative integer label"),
    )
}


def list_schemes() -> list[str]:
    return list(SCHEMES)


def get_scheme(scheme: str | Mapping | LabelScheme) -> LabelScheme:
    """A built-in scheme by name, a scheme from a dict (pipeline files), or the scheme itself."""
    if isinstance(scheme, LabelScheme):
        return scheme
    if isinstance(scheme, Mapping):
        return LabelScheme.from_dict(scheme)
    return SCHEMES[check_choice(scheme, list_schemes(), "label scheme")]
