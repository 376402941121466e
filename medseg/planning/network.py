"""The U-Net of a plan: pooling per axis, kernel sizes, widths, and what it costs (memory, FLOPs).

The rules are nnU-Net's (Isensee et al. 2021, Nature Methods, online methods "network topology"), written anew:

- an axis is pooled (stride 2) at a level while its feature map has at least ``2 * MIN_FEATURE_MAP`` voxels and its
  current spacing is at most twice the finest current spacing; pooling doubles that axis's spacing. So an
  anisotropic axis is not pooled until the in-plane axes have caught up, and no axis is pooled below 4 voxels;
- a level convolves an axis with a kernel of 3 where its current spacing is at most twice the finest, else 1;
- the width doubles per level from ``base`` up to ``cap``.

The network is the registered ``unet`` (plain conv-norm-act pairs, strided convolution down, transposed
convolution up: nnU-Net's layout) when every kernel is 3, otherwise ``dynunet``, which takes per-axis kernels.

The training memory estimate is ``ACTIVATION_FACTOR * batch * sum over levels (channels * voxels) * 4 bytes`` plus
16 bytes per parameter (weights, gradients, two Adam moments). ``ACTIVATION_FACTOR`` was measured, not derived:
``bench/plan_memory.py`` ran one training step of the U-Net at several patch sizes and compared the process's peak
resident memory with ``sum(channels * voxels)`` (docs/planning.md has the table): 12.6-15.2 in float32 and
6.9-8.8 under bf16 autocast on CPU. The factors below are above every measurement, so a plan errs towards fitting.

Example:
    >>> net = build_network((139, 170, 135), (1.0, 1.0, 1.0), base=16, cap=256)
    >>> net.patch, net.divisor, net.model_name
    ((128, 160, 128), (32, 32, 32), 'unet')
    >>> build_network((160, 160, 26), (0.8, 0.8, 5.0), base=16, cap=256).kernels[0]
    (3, 3, 1)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from medseg.errors import MedsegError

MIN_FEATURE_MAP = 4  # nnU-Net: no axis is pooled below 4 voxels
MAX_POOLS = {2: 7, 3: 5}  # at most 6 levels in 3D (nnU-Net's 3D full-resolution nets have 5-6), 8 in 2D
SPACING_RATIO = 2.0  # pool / use kernel 3 on an axis while its spacing is at most twice the finest
ACTIVATION_FACTOR = {"fp32": 16.0, "half": 10.0}  # measured: bench/plan_memory.py, docs/planning.md
BYTES_PER_PARAMETER = 16  # float32 weights + gradients + Adam's two moments


@dataclass(frozen=True)
class Network:
    """A U-Net topology for one patch size. ``strides``: one per pooling; ``kernels`` and ``channels``: one per level."""

    patch: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    channels: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.patch)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per axis, the factor the patch must be a multiple of (the product of the strides)."""
        return tuple(math.prod(s[i] for s in self.strides) for i in range(self.spatial_dims))

    @property
    def model_name(self) -> str:
        return "dynunet" if any(k != 3 for level in self.kernels for k in level) else "unet"

    @property
    def supervision_heads(self) -> int:
        """Deep-supervision heads the network has room for: one on each decoder level between the finest and the
        coarsest (levels 1 .. levels - 3), so none below 4 levels. Whether the plan uses them:
        :func:`medseg.planning.planner.deep_supervision_rule`."""
        return max(0, len(self.channels) - 3)

    @property
    def model_kwargs(self) -> dict:
        """Keyword arguments of the registered model (``medseg models``), as plain lists."""
        strides = [list(s) for s in self.strides]
        if self.model_name == "unet":
            return {"channels": list(self.channels), "strides": strides, "num_res_units": 0, "norm": "instance"}
        return {"filters": list(self.channels), "strides": [[1] * self.spatial_dims, *strides],
                "kernel_size": [list(k) for k in self.kernels], "norm": "instance"}


def pooling(patch: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(strides per pooling, kernel sizes per level) for ``patch`` voxels at ``spacing`` mm (nnU-Net's rule)."""
    dims = len(patch)
    size, sp = list(patch), [float(s) for s in spacing]
    strides: list[tuple[int, ...]] = []
    kernels: list[tuple[int, ...]] = []
    while True:
        finest = min(sp)
        kernels.append(tuple(3 if sp[i] <= SPACING_RATIO * finest else 1 for i in range(dims)))
        stride = tuple(2 if size[i] >= 2 * MIN_FEATURE_MAP and sp[i] <= SPACING_RATIO * finest else 1 for i in range(dims))
        if len(strides) == MAX_POOLS[dims] or all(s == 1 for s in stride):
            return tuple(strides), tuple(kernels)
        strides.append(stride)
        size = [n // s for n, s in zip(size, stride)]
        sp = [p * s for p, s in zip(sp, stride)]


def widths(levels: int, base: int, cap: int) -> tuple[int, ...]:
    """Channels per level: ``base`` doubling per level, at most ``cap``."""
    return tuple(min(base * 2 ** i, cap) for i in range(levels))


def build_network(patch: tuple[int, ...], spacing: tuple[float, ...], base: int, cap: int) -> Network:
    """The network for a patch of about ``patch`` voxels: pooling from the patch, then the patch rounded down to a
    multiple of the network's divisor (which keeps the same pooling: every pooled axis keeps >= 4 voxels per stride)."""
    strides, kernels = pooling(tuple(int(p) for p in patch), spacing)
    div = [math.prod(s[i] for s in strides) for i in range(len(patch))]
    rounded = tuple(max(d, int(p) - int(p) % d) for p, d in zip(patch, div))
    return Network(rounded, strides, kernels, widths(len(kernels), base, cap))


def _level_voxels(net: Network) -> list[float]:
    voxels, size = [], [float(p) for p in net.patch]
    voxels.append(math.prod(size))
    for stride in net.strides:
        size = [n / s for n, s in zip(size, stride)]
        voxels.append(math.prod(size))
    return voxels


def activation_units(net: Network) -> float:
    """``sum over levels (channels * voxels)`` for one sample: what the activation memory scales with."""
    return sum(c * v for c, v in zip(net.channels, _level_voxels(net)))


def parameter_count(net: Network, in_channels: int, out_channels: int) -> int:
    """Parameters of the conv-norm-act U-Net (two convolutions per level and per decoder level, transposed
    convolutions up, a 1x1 head); biases and norms left out (under 1%)."""
    c, k = net.channels, [math.prod(level) for level in net.kernels]
    total = c[0] * out_channels
    for i, ci in enumerate(c):
        cin = in_channels if i == 0 else c[i - 1]
        total += k[i] * (cin * ci + ci * ci)  # encoder
        if i < len(c) - 1:
            total += k[i] * (2 * ci * ci + ci * ci) + math.prod(net.strides[i]) * c[i + 1] * ci  # decoder + up
    return int(total)


def conv_flops(net: Network, batch: int, in_channels: int, out_channels: int) -> float:
    """Multiply-adds x 2 of one training step (forward + backward = 3 forwards) for ``batch`` samples."""
    c, k, v = net.channels, [math.prod(level) for level in net.kernels], _level_voxels(net)
    forward = v[0] * c[0] * out_channels
    for i, ci in enumerate(c):
        cin = in_channels if i == 0 else c[i - 1]
        forward += v[i] * k[i] * (cin * ci + ci * ci)
        if i < len(c) - 1:
            forward += v[i] * (k[i] * 3 * ci * ci + c[i + 1] * ci)
    return 2.0 * 3.0 * batch * forward


def training_bytes(net: Network, batch: int, in_channels: int, out_channels: int, half: bool) -> float:
    """Estimated memory of one training step: activations (measured factor) + parameters and optimiser state."""
    factor = ACTIVATION_FACTOR["half" if half else "fp32"]
    return factor * batch * activation_units(net) * 4 + BYTES_PER_PARAMETER * parameter_count(net, in_channels, out_channels)


def fit_network(start: tuple[int, ...], spacing: tuple[float, ...], width: tuple[int, int], available: float,
                channels: tuple[int, int], half: bool, batch: int = 2) -> Network:
    """The network whose patch starts at ``start`` (the median shape) and shrinks until a training step of ``batch``
    fits ``available`` bytes: each step takes one divisor off the axis with the largest extent in mm (nnU-Net
    shrinks in steps of the divisor too), so the patch grows more isotropic in mm as it shrinks.
    ``width``: (base, cap) of :func:`widths`; ``channels``: (input, output) channels of the model."""
    (base, cap), (in_channels, out_channels) = width, channels
    patch = list(start)
    while True:
        net = build_network(tuple(patch), spacing, base, cap)
        if training_bytes(net, batch, in_channels, out_channels, half) <= available:
            return net
        div = net.divisor
        axes = [i for i in range(len(patch)) if net.patch[i] - div[i] >= MIN_FEATURE_MAP]
        if not axes:
            need = training_bytes(net, batch, in_channels, out_channels, half) / 2**30
            raise MedsegError(f"--memory: even a {list(net.patch)} patch needs about {need:.1f} GiB for a training step of "
                              f"batch {batch}, more than the {available / 2**30:.1f} GiB left for it; give more --memory")
        axis = max(axes, key=lambda i: (net.patch[i] * spacing[i], net.patch[i], -i))
        patch = list(net.patch)
        patch[axis] -= div[axis]
