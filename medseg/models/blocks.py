"""Layer factories keyed by ``spatial_dims`` and the small blocks shared by several models.

No model file names a 2D or 3D layer class: convolutions, norms and pools come from MONAI's factories
(``monai.networks.layers.factories``) through the helpers below. Kernel sizes, strides and dilations may be
per-axis tuples.

Example:
    >>> import torch
    >>> block = ConvNormAct(3, 2, 8, kernel_size=3, norm="instance")
    >>> block(torch.zeros(1, 2, 8, 6, 4)).shape
    torch.Size([1, 8, 8, 6, 4])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Dropout, Norm, Pool

from medseg.errors import MedsegError, check_choice

IntOrSeq = int | Sequence[int]
NORMS = ("instance", "batch", "group", "none")
UPSAMPLES = ("deconv", "deconv4", "interp")


def _tup(v: IntOrSeq, n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)


def choose(value: Optional[str], options: Sequence[str], what: str) -> str:
    """``value`` lower-cased (``None`` is ``"none"``) if it is one of ``options``; otherwise the
    :func:`~medseg.errors.check_choice` error ("did you mean" and the valid options)."""
    return check_choice("none" if value is None else str(value).lower(), tuple(options), what)


def conv(dims: int, cin: int, cout: int, kernel_size: IntOrSeq = 3, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
         groups: int = 1, bias: bool = True) -> nn.Module:
    """Convolution with "same" padding for odd kernels: size ``/ stride`` (rounded up)."""
    k, d = _tup(kernel_size, dims), _tup(dilation, dims)
    pad = tuple((ki - 1) * di // 2 for ki, di in zip(k, d))
    return Conv[Conv.CONV, dims](cin, cout, k, stride=stride, padding=pad, dilation=d, groups=groups, bias=bias)


def conv_transpose(dims: int, cin: int, cout: int, kernel_size: IntOrSeq, stride: IntOrSeq, padding: IntOrSeq = 0,
                   bias: bool = True) -> nn.Module:
    return Conv[Conv.CONVTRANS, dims](cin, cout, kernel_size, stride=stride, padding=padding, bias=bias)


def norm(name: Optional[str], dims: int, channels: int, groups: int = 8) -> nn.Module:
    """``"instance"`` (affine), ``"batch"``, ``"group"`` (``groups`` groups, fewer if channels are few), or ``"none"``."""
    name = choose(name, NORMS, "norm")
    if name == "instance":
        return Norm[Norm.INSTANCE, dims](channels, affine=True)
    if name == "batch":
        return Norm[Norm.BATCH, dims](channels)
    if name == "group":
        g = max(1, min(groups, channels))
        while channels % g:
            g -= 1
        return Norm[Norm.GROUP, dims](num_groups=g, num_channels=channels)
    return nn.Identity()


def act(name: str = "relu", channels: int = 1) -> nn.Module:
    """``"relu"``, ``"leakyrelu"`` (slope 0.01), ``"prelu"`` (one slope per channel) or ``"none"``."""
    name = choose(name, ("relu", "leakyrelu", "prelu", "none"), "act")
    if name == "prelu":
        return Act[Act.PRELU](num_parameters=channels)
    if name == "leakyrelu":
        return Act[Act.LEAKYRELU](negative_slope=0.01, inplace=True)
    return Act[Act.RELU](inplace=True) if name == "relu" else nn.Identity()


def max_pool(dims: int, kernel_size: IntOrSeq = 2, stride: Optional[IntOrSeq] = None, return_indices: bool = False) -> nn.Module:
    return Pool[Pool.MAX, dims](kernel_size, stride=stride, return_indices=return_indices)


def adaptive_avg_pool(dims: int, size: IntOrSeq) -> nn.Module:
    return Pool[Pool.ADAPTIVEAVG, dims](size)


def max_unpool(dims: int, kernel_size: IntOrSeq = 2) -> nn.Module:
    """Max-unpooling (MONAI's factory has none): places values at the indices saved by ``max_pool``."""
    return {2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}[dims](kernel_size)


def pooled_encoder(stages: Sequence[nn.Module], pool: nn.Module, x: torch.Tensor
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
    """Each stage then ``pool`` (a ``max_pool(..., return_indices=True)``), as SegNet and DeconvNet encode: the last
    pooled output and, per stage, the pooling indices and the pre-pooling shape for ``max_unpool`` (finest first)."""
    saved = []
    for stage in stages:
        y = stage(x)
        x, idx = pool(y)
        saved.append((idx, y.shape))
    return x, saved


def dropout(dims: int, p: float) -> nn.Module:
    return Dropout[Dropout.DROPOUT, dims](p) if p > 0 else nn.Identity()


def interpolate(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of ``(B, C, *spatial)`` to ``size``."""
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation. ``x: (B, cin, *S) -> (B, cout, *S / stride)``."""

    def __init__(self, dims: int, cin: int, cout: int, kernel_size: IntOrSeq = 3, stride: IntOrSeq = 1,
                 dilation: IntOrSeq = 1, norm: Optional[str] = "instance", act: str = "relu", groups: int = 1):
        name = choose(norm, NORMS, "norm")
        super().__init__(conv(dims, cin, cout, kernel_size, stride, dilation, groups, bias=name == "none"),
                         globals()["norm"](name, dims, cout), globals()["act"](act, cout))


class SeparableConv(nn.Sequential):
    """Depthwise-separable convolution (depthwise k, norm, act, pointwise 1, norm, act) as in DeepLabv3+."""

    def __init__(self, dims: int, cin: int, cout: int, kernel_size: IntOrSeq = 3, stride: IntOrSeq = 1,
                 dilation: IntOrSeq = 1, norm: Optional[str] = "batch", act: str = "relu"):
        super().__init__(ConvNormAct(dims, cin, cin, kernel_size, stride, dilation, norm, act, groups=cin),
                         ConvNormAct(dims, cin, cout, 1, 1, 1, norm, act))


class Upsample(nn.Module):
    """Up-sampling by ``scale`` (int or per-axis) changing channels ``cin -> cout``.

    ``mode``: ``"deconv"`` transposed conv with kernel = stride; ``"deconv4"`` kernel 2*stride, padding stride/2
    (k4 s2 p1: overlapping kernels, fewer checkerboard artefacts); ``"interp"`` 1x1 conv then (tri)linear
    interpolation (no learnable up-sampling). ``x: (B, cin, *S) -> (B, cout, *S * scale)``.
    """

    def __init__(self, dims: int, cin: int, cout: int, scale: IntOrSeq = 2, mode: str = "deconv"):
        super().__init__()
        self.mode = choose(mode, UPSAMPLES, "upsample")
        self.scale = _tup(scale, dims)
        if self.mode == "interp":
            self.op = conv(dims, cin, cout, 1)
        elif self.mode == "deconv":
            self.op = conv_transpose(dims, cin, cout, self.scale, self.scale)
        else:
            if any(s % 2 and s != 1 for s in self.scale):
                raise MedsegError(f"upsample='deconv4' needs even scales (or 1), got {self.scale}; use 'deconv'")
            k = tuple(3 if s == 1 else 2 * s for s in self.scale)
            p = tuple(1 if s == 1 else s // 2 for s in self.scale)
            self.op = conv_transpose(dims, cin, cout, k, self.scale, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "interp":
            return self.op(x)
        y = self.op(x)
        return interpolate(y, [s * f for s, f in zip(y.shape[2:], self.scale)])


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu 2018): channel weights from global average pooling. Shape-preserving."""

    def __init__(self, dims: int, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = adaptive_avg_pool(dims, 1)
        self.fc = nn.Sequential(conv(dims, channels, hidden, 1), nn.ReLU(inplace=True), conv(dims, hidden, channels, 1),
                                nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): 1x1 conv, one dilated conv per rate, image pooling; concat,
    1x1 projection. ``separable`` uses depthwise-separable dilated convs (DeepLabv3+). The image-pooling branch
    has no norm (it sees one value per channel). ``x: (B, cin, *S) -> (B, cout, *S)``.
    """

    def __init__(self, dims: int, cin: int, cout: int, rates: Sequence[int] = (6, 12, 18), norm: Optional[str] = "batch",
                 separable: bool = True, image_pool: bool = True):
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(dims, cin, cout, 1, norm=norm)]
        for r in rates:
            branches.append(SeparableConv(dims, cin, cout, 3, 1, r, norm) if separable
                            else ConvNormAct(dims, cin, cout, 3, 1, r, norm))
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(adaptive_avg_pool(dims, 1), conv(dims, cin, cout, 1), nn.ReLU(inplace=True)) if image_pool else None
        n = len(branches) + (1 if image_pool else 0)
        self.project = ConvNormAct(dims, n * cout, cout, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        if self.pool is not None:
            outs.append(self.pool(x).expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, 1))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay 2018): weights the skip ``x`` with ``sigmoid(psi(relu(Wx x + Wg g)))``.

    ``x: (B, cx, *S)``, gating ``g: (B, cg, *Sg)`` (resized to ``S`` if needed) -> ``(B, cx, *S)``.
    """

    def __init__(self, dims: int, cx: int, cg: int, hidden: int, norm: Optional[str] = "instance"):
        super().__init__()
        self.wx = nn.Sequential(conv(dims, cx, hidden, 1, bias=False), globals()["norm"](norm, dims, hidden))
        self.wg = nn.Sequential(conv(dims, cg, hidden, 1, bias=False), globals()["norm"](norm, dims, hidden))
        self.psi = nn.Sequential(conv(dims, hidden, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = self.wg(g)
        if g.shape[2:] != x.shape[2:]:
            g = interpolate(g, x.shape[2:])
        return x * self.psi(F.relu(self.wx(x) + g))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 (``width``) - 3x3 (stride) - 1x1 (``width * 4``) conv-norm, ReLU after the sum with a
    (projected) shortcut. ``x: (B, cin, *S) -> (B, 4 * width, *S / stride)``."""

    expansion = 4

    def __init__(self, dims: int, cin: int, width: int, stride: int = 1, norm: Optional[str] = "batch"):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(ConvNormAct(dims, cin, width, 1, norm=norm), ConvNormAct(dims, width, width, 3, stride, norm=norm),
                                  conv(dims, width, cout, 1, bias=False), globals()["norm"](norm, dims, cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(conv(dims, cin, cout, 1, stride, bias=False), globals()["norm"](norm, dims, cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResidualConvUnit(nn.Module):
    """RefineNet's RCU (Lin 2017): ``x + conv(relu(conv(relu(x))))``, 3x3 convs, no normalisation. Shape-preserving."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), conv(dims, channels, channels, 3), nn.ReLU(inplace=True),
                                  conv(dims, channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ChainedResidualPool(nn.Module):
    """RefineNet's chained residual pooling: ReLU, then ``n`` blocks of 5x5 max-pooling (stride 1) + 3x3 conv, each
    block fed by the previous one and every block's output added to the sum. Shape-preserving."""

    def __init__(self, dims: int, channels: int, n: int = 2, pool: int = 5):
        super().__init__()
        self.pool = Pool[Pool.MAX, dims](pool, stride=1, padding=pool // 2)
        self.convs = nn.ModuleList([conv(dims, channels, channels, 3, bias=False) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        total, path = x, x
        for c in self.convs:
            path = c(self.pool(path))
            total = total + path
        return total


class PositionAttention(nn.Module):
    """DANet's position attention module (Fu 2019): every position attends to every other one,
    ``x + gamma * V softmax(Q^T K)^T`` with 1x1 query/key convs to ``C / reduction`` channels; ``gamma`` starts at 0.
    ``x: (B, C, *S) -> (B, C, *S)``; memory ``(prod S)^2`` per sample."""

    def __init__(self, dims: int, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.query, self.key = conv(dims, channels, hidden, 1), conv(dims, channels, hidden, 1)
        self.value = conv(dims, channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q = self.query(x).flatten(2).transpose(1, 2)               # (B, N, h)
        k = self.key(x).flatten(2)                                 # (B, h, N)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)              # (B, N, N)
        v = self.value(x).flatten(2)                               # (B, C, N)
        out = torch.bmm(v, attn.transpose(1, 2)).view_as(x)
        return x + self.gamma * out


class ChannelAttention(nn.Module):
    """DANet's channel attention module: ``x + beta * softmax(max(E) - E) X`` with ``E = X X^T`` (C x C);
    ``beta`` starts at 0. Shape-preserving."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)                                        # (B, C, N)
        energy = torch.bmm(flat, flat.transpose(1, 2))             # (B, C, C)
        energy = energy.amax(-1, keepdim=True).expand_as(energy) - energy
        out = torch.bmm(torch.softmax(energy, dim=-1), flat).view_as(x)
        return x + self.beta * out


class ObjectContext(nn.Module):
    """OCR (Yuan 2020): object-contextual representations of ``feats (B, C, *S)`` given soft object regions
    ``regions (B, K, *S)`` (logits).

    Object region representations ``f_k = sum_i softmax_i(regions_k) x_i``; pixel-region relations
    ``w_ik = softmax_k(phi(x_i) . psi(f_k) / sqrt(key))``; object context ``y_i = rho(sum_k w_ik delta(f_k))``; output
    ``g(cat(y_i, x_i))`` (1x1 conv-norm-ReLU, dropout). phi, psi: two 1x1 conv-norm-ReLU to ``key_channels``; delta,
    rho: one. ``-> (B, C, *S)``. Simplification: psi and delta (on the K region vectors) have no normalisation
    (batch norm over K values fails for one class at batch size 1); the reference code uses BN-ReLU there."""

    def __init__(self, dims: int, channels: int, key_channels: int, norm: Optional[str] = "batch", dropout_p: float = 0.05):
        super().__init__()

        def cnr(a: int, b: int) -> nn.Module:
            return ConvNormAct(dims, a, b, 1, norm=norm)

        self.dims = dims
        self.key_channels = key_channels
        self.pixel = nn.Sequential(cnr(channels, key_channels), cnr(key_channels, key_channels))
        self.object = nn.Sequential(ConvNormAct(dims, channels, key_channels, 1, norm="none"),
                                    ConvNormAct(dims, key_channels, key_channels, 1, norm="none"))
        self.down = ConvNormAct(dims, channels, key_channels, 1, norm="none")
        self.up = cnr(key_channels, channels)
        self.fuse = nn.Sequential(cnr(2 * channels, channels), dropout(dims, dropout_p))

    def forward(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        b, c = feats.shape[:2]
        probs = torch.softmax(regions.flatten(2), dim=-1)                         # (B, K, N)
        objects = torch.bmm(probs, feats.flatten(2).transpose(1, 2))              # (B, K, C)
        objects = objects.transpose(1, 2).reshape(b, c, -1, *([1] * (self.dims - 1)))  # (B, C, K, 1[, 1]) for 1x1 convs
        query = self.pixel(feats).flatten(2).transpose(1, 2)                      # (B, N, key)
        key = self.object(objects).flatten(2)                                     # (B, key, K)
        value = self.down(objects).flatten(2).transpose(1, 2)                     # (B, K, key)
        sim = torch.softmax(torch.bmm(query, key) * self.key_channels ** -0.5, dim=-1)  # (B, N, K)
        context = torch.bmm(sim, value).transpose(1, 2).reshape(b, self.key_channels, *feats.shape[2:])
        return self.fuse(torch.cat([self.up(context), feats], 1))
