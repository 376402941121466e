"""Step times of a planned network, measured on the device that will train it.

:func:`step_timer` returns the ``timer(network, batch)`` that :func:`medseg.planning.planner.make_plan` calls.
It builds the network with random weights, runs ``warmup`` and then ``steps`` timed training steps (forward, loss,
backward, optimiser) on random data under the run's mixed precision, and two inference forwards of ``sw_batch``
windows; the fastest step and the second forward count (the least disturbed by other work on a shared machine). It
measures under the allocator setting ``medseg train`` runs with (:func:`medseg.runtime.tune_allocator`: without it a
2 x 128x160x128 bf16 CPU step takes 2x as long, its activations unmapped and faulted in again every step), so the
Python API plans what the command line trains. To keep planning short, a patch larger than ``max_voxels`` is
measured at a smaller patch of the same network (each axis scaled alike, kept a multiple of the divisor) and the
times are scaled by the ratio of convolution FLOPs (:func:`medseg.planning.network.conv_flops`); the note says
which.

Example:
    >>> import torch
    >>> from medseg.runtime import resolve_precision
    >>> from medseg.planning.network import build_network
    >>> timer = step_timer(4, 3, "regions", torch.device("cpu"), resolve_precision("off", torch.device("cpu")))
    >>> t = timer(build_network((32, 32, 32), (1.0, 1.0, 1.0), base=4, cap=16), 2)  # doctest: +SKIP
    >>> t.step_seconds > 0  # doctest: +SKIP
    True
"""
from __future__ import annotations

import math
import time

from medseg.planning.network import Network, conv_flops
from medseg.planning.planner import StepTime, Timer

MAX_VOXELS = 128 * 160 * 128  # the largest patch measured as is (per sample): the full-resolution BraTS patch, ~20 s
# of planning; FLOPs scaling from 64³ comes within 7% of it (bench/plan_step_time.py), larger patches are scaled
BUSY_CORES = 0.25  # other processes using more CPU than this during the measurement: the plan says it was under load


def measurement_patch(net: Network, max_voxels: int = MAX_VOXELS) -> tuple[int, ...]:
    """``net.patch`` if it has at most ``max_voxels`` voxels, else each axis scaled by the same factor, rounded to a
    multiple of the divisor (at least twice the divisor, at most the patch)."""
    if math.prod(net.patch) <= max_voxels:
        return net.patch
    scale = (max_voxels / math.prod(net.patch)) ** (1 / len(net.patch))
    out = []
    for p, d in zip(net.patch, net.divisor):
        size = max(2 * d, int(round(p * scale / d)) * d)
        out.append(min(p, size))
    return tuple(out)


def step_timer(in_channels: int, out_channels: int, target: str, device, precision, *, max_voxels: int = MAX_VOXELS,
               warmup: int = 1, steps: int = 3, sw_batch: int = 2) -> Timer:
    """A ``timer(network, batch) -> StepTime`` measuring on ``device`` under ``precision``
    (:class:`medseg.runtime.Precision`)."""

    def timer(net: Network, batch: int) -> StepTime:
        from medseg.runtime import tune_allocator

        tune_allocator()  # as medseg train does: the step time is training's
        patch = measurement_patch(net, max_voxels)
        small = Network(patch, net.strides, net.kernels, net.channels)
        before = cpu_snapshot()
        step, window = _measure(small, batch, in_channels, out_channels, target, device, precision, warmup, steps, sw_batch)
        busy = other_cores(before, cpu_snapshot()) if device.type == "cpu" else None
        step_scale = conv_flops(net, batch, in_channels, out_channels) / conv_flops(small, batch, in_channels, out_channels)
        window_scale = conv_flops(net, 1, in_channels, out_channels) / conv_flops(small, 1, in_channels, out_channels)
        note = f"measured {step:.2f} s per step of {batch} x {list(patch)} on {device.type} ({precision.name})"
        if busy is not None and busy > BUSY_CORES:
            note += (f"; WARNING: other processes used {busy:.1f} CPU core(s) during the measurement and slow the step, "
                     "plan again on a quiet machine")
        if patch != net.patch:
            note += f", scaled by FLOPs to {list(net.patch)}"
        return StepTime(step * step_scale, window * window_scale, note)

    return timer


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process) now; None where the
    machine's CPU time cannot be read (``/proc/stat``: Linux)."""
    import os

    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return time.perf_counter(), (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cores(before, after) -> float | None:
    """CPU cores that other processes kept busy on average between two :func:`cpu_snapshot` s (this process's own
    threads subtracted), or None when unknown.

    On a shared 2-core machine a busy neighbour made the measured step 3-5x slower (PyTorch's threads spin-wait),
    and a plan from such a measurement fills the budget with a few hundred steps instead of over a thousand. The
    1-minute load average is no gauge for this: the plan's own reading and measuring raise it.
    """
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (after[0] - before[0]))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(net: Network, batch: int, in_ch: int, out_ch: int, target: str, device, precision, warmup: int,
             steps: int, sw_batch: int) -> tuple[float, float]:
    """(seconds per training step, seconds per inference window) of ``net`` at its patch."""
    import torch
    import torch.nn.functional as F

    from medseg.models import create_model

    torch.manual_seed(0)
    model = create_model(net.model_name, net.spatial_dims, in_ch, out_ch, **net.model_kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_ch, *net.patch, device=device)
    if target == "regions":
        y = (torch.rand(batch, out_ch, *net.patch, device=device) > 0.5).float()
        loss_fn = F.binary_cross_entropy_with_logits
    else:
        y = torch.randint(0, out_ch, (batch, *net.patch), device=device)
        loss_fn = F.cross_entropy
    times = []
    model.train()
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with precision.autocast():
            out = model(x)
        loss = loss_fn(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.eval()
    windows = x[:1].expand(sw_batch, *x.shape[1:]).contiguous()
    forward = []
    with torch.inference_mode(), precision.autocast():
        for _ in range(2):  # the first sets up the inference kernels
            _sync(device)
            start = time.perf_counter()
            model(windows)
            _sync(device)
            forward.append(time.perf_counter() - start)
    return min(times), forward[-1] / sw_batch  # the least disturbed by other work on a shared machine
