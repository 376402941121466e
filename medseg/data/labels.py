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
binary     1 foreground                                   —
labels     any non-negative integer (generic multi-class) —
========== ============================================== =====================================
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

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, spec: Mapping) -> "LabelScheme":
        """Build a scheme from ``{"name", "labels": {name: value}, "regions": {name: [values]}}``."""
        unknown = set(spec) - {"name", "labels", "regions", "description"}
        if unknown:
            raise MedsegError(f"label scheme: unknown keys {sorted(unknown)}; allowed: name, labels, regions, description")
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
        return cls(str(spec.get("name", "custom")), labels, regions, str(spec.get("description", "")))

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": dict(self.labels), "regions": {k: list(v) for k, v in self.regions.items()}, "description": self.description}

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

    def unknown_values(self, array: np.ndarray) -> list[int | float]:
        """Values in ``array`` that the scheme does not allow (empty list when all are valid)."""
        values = present_values(array)
        if self.is_generic:
            return [v for v in values if v < 0 or v != int(v)]
        allowed = set(self.values)
        return [v for v in values if v not in allowed]

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
        """Label values -> contiguous class indices 0..K (for softmax training). Generic: unchanged."""
        if self.is_generic:
            return label.astype(np.int64, copy=False)
        lut = np.zeros(max(self.values) + 1, dtype=np.int64)
        for index, value in enumerate(self.values):
            lut[value] = index
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
        LabelScheme("binary", {"foreground": 1}, {}, "0 background, 1 foreground"),
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
