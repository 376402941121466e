"""Benchmark: medseg's sliding-window engine against MONAI's ``sliding_window_inference`` on a real BraTS case.

Both paths get the same weights, the same z-scored 4x240x240x155 volume and the same window settings (roi,
overlap, Gaussian blending, window batch). Each run happens in its own subprocess so peak RAM (``ru_maxrss``)
is measured per path; runs are interleaved (machines are shared and noisy: compare ratios from one run).

Reported per path: median seconds of the sliding-window call, peak RSS, windows evaluated, network GFLOP done
per second and its share of the compute floor (346 GFLOP/s fp32, 1223 GFLOP/s bf16: docs/performance notes),
and the agreement (Dice per region WT/TC/ET, voxel agreement) of the thresholded label maps with MONAI's.

Random weights give near-random labels, so by default the network is "pseudo-trained": its region logits are
``w * network(x) / std + 3 * (intensity - threshold)`` on FLAIR (WT) and T1ce (TC, ET) (``w = --net-weight``, 0.1;
``std``: the network's output spread on a fixed random input),
which segments bright regions like a weak tumour model while keeping the full network cost. A random network
with instance normalisation is far more sensitive to where a window sits than a trained one, so a large ``w``
measures window-placement noise rather than the engine. ``--model CKPT`` uses trained weights as they are.

The default network is MONAI's UNet (16-256 channels, strides 2, 2 residual units; 4.8 M parameters), the one
the speed notes measured; ``--net medseg-unet`` uses medseg's registry U-Net with the same channels.

    python bench/inference.py                               # 5 M-parameter 3D U-Net, roi 128, overlap 0.5
    python bench/inference.py --roi 96 --overlap 0.25 --repeats 5
    python bench/inference.py --model runs/unet3d/checkpoints/best.pt
    python bench/inference.py --device cuda                 # both paths on the GPU (MONAI stitches there too)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.runtime import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "data" / "brats18" / "Brats18_2013_11_1"
FLOOR = {"fp32": 346.0, "bf16": 1223.0}
CHANNELS = ("flair", "t1", "t1ce", "t2")


class PseudoTrained(torch.nn.Module):
    """Region logits = weight * network / scale + 3 * (z-scored intensity - threshold): deterministic, image-dependent.

    ``scale`` is the standard deviation of the network's output on a fixed random 64^3 input (computed once),
    so ``weight`` is the network's share in logit units whatever the initialisation's output magnitude.
    """

    def __init__(self, net: torch.nn.Module, weight: float = 0.1):
        super().__init__()
        self.net = net.eval()
        with torch.inference_mode():
            probe = torch.randn((1, 4, 64, 64, 64), generator=torch.Generator().manual_seed(0))
            self.scale = float(self.net(probe).float().std())
        self.weight = weight / max(self.scale, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x).float()
        flair, t1ce = x[:, 0:1].float(), x[:, 2:3].float()
        prior = torch.cat([flair - 1.5, t1ce - 1.5, t1ce - 2.5], 1) * 3.0
        return self.weight * y + prior


def build_network(args) -> tuple[torch.nn.Module, str]:
    if args.model:
        from medseg.inference.loading import load_model

        return load_model(args.model).model, f"checkpoint {args.model}"
    torch.manual_seed(0)
    if args.net == "medseg-unet":
        from medseg.models import create_model

        net = create_model("unet", 3, 4, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    else:
        from monai.networks.nets import UNet

        net = UNet(3, 4, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return PseudoTrained(net, args.net_weight), f"{args.net} ({params:.1f} M parameters), random init, pseudo-trained (w={args.net_weight})"


def bench_preprocessing(model: str | None, normalize: str = "zscore_nonzero"):
    """The benchmark's preprocessing: z-score only, or the checkpoint's own (e.g. resampling to its spacing);
    never a foreground crop, since the naive path windows the whole volume."""
    import dataclasses

    from medseg.data.preprocess import Preprocessing

    if model:
        from medseg.inference.loading import load_model

        return dataclasses.replace(load_model(model).preprocessing, crop_foreground=False, normalize=normalize)
    return Preprocessing(orientation=None, crop_foreground=False, normalize=normalize)


def read_channels(case: Path) -> list:
    from medseg.data.io import read_volume

    return [read_volume(case / f"{case.name}_{c}.nii.gz") for c in CHANNELS]


def load_case(case: Path, model: str | None = None) -> np.ndarray:
    """The preprocessed case ``(4, *spatial)`` float32, background 0."""
    return bench_preprocessing(model).apply(read_channels(case)).image


def reference_regions(case: Path, model: str | None) -> np.ndarray | None:
    """Ground-truth regions WT/TC/ET on the benchmark's grid (the case's seg file), or None without one."""
    from medseg.data.io import read_volume
    from medseg.data.labels import get_scheme

    seg = case / f"{case.name}_seg.nii.gz"
    if not seg.exists():
        return None
    prepared = bench_preprocessing(model, normalize="none").apply(read_channels(case), read_volume(seg))
    return get_scheme("brats").to_regions(prepared.label)


def worker(args) -> None:
    from medseg.inference import InferenceSettings, sliding_window
    from medseg.inference.engine import autocast_dtype, channels_last_format

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.worker.startswith("medseg"):
        from medseg.runtime import tune_allocator

        tune_allocator()  # as the medseg command line does
    device = torch.device(args.device)
    net, _ = build_network(args)
    net = net.to(device).eval()
    image = torch.from_numpy(load_case(Path(args.case), args.model))
    roi = (args.roi,) * 3
    amp = {"medseg": args.amp, "medseg-fp32": "off"}.get(args.worker, "off")
    settings = InferenceSettings(roi_size=roi, overlap=args.overlap, blend="gaussian", sw_batch_size=args.sw_batch_size,
                                 amp=amp, device=args.device)
    dtype = autocast_dtype(amp, device)
    if args.worker.startswith("medseg") and dtype == torch.bfloat16 and device.type == "cpu":
        net.to(memory_format=channels_last_format(3))

    def run() -> torch.Tensor:
        if args.worker.startswith("medseg"):
            return sliding_window(net, image, settings, fill=-30.0).cpu()  # the scan comes from and returns to host memory
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():  # MONAI's GPU recipe: the whole volume and the stitching on the device
            return sliding_window_inference(image[None].to(device), roi, args.sw_batch_size, net, overlap=args.overlap,
                                            mode="gaussian", sw_device=device, device=device)[0].cpu()

    if device.type == "cuda":
        run()  # CUDA context, cuDNN algorithm choice and allocator warm-up, as a serving process has them
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        warm = torch.zeros((1, 4, *roi))
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            net(warm.contiguous(memory_format=channels_last_format(3)) if dtype else warm)  # oneDNN primitive set-up
    start = time.perf_counter()
    logits = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    labels = (logits > 0).numpy()  # sigmoid > 0.5; both paths return host tensors
    np.save(args.out + ".npy", np.packbits(labels))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    Path(args.out + ".json").write_text(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "gpu_mb": gpu_mb,
                                                    "shape": list(labels.shape)}))


def window_counts(args) -> tuple[int, int, float]:
    """Windows MONAI evaluates, windows medseg evaluates, GFLOP per window."""
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.inference import InferenceSettings, plan_layout, plan_windows

    image = load_case(Path(args.case), args.model)
    roi = (args.roi,) * 3
    settings = InferenceSettings(roi_size=roi, overlap=args.overlap)
    full = len(plan_windows(image.shape[1:], roi, args.overlap))
    ours = len(plan_layout(image.shape[1:], settings, (image != 0).any(0)).starts)
    net, _ = build_network(args)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net.eval()(torch.zeros((1, 4, *roi)))
    return full, ours, counter.get_total_flops() / 1e9


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a medseg checkpoint (default: a random 3D U-Net, pseudo-trained)")
    p.add_argument("--net", default="monai-unet", choices=("monai-unet", "medseg-unet"), help="network without --model")
    p.add_argument("--net-weight", type=float, default=0.1, help="weight of the random network in the pseudo-trained logits")
    p.add_argument("--case", default=str(DEFAULT_CASE), help="a BraTS 2018 case folder")
    p.add_argument("--roi", type=int, default=128)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=PRECISIONS, help="medseg's mixed precision (MONAI runs fp32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both paths run their windows")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.case).is_dir():
        sys.exit(f"{args.case}: BraTS case folder not found; give --case (the data lives in ../shared/data/brats18)")
    paths = ("monai", "medseg-fp32", "medseg")
    full, ours, gflop = window_counts(args)
    print(build_network(args)[1])
    print(f"case {Path(args.case).name}; roi {args.roi}, overlap {args.overlap}, gaussian, window batch {args.sw_batch_size}; "
          f"{torch.get_num_threads()} threads; windows: MONAI {full}, medseg {ours}; {gflop:.1f} GFLOP per window")
    results: dict[str, list[dict]] = {k: [] for k in paths}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in paths:
                out = os.path.join(tmp, f"{name}-{r}")
                cmd = [sys.executable, __file__, "--worker", name, "--out", out, "--case", args.case, "--roi", str(args.roi),
                       "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size), "--amp", args.amp,
                       "--device", args.device]
                cmd += ["--net", args.net, "--net-weight", str(args.net_weight)]
                cmd += ["--model", args.model] if args.model else []
                cmd += ["--threads", str(args.threads)] if args.threads else []
                subprocess.run(cmd, check=True)
                res = json.loads(Path(out + ".json").read_text())
                res["labels"] = np.unpackbits(np.load(out + ".npy"))[: int(np.prod(res["shape"]))].reshape(res["shape"]).astype(bool)
                results[name].append(res)
                print(f"  run {r + 1} {name:12s} {res['seconds']:7.3f} s  peak RSS {res['rss_mb']:.0f} MB"
                      f"  peak GPU {res['gpu_mb']:.0f} MB", flush=True)
    ref = results["monai"][0]["labels"]
    truth = reference_regions(Path(args.case), args.model)
    t_monai = statistics.median(x["seconds"] for x in results["monai"])
    cuda = args.device.startswith("cuda")
    print(f"\n{'path':12s} {'median s':>9s} {'vs MONAI':>9s} {'peak MB':>8s} {'GPU MB' if cuda else '':>8s} {'GFLOP/s':>8s} "
          f"{'' if cuda else 'floor':>6s}  Dice WT/TC/ET vs MONAI, voxel agreement; Dice WT/TC/ET vs ground truth")
    from medseg.inference import cpu_has_bf16

    amp_bf16 = args.amp == "bf16" or (args.amp == "auto" and cpu_has_bf16())
    for name in paths:
        t = statistics.median(x["seconds"] for x in results[name])
        rss = max(x["rss_mb"] for x in results[name])
        gpu = f"{max(x['gpu_mb'] for x in results[name]):8.0f}" if cuda else " " * 8
        windows = full if name == "monai" else ours
        rate = windows * gflop / t
        floor = "" if cuda else f"{100 * rate / FLOOR['bf16' if name == 'medseg' and amp_bf16 else 'fp32']:5.0f}%"
        lab = results[name][0]["labels"]
        dices = "/".join(f"{dice(lab[i], ref[i]):.4f}" for i in range(3))
        agree = float((lab == ref).all(0).mean())
        gt = "/".join(f"{dice(lab[i], truth[i]):.4f}" for i in range(3)) if truth is not None else "-"
        print(f"{name:12s} {t:9.3f} {t_monai / t:8.2f}x {rss:8.0f} {gpu} {rate:8.0f} {floor:>6s}  {dices}, {agree:.5f}; {gt}")


if __name__ == "__main__":
    main()
