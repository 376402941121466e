"""SegNet (Badrinarayanan, Kendall, Cipolla 2017), any dimension.

Encoder: the 13 convolutions of VGG-16 (stages of 2, 2, 3, 3, 3 conv-BN-ReLU layers, ``base_channels`` x 1, 2,
4, 8, 8), each stage ended by 2x max-pooling that keeps its argmax indices. Decoder: mirrored stages, each
starting with max-unpooling at the stored indices (``upsample="unpool"``, the paper's key idea: sparse maps,
no learned up-sampling, no skip features), followed by conv-BN-ReLU layers; a 1x1 classifier. Other
``upsample`` choices ("deconv", "deconv4", "interp") are ablations.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of ``2 ** depth`` (32).

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("segnet", 3, 2, 3, base_channels=4, depth=3)
    >>> net(torch.zeros(1, 2, 16, 24, 8)).shape
    torch.Size([1, 3, 16, 24, 8])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel
from medseg.models.blocks import ConvNormAct, Upsample, choose, conv, max_pool, max_unpool, pooled_encoder
from medseg.models.fcn import VGG16, vgg_stage
from medseg.models.registry import register

PAPER = ("Badrinarayanan, Kendall, Cipolla 2017, SegNet: A Deep Convolutional Encoder-Decoder Architecture for "
         "Image Segmentation (TPAMI)")


class SegNet(SegmentationModel):
    """SegNet. ``depth`` stages (5 in the paper), width ``base_channels`` (64), ``norm`` ("batch")."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 depth: int = 5, norm: Optional[str] = "batch", upsample: str = "unpool"):
        super().__init__(spatial_dims, in_channels, out_channels)
        if not 1 <= depth <= 5:
            raise MedsegError(f"segnet: depth must be 1 to 5, got {depth}")
        dims = spatial_dims
        self.upsample = choose(upsample, ("unpool", "deconv", "deconv4", "interp"), "upsample")
        self.set_size_rule(2 ** depth, f"depth {depth}")
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)][:depth]
        convs = VGG16[:depth]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for w, n in zip(widths, convs):
            self.encoder.append(vgg_stage(dims, cin, w, n, norm))
            cin = w
        self.pool = max_pool(dims, 2, return_indices=True)
        self.unpool = max_unpool(dims, 2)
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth)):
            w, n = widths[i], convs[i]
            wout = widths[i - 1] if i else widths[0]
            self.ups.append(nn.Identity() if self.upsample == "unpool" else Upsample(dims, w, w, 2, self.upsample))
            layers = [ConvNormAct(dims, w, w, 3, norm=norm) for _ in range(n - 1)]
            layers.append(ConvNormAct(dims, w, wout, 3, norm=norm))
            self.decoder.append(nn.Sequential(*layers))
        self.head = conv(dims, widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, saved = pooled_encoder(self.encoder, self.pool, x)
        for up, stage in zip(self.ups, self.decoder):
            idx, shape = saved.pop()
            x = self.unpool(x, idx, output_size=shape) if self.upsample == "unpool" else up(x)
            x = stage(x)
        return self.head(x)


@register("segnet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "depth": 4},
          test_variants=({}, {"upsample": "deconv4", "depth": 3}))
def segnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> SegNet:
    return SegNet(spatial_dims, in_channels, out_channels, **kwargs)
