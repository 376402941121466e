"""Seconds per case of a trained model, scan files to label map, and agreement with another device's label maps.

What ``medseg predict`` does for one case, timed in one process: read the channels, the checkpoint's preprocessing,
the sliding window (with the checkpoint's TTA and precision), inverting onto the scan's grid, the label map; then
writing it, timed apart. Every case is predicted twice and both passes are printed: the first includes CUDA's and
cuDNN's set-up (or oneDNN's on a CPU), the second is what a serving process pays per case.

With ``--reference DIR`` (label maps of the same checkpoint made elsewhere, e.g. on the CPU), each label map is
checked against it: voxels that differ, Dice per BraTS region, and shape and affine against the scan's first channel.

    python bench/predict_cases.py --model runs/brats_cascade/fold_0 --input data_manifests/brats18.csv --output /tmp/p
    python bench/predict_cases.py --model CKPT --input cases.csv --output /tmp/gpu --device cuda --reference /tmp/cpu
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from inference import dice  # bench/inference.py: Dice with both masks empty = 1

from medseg.data.labels import get_scheme
from medseg.inference.inputs import resolve_inputs
from medseg.inference.predictor import Predictor
from medseg.runtime import tune_allocator


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(ours: Path, reference: Path, scan: Path) -> str:
    a, b, src = nib.load(ours), nib.load(reference), nib.load(scan)
    x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
    scheme = get_scheme("brats")
    dices = "/".join(f"{dice(p, q):.4f}" for p, q in zip(scheme.to_regions(x), scheme.to_regions(y)))
    return (f"shape as the scan {x.shape == src.shape}, affine as the scan {np.allclose(a.affine, src.affine)}; "
            f"against the reference: {(x != y).sum()} voxels differ, Dice WT/TC/ET {dices}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a run folder, CV folder or checkpoint")
    ap.add_argument("--input", required=True, help="a manifest or case folder, as medseg predict takes")
    ap.add_argument("--output", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reference", default=None, help="label maps of the same model to compare with")
    args = ap.parse_args()
    tune_allocator()  # as the command line does
    predictor = Predictor.from_checkpoint(args.model, device=args.device)
    cases = resolve_inputs([args.input], predictor.loaded.channels)
    where = predictor.settings.device
    print(f"{len(cases)} cases; device {where}; amp {predictor.settings.amp}; TTA {predictor.settings.tta}; "
          f"roi {predictor.settings.roi_size}")
    written = {}
    for rep in range(2):
        for case in cases:
            _sync(where)
            start = time.perf_counter()
            prediction = predictor.predict_case(case)
            _sync(where)
            predicted = time.perf_counter()
            written[case.id] = predictor.write(prediction, case, args.output)[0]  # the label map
            print(f"pass {rep + 1} {case.id}: predict {predicted - start:.3f} s, write {time.perf_counter() - predicted:.3f} s",
                  flush=True)
    if args.reference:
        for case in cases:
            label = written[case.id]
            print(f"{case.id}: {agreement(label, Path(args.reference) / label.name, case.images[0].path)}")


if __name__ == "__main__":
    main()
