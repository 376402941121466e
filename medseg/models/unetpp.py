"""UNet++ (Zhou et al. 2018): nested, densely connected skip pathways, optional deep supervision.

Node ``X[i][j]`` (level ``i``, column ``j``) is a double conv-norm-act block. ``X[i][0]`` is the encoder
(2x max-pooling between levels); for ``j >= 1``, ``X[i][j] = block(cat(X[i][0..j-1], up(X[i+1][j-1])))``.
The output is a 1x1 conv of ``X[0][L-1]``. With ``deep_supervision=True`` the 1x1 heads on
``X[0][1..L-2]`` are built as well and ``forward_train`` returns their logits (full resolution) as auxiliary
outputs; ``forward`` returns only the ``X[0][L-1]`` logits.

``preset="zhou2018"`` is the paper's configuration (the authors' Keras code): transposed-convolution up-sampling
(2x2, stride 2), no normalisation, channels 32...512; 9.04M parameters with deep supervision for one input and one
output channel, the paper's Table 1 figure. The default (unchanged) uses batch norm and interpolation + 1x1 conv.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of ``2 ** (len(channels)-1)``.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("unetpp", 2, 1, 2, channels=(4, 8, 16), deep_supervision=True).train()
    >>> out = net.forward_train(torch.zeros(2, 1, 32, 24))
    >>> out.seg.shape, [a.shape[1:] for a in out.aux]
    (torch.Size([2, 2, 32, 24]), [torch.Size([2, 32, 24])])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput
from medseg.models.blocks import ConvNormAct, Upsample, conv, max_pool
from medseg.models.registry import register

PAPER = "Zhou et al. 2018, UNet++: A Nested U-Net Architecture for Medical Image Segmentation (DLMIA)"


def double_conv(dims: int, cin: int, cout: int, norm: Optional[str]) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(dims, cin, cout, 3, norm=norm), ConvNormAct(dims, cout, cout, 3, norm=norm))


class UNetPlusPlus(SegmentationModel):
    """UNet++. Width ``channels`` (paper: 32, 64, 128, 256, 512), ``norm``, ``upsample``, ``deep_supervision``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (32, 64, 128, 256, 512), norm: Optional[str] = "batch",
                 upsample: str = "interp", deep_supervision: bool = False):
        super().__init__(spatial_dims, in_channels, out_channels)
        ch = [int(c) for c in channels]
        if len(ch) < 2:
            raise MedsegError(f"unetpp: channels needs at least 2 levels, got {ch}")
        dims, levels = spatial_dims, len(ch)
        self.levels = levels
        self.set_size_rule(2 ** (levels - 1), f"{levels} levels")
        self.deep_supervision = bool(deep_supervision)
        self.pool = max_pool(dims, 2)
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(levels):
            self.nodes[f"{i}_0"] = double_conv(dims, in_channels if i == 0 else ch[i - 1], ch[i], norm)
        for j in range(1, levels):
            for i in range(levels - j):
                self.ups[f"{i}_{j}"] = Upsample(dims, ch[i + 1], ch[i], 2, upsample)
                self.nodes[f"{i}_{j}"] = double_conv(dims, ch[i] * (j + 1), ch[i], norm)
        first = 1 if self.deep_supervision else levels - 1
        self.heads = nn.ModuleDict({str(j): conv(dims, ch[0], out_channels, 1) for j in range(first, levels)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[str(self.levels - 1)](self._top_row(x)[-1])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Main logits, and with deep supervision the heads on X(0,L-2) ... X(0,1) as auxiliary outputs."""
        row = self._top_row(x)
        last = self.levels - 1
        aux = tuple(self.heads[str(j)](row[j - 1]) for j in range(last - 1, 0, -1)) if self.deep_supervision else ()
        return TrainOutput(self.heads[str(last)](row[-1]), aux)

    def _top_row(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The nested nodes X(0,1) ... X(0,L-1) of the top row."""
        self.check_input(x)
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(self.levels):
            x = self.nodes[f"{i}_0"](x if i == 0 else self.pool(x))
            grid[i, 0] = x
        for j in range(1, self.levels):
            for i in range(self.levels - j):
                inputs = [grid[i, k] for k in range(j)] + [self.ups[f"{i}_{j}"](grid[i + 1, j - 1])]
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat(inputs, 1))
        return [grid[0, j] for j in range(1, self.levels)]


def zhou2018(spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 64, 128, 256, 512),
             deep_supervision: bool = False) -> UNetPlusPlus:
    """UNet++ as in the paper: transposed-conv up-sampling, no normalisation."""
    return UNetPlusPlus(spatial_dims, in_channels, out_channels, channels, norm="none", upsample="deconv",
                        deep_supervision=deep_supervision)


@register("unetpp", (2, 3), PAPER, test_kwargs={"channels": (4, 8, 8, 16)},
          test_variants=({}, {"deep_supervision": True, "upsample": "deconv", "norm": "instance"},
                         {"preset": "zhou2018", "deep_supervision": True}))
def unetpp(spatial_dims: int, in_channels: int, out_channels: int, preset: Optional[str] = None, **kwargs) -> UNetPlusPlus:
    """UNet++; ``preset="zhou2018"`` for the paper's configuration."""
    if preset is not None:
        from medseg.models.unet import build_preset

        return build_preset("unetpp", {"zhou2018": zhou2018}, preset, spatial_dims, in_channels, out_channels, kwargs)
    return UNetPlusPlus(spatial_dims, in_channels, out_channels, **kwargs)
