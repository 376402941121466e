"""U-Net (Çiçek 2016 style) and Attention U-Net (Oktay 2018), any dimension.

Encoder level ``i`` turns ``channels[i-1]`` into ``channels[i]`` at stride ``strides[i-1]`` (strided first
convolution, as MONAI's UNet); each level is two conv-norm-act layers, or a MONAI ``ResidualUnit`` with
``num_res_units`` sub-units. The decoder up-samples (``upsample``), concatenates the skip (weighted by an
attention gate in ``attention_unet``) and applies the same block. A 1x1 convolution gives the logits.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``; every axis of ``S`` must be a multiple of
``prod(strides)`` on that axis.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("unet", 3, 2, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    >>> net(torch.zeros(1, 2, 16, 12, 8)).shape
    torch.Size([1, 3, 16, 12, 8])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import ResidualUnit

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, as_tuple, stride_product
from medseg.models.blocks import AttentionGate, ConvNormAct, Upsample, choose, conv
from medseg.models.registry import register

PAPER_UNET = "Çiçek et al. 2016, 3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation (MICCAI)"
PAPER_ATTENTION = "Oktay et al. 2018, Attention U-Net: Learning Where to Look for the Pancreas (MIDL)"


def _level_block(dims: int, cin: int, cout: int, stride, num_res_units: int, norm: str, dropout: float) -> nn.Module:
    if num_res_units > 0:
        norm_arg = ("group", {"num_groups": 8}) if norm == "group" else norm
        return ResidualUnit(dims, cin, cout, strides=stride, kernel_size=3, subunits=num_res_units, norm=norm_arg,
                            act="PRELU", dropout=dropout or None)
    return nn.Sequential(ConvNormAct(dims, cin, cout, 3, stride, norm=norm, act="leakyrelu"),
                         ConvNormAct(dims, cout, cout, 3, 1, norm=norm, act="leakyrelu"))


class UNet(SegmentationModel):
    """U-Net; ``attention=True`` adds attention gates on the skips (Attention U-Net).

    Args:
        channels: features per level, e.g. ``(16, 32, 64, 128, 256)``; depth = ``len(channels) - 1``.
        strides: down-sampling per level (``len(channels) - 1`` entries, each an int or per-axis tuple).
        num_res_units: 0 for two plain convolutions per level, else residual units with this many sub-units.
        norm: "instance" | "batch" | "group". upsample: "deconv" | "deconv4" | "interp" ("nontrainable" = "interp").
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Optional[Sequence] = None,
                 num_res_units: int = 2, norm: str = "instance", upsample: str = "deconv", dropout: float = 0.0,
                 attention: bool = False):
        super().__init__(spatial_dims, in_channels, out_channels)
        channels = [int(c) for c in channels]
        strides = list(strides) if strides is not None else [2] * (len(channels) - 1)
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise MedsegError(f"unet: channels {channels} needs at least 2 entries and strides one fewer, got {strides}")
        norm = choose(norm, ("instance", "batch", "group"), "norm")
        upsample = "interp" if upsample == "nontrainable" else choose(upsample, ("deconv", "deconv4", "interp", "nontrainable"), "upsample")
        self.strides = [as_tuple(s, spatial_dims, "stride") for s in strides]
        self.set_size_rule(stride_product(self.strides, spatial_dims), f"depth {len(strides)}")
        dims = spatial_dims
        self.down = nn.ModuleList([_level_block(dims, in_channels, channels[0], 1, num_res_units, norm, dropout)])
        for i, s in enumerate(self.strides):
            self.down.append(_level_block(dims, channels[i], channels[i + 1], s, num_res_units, norm, dropout))
        self.up = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(len(self.strides))):
            self.up.append(Upsample(dims, channels[i + 1], channels[i], self.strides[i], upsample))
            if attention:
                self.gates.append(AttentionGate(dims, channels[i], channels[i], max(1, channels[i] // 2), norm))
            self.merge.append(_level_block(dims, 2 * channels[i], channels[i], 1, num_res_units, norm, dropout))
        self.head = conv(dims, channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for k, (up, merge) in enumerate(zip(self.up, self.merge)):
            skip = skips.pop()
            x = up(x)
            if len(self.gates):
                skip = self.gates[k](skip, x)
            x = merge(torch.cat([x, skip], 1))
        return self.head(x)


@register("unet", (2, 3), PAPER_UNET, test_kwargs={"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
          test_variants=({}, {"num_res_units": 0, "upsample": "interp", "norm": "batch"}))
def unet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> UNet:
    return UNet(spatial_dims, in_channels, out_channels, **kwargs)


@register("attention_unet", (2, 3), PAPER_ATTENTION, test_kwargs={"channels": (4, 8, 16), "strides": (2, 2)})
def attention_unet(spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                   strides: Optional[Sequence] = None, num_res_units: int = 0, norm: str = "instance",
                   upsample: str = "deconv", dropout: float = 0.0) -> UNet:
    """Attention U-Net: U-Net with plain double-conv levels and an additive attention gate on every skip."""
    return UNet(spatial_dims, in_channels, out_channels, channels, strides, num_res_units, norm, upsample, dropout,
                attention=True)
