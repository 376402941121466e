"""medseg: medical volumetric segmentation.

Train on BraTS-style multi-modal scans, predict in the scan's own geometry, and report Dice.
The Python API mirrors the command line.
"""
from __future__ import annotations

__version__ = "0.1.0"
