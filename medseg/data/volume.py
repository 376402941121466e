"""``Volume``: an array that carries its geometry.

The affine maps voxel indices (i, j, k) to RAS+ world coordinates in millimetres (the NIfTI/nibabel
convention). Spacing and orientation codes are derived from it, so they can never disagree with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    """A 2D or 3D image (optionally with trailing channels) and its voxel-to-world affine.

    Attributes:
        array: ``(X, Y, Z)`` or ``(X, Y)``; a 4D array ``(X, Y, Z, C)`` holds channels last as in NIfTI.
        affine: ``(4, 4)`` voxel index -> RAS+ millimetres.
        meta: free-form metadata kept from the file (e.g. the original on-disk dtype, source path).

    Example:
        >>> v = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 1.0, 3.0, 1.0]))
        >>> v.spacing, v.orientation
        ((2.0, 1.0, 3.0), ('R', 'A', 'S'))
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (channels, if any, excluded)."""
        return tuple(self.array.shape[: self.spatial_ndim])

    @property
    def spatial_ndim(self) -> int:
        return min(self.array.ndim, 3)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) for z in zooms[: self.spatial_ndim])

    @property
    def orientation(self) -> tuple[str, ...]:
        """Orientation codes (the world direction each array axis points to), e.g. ``('L','P','S')``."""
        return tuple(nib.orientations.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """A volume on the same grid with another array (same spatial shape required)."""
        if tuple(array.shape[: self.spatial_ndim]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape}")
        return Volume(array, self.affine.copy(), {**self.meta, **meta})

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when both volumes have the same spatial shape and affines equal within ``atol`` (mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, orientation={''.join(self.orientation)})"
        )
