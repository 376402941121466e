"""The data layer: volumes with geometry, manifests, label schemes, validation and synthetic data."""
from medseg.data.io import ImageRef, read_mask, read_volume, write_volume
from medseg.data.labels import LabelScheme, get_scheme, list_schemes
from medseg.data.manifest import Case, Manifest, read_manifest, write_manifest
from medseg.data.volume import Volume

__all__ = [
    "Volume",
    "ImageRef",
    "read_volume",
    "read_mask",
    "write_volume",
    "LabelScheme",
    "get_scheme",
    "list_schemes",
    "Case",
    "Manifest",
    "read_manifest",
    "write_manifest",
]
