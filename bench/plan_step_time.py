"""Step time of large planned networks: the planner's FLOPs-scaled estimate against a direct measurement.

``medseg plan`` measures a patch above ``MAX_VOXELS`` at a smaller patch of the same network and scales the time by
the ratio of convolution FLOPs (medseg.planning.measure.step_timer). This benchmark times each network at a patch of
at most ``--scale-from`` voxels scaled by FLOPs (64³: the planner's limit until 2026-11-24) and directly, and prints
the ratio measured / estimated; run it on an idle machine. Both are timed as the planner times them, under the
allocator setting of ``medseg train`` (medseg.runtime.tune_allocator; a first version of this benchmark ran without
it and measured large steps 2x slower than training runs them, docs/performance.md).

    python bench/plan_step_time.py                 # the BraTS networks of docs/planning.md
    python bench/plan_step_time.py --patch 128 160 128 --amp off
"""
from __future__ import annotations

import argparse
import time

PATCHES = [(64, 80, 64), (96, 112, 96), (128, 160, 128)]  # BraTS plan at 2 mm, ~1.5 mm and 1 mm (median shape)


def main() -> None:
    import torch

    from medseg.planning.measure import step_timer
    from medseg.planning.network import build_network
    from medseg.runtime import resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, nargs="+", action="append", help="patch to plan (repeatable)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--amp", default="auto", help="training.amp (auto: bf16 where the CPU runs it)")
    ap.add_argument("--base", type=int, default=16, help="first width (CPU plans: 16)")
    ap.add_argument("--cap", type=int, default=256, help="widest level (CPU plans: 256)")
    ap.add_argument("--scale-from", type=int, default=64**3, help="voxels of the patch the estimate scales from")
    args = ap.parse_args()
    device = torch.device("cpu")
    precision = resolve_precision(args.amp, device)
    scaled = step_timer(4, 3, "regions", device, precision, max_voxels=args.scale_from)
    direct = step_timer(4, 3, "regions", device, precision, max_voxels=10**12)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {precision.name}, batch {args.batch}")
    print(f"| patch | levels | widths | estimated s/step (scaled from {args.scale_from} voxels) | measured s/step | measured / estimated |")
    print("|---|---|---|---|---|---|")
    for patch in [tuple(p) for p in args.patch] if args.patch else PATCHES:
        net = build_network(patch, (1.0,) * len(patch), args.base, args.cap)
        t0 = time.perf_counter()
        est = scaled(net, args.batch)
        got = direct(net, args.batch)
        print(f"| {'×'.join(map(str, net.patch))} | {len(net.channels)} | {net.channels[0]}–{net.channels[-1]} | "
              f"{est.step_seconds:.2f} | {got.step_seconds:.2f} | {got.step_seconds / est.step_seconds:.2f} |"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
