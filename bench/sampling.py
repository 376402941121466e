"""Patches per second of the training data path against the patches per second the network consumes.

The data path is the trainer's: cache -> sampler -> crop with margin (a view) -> augmentation -> batches, through
a DataLoader built as the trainer builds it, with augmentation off and with the pipeline's augmentation (nnU-Net's
defaults in the shipped pipelines). The consumer is the pipeline's model at the same patch size and batch:
seconds per training step (forward, backward, AdamW) on a fixed batch — what the trainer needs — and the same
steps fed by the loader — what it gets when workers and training share the CPU (repeated, interleaved, medians).
The CPU time of one patch on one thread is the cost of the data path itself, insensitive to other jobs on the
machine. Rates are measured after the first batch (worker start-up excluded).

    python bench/sampling.py                                   # the demo pipeline's model and patch, 8 synthetic cases
    python bench/sampling.py --patch 96 96 96 --workers 0 1 2
    python bench/sampling.py --patch 128 128 128 --cpu-only     # the cost per patch only
    python bench/sampling.py --pipeline pipelines/brats_unet3d_2mm.yaml --manifest data_manifests/brats18.csv
    python bench/sampling.py --pipeline pipelines/brats_unet3d.yaml --device cuda --workers 4 8 12   # feeding a GPU
    python bench/sampling.py --manifest data_manifests/brats18_20.csv --cache disk   # cases memory-mapped from .npy
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medseg.data.manifest import read_manifest
from medseg.data.synthetic import SyntheticSpec, generate_dataset
from medseg.models import create_model
from medseg.runtime import resolve_precision
from medseg.training import setup
from medseg.training.config import load_pipeline, parse_pipeline


PIN = False  # pinned host memory for the batches, as the trainer does when it trains on a GPU


def _loader(ds, batch: int, workers: int):
    kw = {"num_workers": workers, "multiprocessing_context": "fork", "prefetch_factor": 4} if workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=batch, drop_last=True, pin_memory=PIN, **kw)


def cpu_seconds_per_patch(ds) -> float:
    """CPU time of one patch in this process on one thread: the work itself, insensitive to other jobs' load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds[0]
    start = time.process_time()
    for i in range(1, len(ds)):
        ds[i]
    torch.set_num_threads(threads)
    return (time.process_time() - start) / (len(ds) - 1)


def loader_rate(ds, batch: int, workers: int) -> float:
    """Patches per second, from the first batch on."""
    it = iter(_loader(ds, batch, workers))
    next(it)
    start, n = time.perf_counter(), 0
    for x, _ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - start)


class Trainer:
    """The pipeline's model, AdamW and a sigmoid loss: one training step per call (the trainer's work per batch)."""

    def __init__(self, p, in_channels: int, out_channels: int, device: torch.device = torch.device("cpu")):
        torch.manual_seed(0)
        self.device = device
        self.model = create_model(p.model.name, p.model.spatial_dims, in_channels, out_channels, **p.model.kwargs).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.precision = resolve_precision(p.training.amp, device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.precision.autocast():
            out = self.model(x)
        loss = F.binary_cross_entropy_with_logits(out.float(), y.float())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def fixed_batch_seconds(trainer: Trainer, ds, batch: int, steps: int) -> float:
    x, y = next(iter(_loader(ds, batch, 0)))
    for _ in range(5):  # oneDNN sets up its primitives (and bf16 weight caches) in the first steps
        trainer.step(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fed_seconds(trainer: Trainer, ds, batch: int, workers: int) -> float:
    """Seconds per step when the loader feeds the steps, from the first batch on."""
    it = iter(_loader(ds, batch, workers))
    trainer.step(*next(it))
    start, n = time.perf_counter(), 0
    for x, y in it:
        trainer.step(x, y)
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="pipelines/demo.yaml", help="model, patch, batch and augmentation from here")
    ap.add_argument("--manifest", default=None, help="a manifest (default: 8 synthetic cases of 160x160x128)")
    ap.add_argument("--patch", type=int, nargs="+", default=None, help="default: the pipeline's")
    ap.add_argument("--batch", type=int, default=None, help="default: the pipeline's")
    ap.add_argument("--batches", type=int, default=40, help="batches per loader measurement")
    ap.add_argument("--steps", type=int, default=20, help="training steps per step measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the step measurements")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU time per patch (no loader, no training)")
    ap.add_argument("--device", default="cpu", help="where the training steps run: cpu or cuda")
    ap.add_argument("--cache", choices=("memory", "disk"), default="memory",
                    help="data.cache: disk writes the prepared cases to a temporary folder and maps them from there")
    args = ap.parse_args()
    global PIN
    device = torch.device(args.device)
    PIN = device.type == "cuda"
    tmp = tempfile.TemporaryDirectory()
    manifest = args.manifest or generate_dataset(Path(tmp.name), 8, SyntheticSpec(shape=(160, 160, 128)), seed=0)
    d = load_pipeline(args.pipeline).to_dict()
    d["data"] = {"manifest": str(Path(manifest).resolve()), "label_scheme": "brats", "val_fold": None, "cache": args.cache}
    d["sampling"].update({k: v for k, v in (("patch_size", args.patch), ("batch_size", args.batch)) if v is not None})
    d["inference"]["roi_size"] = None
    p = parse_pipeline(d)
    off = parse_pipeline({**d, "augmentation": {**d["augmentation"], "enabled": False}})
    m = read_manifest(manifest)
    scheme = setup.label_scheme(p, m)
    cache = setup.load_cases(p, m, scheme, Path(tmp.name), progress=False)
    cases, batch, patch = list(cache.values()), p.sampling.batch_size, list(p.sampling.patch_size)
    channels = cases[0].image.shape[0]
    trainer = Trainer(p, channels, setup.out_channels(scheme, p.data.target), device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"load average {os.getloadavg()[0]:.1f}; {len(cases)} cases; model {p.model.name} {p.model.kwargs}; patch {patch}, "
          f"batch {batch}; {trainer.precision.name}, {where}; {os.cpu_count()} CPUs; cases cached in {args.cache}")
    settings = (("off", off), ("pipeline (nnU-Net defaults)", p))
    cpu = {name: cpu_seconds_per_patch(setup.PatchDataset(cases, q, scheme, args.batches * batch)) for name, q in settings}
    if args.cpu_only:
        for name, seconds in cpu.items():
            print(f"augmentation {name}: {1000 * seconds:.1f} ms CPU per patch on one thread ({1 / seconds:.0f} patches/s per core)")
        return
    rates = {(name, w): loader_rate(setup.PatchDataset(cases, q, scheme, (args.batches + 1) * batch), batch, w)
             for name, q in settings for w in args.workers}
    fixed, fed = [], {key: [] for key in rates}
    for _ in range(args.repeats):  # interleaved, so that the machine's load falls on every setting alike
        fixed.append(fixed_batch_seconds(trainer, setup.PatchDataset(cases, p, scheme, batch), batch, args.steps))
        for name, q in settings:
            for w in args.workers:
                fed[name, w].append(fed_seconds(trainer, setup.PatchDataset(cases, q, scheme, (args.steps + 1) * batch), batch, w))
    step = statistics.median(fixed)
    needed = batch / step
    print(f"training step on a fixed batch: {step:.3f} s -> the trainer consumes {needed:.1f} patches/s "
          f"(medians of {args.repeats} interleaved runs; load average now {os.getloadavg()[0]:.1f})")
    for name, seconds in cpu.items():
        print(f"augmentation {name}: {1000 * seconds:.1f} ms CPU per patch on one thread -> one core makes "
              f"{1 / seconds:.0f} patches/s, {1 / seconds / needed:.1f}x what the trainer consumes")
    print("\n| augmentation | workers | loader patches/s | loader / consumed | s/step fed by the loader | vs fixed batch |")
    print("|---|---|---|---|---|---|")
    for (name, w), rate in rates.items():
        seconds = statistics.median(fed[name, w])
        print(f"| {name} | {w} | {rate:.1f} | {rate / needed:.1f}x | {seconds:.3f} | {seconds / step:.2f}x |")


if __name__ == "__main__":
    main()
