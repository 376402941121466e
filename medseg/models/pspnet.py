"""PSPNet (Zhao et al. 2017), any dimension.

Backbone: a dilated ResNet with basic residual blocks: a three-conv stem (stride 2) and max-pooling (stride 4),
stages of ``base_channels`` x 1, 2, 4, 8 channels; the second stage has stride 2 and the last two use
dilation 2 and 4 instead of striding (output stride 8). Pyramid pooling module: adaptive average pooling to
``bins`` (1, 2, 3, 6), a 1x1 conv to C/len(bins) channels per bin, up-sampling, concatenation with the
features; a 3x3 conv-norm-ReLU, dropout, a 1x1 classifier and x8 up-sampling.

Differences: basic blocks, ``blocks`` (2, 2, 2, 2) per stage (the paper: bottleneck ResNet-50/101 pre-trained
on ImageNet), no auxiliary loss on stage 3; the pooled branches have no normalisation (a 1-bin branch sees a
single value per channel, where batch norm fails at batch size 1).

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 8.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("pspnet", 3, 2, 3, base_channels=4, blocks=(1, 1, 1, 1))
    >>> net(torch.zeros(1, 2, 32, 24, 16)).shape
    torch.Size([1, 3, 32, 24, 16])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import ConvNormAct, adaptive_avg_pool, conv, dropout, interpolate, max_pool, norm as make_norm
from medseg.models.registry import register

PAPER = "Zhao et al. 2017, Pyramid Scene Parsing Network (CVPR)"


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with a (projected) identity shortcut, ReLU after the sum."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: Optional[str] = "batch"):
        super().__init__()
        self.body = nn.Sequential(ConvNormAct(dims, cin, cout, 3, stride, dilation, norm),
                                  conv(dims, cout, cout, 3, 1, dilation, bias=False), make_norm(norm, dims, cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(conv(dims, cin, cout, 1, stride, bias=False), make_norm(norm, dims, cout)))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


class PyramidPooling(nn.Module):
    """``x: (B, C, *S) -> (B, 2C, *S)``: x concatenated with one up-sampled pooled map per bin."""

    def __init__(self, dims: int, channels: int, bins: Sequence[int]):
        super().__init__()
        reduced = max(1, channels // len(bins))
        self.branches = nn.ModuleList([nn.Sequential(adaptive_avg_pool(dims, b), conv(dims, channels, reduced, 1),
                                                     nn.ReLU(inplace=True)) for b in bins])
        self.out_channels = channels + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [interpolate(b(x), x.shape[2:]) for b in self.branches], 1)


class PSPNet(SegmentationModel):
    """PSPNet. Width ``base_channels`` (64), depth per stage ``blocks``, pyramid ``bins``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2), bins: Sequence[int] = (1, 2, 3, 6), norm: Optional[str] = "batch",
                 dropout_prob: float = 0.1):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims, b = spatial_dims, base_channels
        self.set_size_rule(8, "output stride 8")
        self.stem = nn.Sequential(ConvNormAct(dims, in_channels, b, 3, 2, norm=norm), ConvNormAct(dims, b, b, 3, norm=norm),
                                  ConvNormAct(dims, b, b, 3, norm=norm), max_pool(dims, 2))
        stages, cin = [], b
        for (mult, stride, dil), n in zip(((1, 1, 1), (2, 2, 1), (4, 1, 2), (8, 1, 4)), blocks):
            cout = b * mult
            stages += [BasicBlock(dims, cin if i == 0 else cout, cout, stride if i == 0 else 1, dil, norm) for i in range(n)]
            cin = cout
        self.backbone = nn.Sequential(*stages)
        self.ppm = PyramidPooling(dims, cin, bins)
        self.head = nn.Sequential(ConvNormAct(dims, self.ppm.out_channels, cin // 2, 3, norm=norm), dropout(dims, dropout_prob),
                                  conv(dims, cin // 2, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return interpolate(self.head(self.ppm(self.backbone(self.stem(x)))), x.shape[2:])


@register("pspnet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "blocks": (1, 1, 1, 1)})
def pspnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> PSPNet:
    return PSPNet(spatial_dims, in_channels, out_channels, **kwargs)
