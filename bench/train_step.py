"""Seconds per training step (forward + backward + AdamW) of registry models, fp32 against bf16 autocast.

Used to choose the CPU settings of the shipped pipelines (docs/performance.md, "Training").

    python bench/train_step.py                       # the U-Net variants at 64^3, batch 2
    python bench/train_step.py --patch 96 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from medseg.models import create_model

CONFIGS = {
    "unet 16-128, 1 residual unit": ("unet", {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1}),
    "unet 16-128, plain blocks": ("unet", {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 0}),
    "unet 8-64, plain blocks": ("unet", {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0}),
    "segresnet 8 filters": ("segresnet", {"init_filters": 8}),
}


def step_seconds(name: str, kwargs: dict, patch: int, batch: int, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    model = create_model(name, 3, 4, 3, **kwargs)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 4, patch, patch, patch)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step sets up oneDNN primitives
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"patch {args.patch}^3, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats} steps")
    print(f"| model | fp32 s/step | bf16 s/step | bf16 speed-up |\n|---|---|---|---|")
    for label, (name, kwargs) in CONFIGS.items():
        fp32 = step_seconds(name, kwargs, args.patch, args.batch, False, args.repeats)
        bf16 = step_seconds(name, kwargs, args.patch, args.batch, True, args.repeats)
        print(f"| {label} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
