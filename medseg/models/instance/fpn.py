"""The feature extractor shared by the instance models: the package's ResNet (basic blocks, any dimension) with
MONAI's feature pyramid network on top (Lin et al. 2017), trained from scratch.

Levels P2..P5 have strides 4, 8, 16, 32 (P6, stride 64, with ``extra_pool``); every level has ``fpn_channels``
channels. The papers use an ImageNet-pretrained ResNet-50/101; nothing is downloaded here: weights you trained
elsewhere load with ``model.init_weights`` in the pipeline, like any other model's.

Example:
    >>> import torch
    >>> net = BackboneFPN(2, 3, base_channels=4, blocks=(1, 1, 1, 1), fpn_channels=8)
    >>> [tuple(f.shape[1:]) for f in net(torch.zeros(1, 3, 64, 32))], net.strides
    ([(8, 16, 8), (8, 8, 4), (8, 4, 2), (8, 2, 1)], (4, 8, 16, 32))
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from medseg.models.resnet import ResNetBackbone


class BackboneFPN(nn.Module):
    """``forward(x)`` -> list of pyramid levels, finest first (strides :attr:`strides`), ``fpn_channels`` each."""

    def __init__(self, dims: int, in_channels: int, base_channels: int = 32, blocks: Sequence[int] = (2, 2, 2, 2),
                 fpn_channels: int = 128, norm: Optional[str] = "batch", extra_pool: bool = False):
        super().__init__()
        self.body = ResNetBackbone(dims, in_channels, base_channels, blocks, norm)
        self.fpn = FeaturePyramidNetwork(dims, list(self.body.channels), fpn_channels,
                                         extra_blocks=LastLevelMaxPool(dims) if extra_pool else None)
        self.out_channels = fpn_channels
        self.strides: tuple[int, ...] = (4, 8, 16, 32, 64) if extra_pool else (4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
