"""DeepLabv3+ (Chen et al. 2018), any dimension.

Backbone: a compact Xception-style network of residual blocks made of depthwise-separable convolutions:
stem (two convs, stride 2), stages of ``base_channels`` x 2, 4, 8, 16 channels at strides 2, 2, 2, 1; the last
stage is dilated (rate 2) so the output stride is 16. ASPP with separable atrous convolutions (rates
``atrous_rates``) and image pooling; decoder: 1x1-reduced low-level features (stride 4, 48 channels)
concatenated with the x4-up-sampled ASPP output, two separable 3x3 convs, 1x1 classifier, x4 up-sampling.

Differences: the backbone is a small Xception-like network (the paper uses a modified aligned Xception-65 or
ResNet-101 pre-trained on ImageNet; we train from scratch); in 3D the default rates are (2, 4, 6) instead of
(6, 12, 18) since a 128^3 window is only 8^3 at stride 16.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 16.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("deeplabv3plus", 2, 3, 2, base_channels=4, aspp_channels=8, low_level_channels=4)
    >>> net(torch.zeros(1, 3, 64, 48)).shape
    torch.Size([1, 2, 64, 48])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import ASPP, ConvNormAct, SeparableConv, conv, interpolate, norm as make_norm
from medseg.models.registry import register

PAPER = ("Chen et al. 2018, Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation "
         "(DeepLabv3+, ECCV)")


class SeparableResBlock(nn.Module):
    """Three separable convs (the last strided), plus a 1x1 (strided) projection shortcut."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: Optional[str] = "batch"):
        super().__init__()
        self.body = nn.Sequential(SeparableConv(dims, cin, cout, 3, 1, dilation, norm),
                                  SeparableConv(dims, cout, cout, 3, 1, dilation, norm),
                                  SeparableConv(dims, cout, cout, 3, stride, dilation, norm))
        self.skip = nn.Sequential(conv(dims, cin, cout, 1, stride, bias=False), make_norm(norm, dims, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+. Width: ``base_channels`` (64), ``aspp_channels`` (256), ``low_level_channels`` (48)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 aspp_channels: int = 256, low_level_channels: int = 48, atrous_rates: Optional[Sequence[int]] = None,
                 norm: Optional[str] = "batch"):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims, b = spatial_dims, base_channels
        rates = tuple(atrous_rates or ((6, 12, 18) if dims == 2 else (2, 4, 6)))
        self.set_size_rule(16, "output stride 16")
        self.stem = nn.Sequential(ConvNormAct(dims, in_channels, max(1, b // 2), 3, 2, norm=norm),
                                  ConvNormAct(dims, max(1, b // 2), b, 3, norm=norm))
        self.low = SeparableResBlock(dims, b, 2 * b, 2, 1, norm)             # stride 4: low-level features
        self.mid = nn.Sequential(SeparableResBlock(dims, 2 * b, 4 * b, 2, 1, norm),   # stride 8
                                 SeparableResBlock(dims, 4 * b, 8 * b, 2, 1, norm))   # stride 16
        self.exit = SeparableResBlock(dims, 8 * b, 16 * b, 1, 2, norm)       # dilated, stride 16
        self.aspp = ASPP(dims, 16 * b, aspp_channels, rates, norm, separable=True)
        self.reduce = ConvNormAct(dims, 2 * b, low_level_channels, 1, norm=norm)
        self.decoder = nn.Sequential(SeparableConv(dims, aspp_channels + low_level_channels, aspp_channels, 3, norm=norm),
                                     SeparableConv(dims, aspp_channels, aspp_channels, 3, norm=norm))
        self.head = conv(dims, aspp_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = x.shape[2:]
        low = self.low(self.stem(x))
        y = self.aspp(self.exit(self.mid(low)))
        y = torch.cat([interpolate(y, low.shape[2:]), self.reduce(low)], 1)
        return interpolate(self.head(self.decoder(y)), size)


@register("deeplabv3plus", (2, 3), PAPER, test_kwargs={"base_channels": 4, "aspp_channels": 8, "low_level_channels": 4})
def deeplabv3plus(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> DeepLabV3Plus:
    return DeepLabV3Plus(spatial_dims, in_channels, out_channels, **kwargs)
