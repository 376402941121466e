"""Networks side by side: medseg's models (and presets) against MONAI's where MONAI has the network.

For every row and dimension: parameters, forward GFLOPs for one window (3D: 4 x 128^3 -> 3 outputs; 2D: 3 x 512^2
-> 2 outputs; FlopCounterMode on the meta device, 2 FLOPs per multiply-add, convolutions and matrix products only),
and — measured on this machine's CPU — the time of one forward + backward pass (training mode, batch 1) and the
peak memory it added (resident set size, KiB from getrusage, in a forked child per measurement so one model's peak
does not hide another's; children come from a fork server that has imported torch but computed nothing, as a child
forked from a process that already ran OpenMP work can hang) at a smaller timing window (default 64^3 and 256^2: the FLOPs scale with the voxels).

    python bench/models.py                     # every row, 3D and 2D, timing at 64^3 / 256^2 (a few minutes on 2 cores)
    python bench/models.py --quick             # rows with a MONAI twin only, timing at 32^3 / 128^2, no warm-up
    python bench/models.py --rows unet,vnet --dims 3 --time-size 96
    python bench/models.py --no-time           # parameters and GFLOPs only (seconds)

Rows named ``name[preset]`` are ``create_model(name, preset=...)``; ``monai`` columns build the MONAI class directly
with the arguments in :data:`ROWS` (the same widths as medseg's defaults where both have them).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from medseg.models import create_model  # noqa: E402

SETTINGS = {3: (4, 3, 128), 2: (3, 2, 512)}  # in, out, GFLOPs window side


def _monai(name: str) -> Callable:
    import monai.networks.nets as nets

    return getattr(nets, name)


def _dyn_args(dims: int) -> dict:
    return {"kernel_size": [3] * 6, "strides": [1, 2, 2, 2, 2, 2], "upsample_kernel_size": [2] * 5,
            "filters": [min(32 * 2 ** i, 320 if dims == 3 else 512) for i in range(6)], "norm_name": ("INSTANCE", {"affine": True})}


# row -> (medseg name, medseg kwargs, MONAI builder (dims, in, out, window side) or None, note)
ROWS: dict[str, tuple[Optional[str], dict, Optional[Callable], str]] = {
    "unet": ("unet", {}, lambda d, i, o, s: _monai("UNet")(d, i, o, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2),
             "MONAI UNet, same channels, strides, 2 residual sub-units"),
    "unet[monai]": ("unet", {"preset": "monai"}, None, "MONAI's UNet modules inside medseg"),
    "unet[cicek2016]": ("unet", {"preset": "cicek2016"}, None, "Çiçek 2016 layer by layer"),
    "attention_unet": ("attention_unet", {}, lambda d, i, o, s: _monai("AttentionUnet")(d, i, o, (16, 32, 64, 128, 256), (2, 2, 2, 2)),
                       "MONAI AttentionUnet, same channels"),
    "vnet": ("vnet", {}, lambda d, i, o, s: _monai("VNet")(d, i, o) if 16 % i == 0 else None,
             "MONAI VNet (1,2,3,2 / 2,2,1,1 convs; needs 16 % in == 0)"),
    "vnet[milletari2016]": ("vnet", {"preset": "milletari2016"}, None, "paper; needs 16 % in == 0"),
    "segresnet": ("segresnet", {}, lambda d, i, o, s: _monai("SegResNet")(d, 32, i, o), "MONAI SegResNet, 32 filters"),
    "segresnet_vae": ("segresnet_vae", {"vae_input_size": None},
                      lambda d, i, o, s: _monai("SegResNetVAE")((s,) * d, spatial_dims=d, init_filters=32, in_channels=i, out_channels=o),
                      "MONAI SegResNetVAE (VAE sized for the window); timing includes the VAE branch"),
    "dynunet": ("dynunet", {}, lambda d, i, o, s: _monai("DynUNet")(d, i, o, **_dyn_args(d)), "MONAI DynUNet, same plan"),
    "unetpp": ("unetpp", {}, lambda d, i, o, s: _monai("BasicUNetPlusPlus")(d, i, o), "MONAI BasicUNetPlusPlus (its default widths 32,32,64,128,256)"),
    "unetpp[zhou2018]": ("unetpp", {"preset": "zhou2018"}, None, "paper"),
    "fcn": ("fcn", {}, None, ""),
    "segnet": ("segnet", {}, None, ""),
    "deconvnet": ("deconvnet", {}, None, ""),
    "deeplabv3plus": ("deeplabv3plus", {}, None, ""),
    "pspnet": ("pspnet", {}, None, ""),
    "resunetpp": ("resunetpp", {}, None, ""),
    "refinenet": ("refinenet", {}, None, ""),
    "hrnet": ("hrnet", {}, None, "HRNetV2-W18"),
    "hrnet_ocr": ("hrnet_ocr", {}, None, "HRNetV2-W18 + OCR"),
    "danet": ("danet", {}, None, ""),
    "monai:SwinUNETR": (None, {}, lambda d, i, o, s: _monai("SwinUNETR")(i, o, feature_size=48, spatial_dims=d), "MONAI only, feature size 48"),
    "monai:UNETR": (None, {}, lambda d, i, o, s: _monai("UNETR")(i, o, (s,) * d, spatial_dims=d), "MONAI only, img_size = window"),
}


def build(row: str, side: str, dims: int, size: int) -> Optional[torch.nn.Module]:
    """The medseg or MONAI network of a row (None where it does not exist)."""
    name, kwargs, monai_builder, _ = ROWS[row]
    cin, cout, _ = SETTINGS[dims]
    if side == "medseg":
        if name is None or (kwargs.get("preset") == "milletari2016" and 16 % cin):
            return None
        kw = dict(kwargs)
        if "vae_input_size" in kw:
            kw["vae_input_size"] = (size,) * dims
        return create_model(name, dims, cin, cout, **kw)
    return monai_builder(dims, cin, cout, size) if monai_builder else None


def _loss(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return sum(_loss(o) for o in out if o is not None)
    if hasattr(out, "seg"):  # medseg TrainOutput
        total = out.seg.float().mean() + sum(a.float().mean() for a in out.aux)
        return total + (out.extra_loss if out.extra_loss is not None else 0)
    return out.float().mean()


def stats(row: str, side: str, dims: int) -> Optional[tuple[int, float]]:
    """(parameters, forward GFLOPs of one window) on the meta device."""
    from medseg.models.foreign import meta_copy

    cin, _, size = SETTINGS[dims]
    try:
        with torch.device("meta"):
            model = build(row, side, dims, size)
    except RuntimeError:  # a network whose constructor computes on tensors (SwinUNETR): build it, then copy to meta
        model = build(row, side, dims, size)
        model = meta_copy(model) if model is not None else None
    if model is None:
        return None
    with torch.device("meta"):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.empty(1, cin, *(size,) * dims))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def _timed(row: str, side: str, dims: int, size: int, warmup: int, reps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    cin = SETTINGS[dims][0]
    torch.manual_seed(0)
    model = build(row, side, dims, size)
    if model is None:
        queue.put(None)
        return
    model.train()
    x = torch.randn(1, cin, *(size,) * dims)
    step = (lambda: _loss(model.forward_train(x))) if side == "medseg" else (lambda: _loss(model(x)))
    try:
        with open("/proc/self/statm") as fh:  # resident memory with the model and input built, before any pass
            before_kib = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        for _ in range(warmup):
            step().backward()
            model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for _ in range(reps):
            step().backward()
            model.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - t0) / reps
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        queue.put((seconds, max(0, peak_kib - before_kib) / 1024, os.getloadavg()[0]))
    except Exception as err:  # e.g. a window too small for the network
        queue.put(f"{type(err).__name__}")


_CTX = None
TIMEOUT_S = 900
BUSY_LOAD = 3.0  # 1-minute load average above which a time is marked "*" (this run's own threads count too)


def measure(row: str, side: str, dims: int, size: int, warmup: int, reps: int, threads: int):
    """(seconds per forward+backward, MiB added at peak) in a child of the fork server, or None / an error name."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "monai.networks.nets", "medseg.models"])
    ctx = _CTX
    queue = ctx.Queue()
    proc = ctx.Process(target=_timed, args=(row, side, dims, size, warmup, reps, threads, queue))
    proc.start()
    try:
        result = queue.get(timeout=TIMEOUT_S)
    except Exception:  # queue.Empty: a stuck or killed child
        proc.kill()
        result = "timeout"
    proc.join()
    return result


def _cell_stats(s) -> list[str]:
    return ["–", "–"] if s is None else [f"{s[0] / 1e6:.2f}M", f"{s[1]:,.0f}"]


def _cell_time(t) -> list[str]:
    if t is None:
        return ["–", "–"]
    if isinstance(t, str):
        return [t, "–"]
    busy = " *" if t[2] > BUSY_LOAD else ""  # the machine was busy: the time is not reliable
    return [f"{t[0]:.2f}{busy}", f"{t[1]:,.0f}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="rows with a MONAI twin, timing at 32^3 / 128^2, no warm-up")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all; see ROWS)")
    ap.add_argument("--dims", default="3,2", help="3, 2 or 3,2")
    ap.add_argument("--time-size", type=int, default=None, help="timing window side in 3D (2D: 4x it); default 64 (quick: 32)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 1; quick: 0)")
    ap.add_argument("--reps", type=int, default=1, help="timed passes (default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--no-time", action="store_true", help="parameters and GFLOPs only")
    args = ap.parse_args(argv)
    rows = args.rows.split(",") if args.rows else [r for r in ROWS if not args.quick or ROWS[r][2] is not None]
    size3 = args.time_size or (32 if args.quick else 64)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    dims_list = [int(d) for d in args.dims.split(",")]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; batch 1, training "
          f"mode; warm-up {warmup}, {args.reps} timed pass(es)")
    for dims in dims_list:
        cin, cout, side = SETTINGS[dims]
        tsize = size3 if dims == 3 else 4 * size3
        win, twin = "×".join([str(side)] * dims), "×".join([str(tsize)] * dims)
        print(f"\n{dims}D: {cin} inputs, {cout} outputs; GFLOPs per {win} window; time (s) and peak memory added (MiB) "
              f"for forward + backward of a {twin} patch")
        header = ["network", "params", f"GFLOPs {win}"] + ([f"s fwd+bwd {twin}", "peak MiB"] if not args.no_time else [])
        header += ["MONAI params", "MONAI GFLOPs"] + (["MONAI s", "MONAI MiB"] if not args.no_time else []) + ["MONAI counterpart"]
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 2) + "---|")
        for row in rows:
            cells = [row]
            for side_name in ("medseg", "monai"):
                s = stats(row, side_name, dims)
                cells += _cell_stats(s)
                if not args.no_time:
                    cells += _cell_time(measure(row, side_name, dims, tsize, warmup, args.reps, args.threads) if s else None)
            if all(c == "–" for c in cells[1:]):
                continue
            print("| " + " | ".join(cells + [ROWS[row][3]]) + " |", flush=True)
    if not args.no_time:
        print(f"\n* the 1-minute load average was above {BUSY_LOAD} after the measurement (other work on the machine): "
              f"time not reliable. Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
