"""A small ResNet backbone with basic blocks, any dimension, shared by RefineNet and DANet.

Stem: three 3x3 conv-norm-ReLU (the first with stride 2) and 2x max-pooling (stride 4); four stages of
``base_channels`` x 1, 2, 4, 8 channels with ``blocks`` basic blocks each (:class:`medseg.models.pspnet.BasicBlock`).
``output_stride`` 32 gives stage strides 4, 8, 16, 32 (RefineNet); 8 keeps stages 3 and 4 at stride 8 with dilation
2 and 4 (DANet, PSPNet). The papers use ImageNet-pretrained bottleneck ResNet-50/101; here basic blocks, trained
from scratch.

Example:
    >>> import torch
    >>> net = ResNetBackbone(2, 3, base_channels=4, blocks=(1, 1, 1, 1))
    >>> [tuple(f.shape[2:]) for f in net(torch.zeros(1, 3, 64, 32))]
    [(16, 8), (8, 4), (4, 2), (2, 1)]
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.blocks import ConvNormAct, max_pool
from medseg.models.pspnet import BasicBlock


class ResNetBackbone(nn.Module):
    """``forward(x)`` returns the four stage outputs (finest first); ``channels`` their widths."""

    def __init__(self, dims: int, in_channels: int, base_channels: int = 64, blocks: Sequence[int] = (2, 2, 2, 2),
                 norm: Optional[str] = "batch", output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 32) or len(blocks) != 4:
            raise MedsegError(f"resnet backbone: output_stride must be 8 or 32 and blocks have 4 entries, got "
                              f"{output_stride} and {list(blocks)}")
        b = base_channels
        self.stem = nn.Sequential(ConvNormAct(dims, in_channels, b, 3, 2, norm=norm), ConvNormAct(dims, b, b, 3, norm=norm),
                                  ConvNormAct(dims, b, b, 3, norm=norm), max_pool(dims, 2))
        layout = ((1, 1, 1), (2, 2, 1), (4, 2, 1), (8, 2, 1)) if output_stride == 32 else \
                 ((1, 1, 1), (2, 2, 1), (4, 1, 2), (8, 1, 4))
        self.stages = nn.ModuleList()
        self.channels: list[int] = []
        cin = b
        for (mult, stride, dil), n in zip(layout, blocks):
            cout = b * mult
            self.stages.append(nn.Sequential(*[BasicBlock(dims, cin if i == 0 else cout, cout, stride if i == 0 else 1, dil, norm)
                                               for i in range(n)]))
            self.channels.append(cout)
            cin = cout

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
