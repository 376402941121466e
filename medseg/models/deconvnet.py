"""DeconvNet (Noh, Hong, Han 2015), any dimension.

Encoder: the 13 convolutions of VGG-16 with batch norm (stages of 2, 2, 3, 3, 3 conv-BN-ReLU, ``base_channels`` x
1, 2, 4, 8, 8), each stage ended by 2x max-pooling that keeps its argmax indices; ``fc6`` (a ``fc_kernel`` conv to
``fc_channels``) and ``fc7`` (1x1), both conv-BN-ReLU; ``deconv-fc6`` (a transposed ``fc_kernel`` conv back to
``8 * base_channels``). Decoder: the mirror image — per stage max-unpooling at the stored indices followed by 3x3
transposed convolutions ("deconvolution") with BN-ReLU (channels 512,512,512 | 512,512,256 | 256,256,128 | 128,64 |
64,64 at base 64); a 1x1 classifier.

Differences: fc6 / deconv-fc6 use "same" padding (the paper's 7x7 fc6 is unpadded and turns the 7x7 map of a 224x224
input into 1x1, deconv-fc6 back into 7x7; here any multiple of 32 works and the map keeps its size — the parameter
count is the paper's); in 3D fc6 is 3^3 x 1024 (``fc_kernel``, ``fc_channels``) instead of 7^3 x 4096 (~2 billion
parameters); no ImageNet weights, no instance-wise (proposal) inference or ensemble with FCN.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 32.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("deconvnet", 2, 3, 2, base_channels=4, fc_channels=16)
    >>> net(torch.zeros(1, 3, 64, 32)).shape
    torch.Size([1, 2, 64, 32])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import ConvNormAct, conv, conv_transpose, max_pool, max_unpool, norm as make_norm, pooled_encoder
from medseg.models.fcn import VGG16, vgg_stage
from medseg.models.registry import register

PAPER = "Noh, Hong, Han 2015, Learning Deconvolution Network for Semantic Segmentation (ICCV)"


def _deconv(dims: int, cin: int, cout: int, k: int, norm: Optional[str]) -> nn.Sequential:
    """Stride-1 transposed conv (size kept) - norm - ReLU."""
    return nn.Sequential(conv_transpose(dims, cin, cout, k, 1, k // 2, bias=norm in (None, "none")),
                         make_norm(norm, dims, cout), nn.ReLU(inplace=True))


class DeconvNet(SegmentationModel):
    """DeconvNet. Width: ``base_channels`` (64), ``fc_channels`` (4096 in 2D, 1024 in 3D), ``fc_kernel`` (7 / 3)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 fc_channels: Optional[int] = None, fc_kernel: Optional[int] = None, norm: Optional[str] = "batch"):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims = spatial_dims
        self.set_size_rule(32, "5 poolings")
        fc_channels = fc_channels or (4096 if dims == 2 else 1024)
        fc_kernel = fc_kernel or (7 if dims == 2 else 3)
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for w, n in zip(widths, VGG16):
            self.encoder.append(vgg_stage(dims, cin, w, n, norm))
            cin = w
        self.pool = max_pool(dims, 2, return_indices=True)
        self.unpool = max_unpool(dims, 2)
        self.fc = nn.Sequential(ConvNormAct(dims, widths[-1], fc_channels, fc_kernel, norm=norm),
                                ConvNormAct(dims, fc_channels, fc_channels, 1, norm=norm),
                                _deconv(dims, fc_channels, widths[-1], fc_kernel, norm))
        self.decoder = nn.ModuleList()
        for i in reversed(range(5)):
            w, n = widths[i], VGG16[i]
            wout = widths[i - 1] if i else widths[0]
            self.decoder.append(nn.Sequential(*[_deconv(dims, w, w if j < n - 1 else wout, 3, norm) for j in range(n)]))
        self.head = conv(dims, widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, saved = pooled_encoder(self.encoder, self.pool, x)
        x = self.fc(x)
        for stage in self.decoder:
            idx, shape = saved.pop()
            x = stage(self.unpool(x, idx, output_size=shape))
        return self.head(x)


@register("deconvnet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "fc_channels": 8})
def deconvnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> DeconvNet:
    return DeconvNet(spatial_dims, in_channels, out_channels, **kwargs)
