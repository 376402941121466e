"""Seconds to resample a label map with :func:`medseg.data.resample.resample_label` against the plain way of the same
rule: every value's mask interpolated by ``torch.nn.functional.interpolate`` over the whole grid, then the argmax.

Three maps on BraTS's 240x240x155 grid taken to 2 mm (120x120x78): a BraTS-like label (background and 3 classes), a
map of 200 small objects (instance ids), and a map of 100 organ-sized boxes (a many-class CT). Medians of
``--repeat`` runs, and a real BraTS label when ``../shared/data`` is there, after a warm-up call; one thread; the results of both ways are compared (equal up to float rounding of exact ties).

    python bench/label_resampling.py
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.io import read_mask
from medseg.data.resample import resample_label

SHAPE, NEW = (240, 240, 155), (120, 120, 78)


def per_value(label: np.ndarray, shape) -> np.ndarray:
    best = out = None
    for value in np.unique(label):
        share = F.interpolate(torch.from_numpy((label == value).astype(np.float32))[None, None], size=shape,
                              mode="trilinear", align_corners=False)[0, 0].numpy()
        if best is None:
            best, out = share, np.full(shape, value, dtype=label.dtype)
        else:
            take = share >= best
            out[take] = value
            best = np.maximum(best, share)
    return out


def maps(rng: np.random.Generator) -> dict[str, np.ndarray]:
    grid = np.indices(SHAPE, dtype=np.float32)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, (120, 110, 80))))
    brats = np.select([r < 8, r < 14, r < 30], [1, 3, 2], 0).astype(np.uint8)
    objects = np.zeros(SHAPE, np.uint16)
    for v in range(1, 201):
        c = rng.integers(10, 140, 3)
        objects[c[0]:c[0] + 12, c[1]:c[1] + 10, c[2]:c[2] + 8] = v
    organs = np.zeros(SHAPE, np.uint8)
    for v in range(1, 101):
        c = rng.integers(0, 200, 3)
        organs[c[0]:c[0] + 40, c[1]:c[1] + 35, c[2]:min(c[2] + 30, SHAPE[2])] = v
    found = {"brats-like (4 values)": brats, "200 objects": objects, "100 organs": organs}
    real = Path("../shared/data/brats18/Brats18_2013_11_1/Brats18_2013_11_1_seg.nii.gz")
    if real.exists():  # a real BraTS label, when the shared data is there
        found["real BraTS label"] = np.asarray(read_mask(real).array).astype(np.uint8)
    return found


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    resample_label(np.eye(4, dtype=np.uint8), (2, 2))  # imports (scipy) outside the timings
    print(f"{'map':<24}{'resample_label s':>18}{'per value s':>14}{'ratio':>8}{'differing voxels':>18}")
    for name, label in maps(np.random.default_rng(0)).items():
        ours = timed(lambda: resample_label(label, NEW), args.repeat)
        plain = timed(lambda: per_value(label, NEW), args.repeat)
        differ = int((resample_label(label, NEW) != per_value(label, NEW)).sum())
        print(f"{name:<24}{ours:>18.2f}{plain:>14.2f}{plain / ours:>7.1f}x{differ:>18}")


if __name__ == "__main__":
    main()
