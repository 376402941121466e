"""RefineNet (Lin, Milan, Shen, Reid 2017), 4-cascaded, any dimension.

Backbone: :class:`medseg.models.resnet.ResNetBackbone` (stages at strides 4, 8, 16, 32). Four RefineNet blocks
from the coarsest to the finest: each takes its backbone stage (a 3x3 conv to the block's width, then two residual
conv units, RCU) and, except the first, the previous block's output (two RCUs); multi-resolution fusion (a 3x3
conv per input to the block's width, up-sampling of the coarser one, sum); chained residual pooling (ReLU, two
blocks of 5x5 max-pooling + 3x3 conv, summed); one output RCU. The finest block's output (stride 4) goes through
two RCUs and a 1x1 classifier, then linear x4 up-sampling. Widths ``features`` (paper: 512 for RefineNet-4, 256
for the others, the 2D default; 3D default 256, 128, 128, 128, as 3x3x3 convolutions at 512 channels would hold
~200M parameters); RCUs have no normalisation, as in the paper.

Differences: basic-block ResNet (``blocks`` 2, 2, 2, 2) trained from scratch instead of an ImageNet ResNet-101;
no dropout; bilinear/trilinear up-sampling.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 32.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("refinenet", 2, 3, 2, base_channels=4, features=(8, 4, 4, 4), blocks=(1, 1, 1, 1))
    >>> net(torch.zeros(1, 3, 64, 96)).shape
    torch.Size([1, 2, 64, 96])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel
from medseg.models.blocks import ChainedResidualPool, ResidualConvUnit, conv, interpolate
from medseg.models.registry import register
from medseg.models.resnet import ResNetBackbone

PAPER = ("Lin, Milan, Shen, Reid 2017, RefineNet: Multi-Path Refinement Networks for High-Resolution Semantic "
         "Segmentation (CVPR)")


class RefineBlock(nn.Module):
    """One RefineNet block on ``len(in_channels)`` inputs (finest first after the first one): adaptive convs + 2 RCUs
    per input, multi-resolution fusion at the finest input's grid, chained residual pooling, output RCU."""

    def __init__(self, dims: int, in_channels: Sequence[int], width: int):
        super().__init__()
        # the backbone input is reduced to the block's width by a 3x3 conv; the previous block's output enters as is
        self.paths = nn.ModuleList([nn.Sequential(conv(dims, c, width, 3) if i == 0 else nn.Identity(),
                                                  ResidualConvUnit(dims, width if i == 0 else c),
                                                  ResidualConvUnit(dims, width if i == 0 else c))
                                    for i, c in enumerate(in_channels)])
        widths = [width] + list(in_channels[1:])
        self.fuse = nn.ModuleList([conv(dims, w, width, 3) for w in widths]) if len(in_channels) > 1 else None
        self.crp = ChainedResidualPool(dims, width)
        self.out = ResidualConvUnit(dims, width)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        ys = [p(x) for p, x in zip(self.paths, xs)]
        if self.fuse is not None:
            size = ys[0].shape[2:]
            y = sum(interpolate(f(v), size) if v.shape[2:] != size else f(v) for f, v in zip(self.fuse, ys))
        else:
            y = ys[0]
        return self.out(self.crp(y))


class RefineNet(SegmentationModel):
    """RefineNet-4-cascade. Width: ``base_channels`` of the backbone (64), ``features`` of the blocks from the coarsest
    (paper: 512, 256, 256, 256), ``blocks`` per backbone stage."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 features: Optional[Sequence[int]] = None, blocks: Sequence[int] = (2, 2, 2, 2),
                 norm: Optional[str] = "batch"):
        super().__init__(spatial_dims, in_channels, out_channels)
        features = list(features or ((512, 256, 256, 256) if spatial_dims == 2 else (256, 128, 128, 128)))
        if len(features) != 4:
            raise MedsegError(f"refinenet: features needs 4 widths (RefineNet-4 ... RefineNet-1), got {list(features)}")
        dims = spatial_dims
        self.set_size_rule(32, "output stride 32")
        self.backbone = ResNetBackbone(dims, in_channels, base_channels, blocks, norm, output_stride=32)
        chans = self.backbone.channels[::-1]  # coarsest first
        self.refine = nn.ModuleList([RefineBlock(dims, [chans[0]], features[0])])
        for k in range(1, 4):
            self.refine.append(RefineBlock(dims, [chans[k], features[k - 1]], features[k]))
        self.head = nn.Sequential(ResidualConvUnit(dims, features[3]), ResidualConvUnit(dims, features[3]),
                                  conv(dims, features[3], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        feats = self.backbone(x)[::-1]
        y = self.refine[0](feats[0])
        for k in range(1, 4):
            y = self.refine[k](feats[k], y)
        return interpolate(self.head(y), x.shape[2:])


@register("refinenet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "features": (8, 4, 4, 4), "blocks": (1, 1, 1, 1)})
def refinenet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> RefineNet:
    return RefineNet(spatial_dims, in_channels, out_channels, **kwargs)
