"""Seconds per training step (forward + backward + AdamW) of registry models, fp32 against bf16 autocast.

Used to choose the CPU settings of the shipped pipelines (docs/performance.md, "Training") and, with
``--device cuda``, to see what a GPU step costs (cuDNN's algorithm search on or off: ``--cudnn-benchmark``).

    python bench/train_step.py                       # the U-Net variants at 64^3, batch 2
    python bench/train_step.py --patch 96 --repeats 5
    python bench/train_step.py --device cuda --patch 128 --only brats_unet3d --repeats 10
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
    "unet 16-256, 2 residual units (brats_unet3d.yaml)": (
        "unet", {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}),
}


def step_seconds(name: str, kwargs: dict, patch: int, batch: int, bf16: bool, repeats: int,
                 device: torch.device = torch.device("cpu")) -> float:
    torch.manual_seed(0)
    model = create_model(name, 3, 4, 3, **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 4, patch, patch, patch, device=device)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 1:  # the first steps set up oneDNN primitives / choose cuDNN algorithms
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms for each shape")
    ap.add_argument("--only", default=None, help="only the models whose label contains this text")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"patch {args.patch}^3, batch {args.batch}, {where}, median of {args.repeats} steps"
          + (f", cudnn.benchmark {args.cudnn_benchmark}" if device.type == "cuda" else ""))
    digits = 4 if device.type == "cuda" else 2
    print(f"| model | fp32 s/step | bf16 s/step | bf16 speed-up |\n|---|---|---|---|")
    for label, (name, kwargs) in CONFIGS.items():
        if args.only and args.only not in label:
            continue
        fp32 = step_seconds(name, kwargs, args.patch, args.batch, False, args.repeats, device)
        bf16 = step_seconds(name, kwargs, args.patch, args.batch, True, args.repeats, device)
        print(f"| {label} | {fp32:.{digits}f} | {bf16:.{digits}f} | {fp32 / bf16:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
