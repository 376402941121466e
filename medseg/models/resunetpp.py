"""ResUNet++ (Jha et al. 2019), any dimension.

Stem: a residual unit at full resolution. Encoder: per level squeeze-and-excitation of the previous output,
then a pre-activation residual unit with stride 2. Bridge: ASPP. Decoder: per level an attention block
(the encoder features, pooled to the decoder's grid, gate the decoder features), up-sampling, concatenation
with the encoder skip, a residual unit. Output: ASPP, then a 1x1 conv.

Differences: nearest-neighbour up-sampling is replaced by the ``upsample`` choice (default "interp",
linear interpolation + 1x1 conv); ASPP rates (1, 6, 12, 18) in 2D and (1, 2, 3, 4) in 3D.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of ``2 ** (len(channels) - 2)``.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("resunetpp", 3, 2, 3, channels=(4, 8, 16, 16))
    >>> net(torch.zeros(1, 2, 16, 8, 24)).shape
    torch.Size([1, 3, 16, 8, 24])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel
from medseg.models.blocks import ASPP, SqueezeExcite, Upsample, act, conv, max_pool, norm as make_norm
from medseg.models.registry import register

PAPER = "Jha et al. 2019, ResUNet++: An Advanced Architecture for Medical Image Segmentation (IEEE ISM)"


class PreActResidual(nn.Module):
    """norm-ReLU-conv(stride) -> norm-ReLU-conv, plus a 1x1 (strided) conv-norm shortcut."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, norm: Optional[str] = "batch"):
        super().__init__()
        self.body = nn.Sequential(make_norm(norm, dims, cin), act("relu"), conv(dims, cin, cout, 3, stride),
                                  make_norm(norm, dims, cout), act("relu"), conv(dims, cout, cout, 3))
        self.skip = nn.Sequential(conv(dims, cin, cout, 1, stride), make_norm(norm, dims, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class DecoderAttention(nn.Module):
    """ResUNet++ attention: ``d * sigmoid(conv(relu(norm(conv(pool(enc))) + norm(conv(d)))))``; ``d`` keeps its shape."""

    def __init__(self, dims: int, c_enc: int, c_dec: int, norm: Optional[str] = "batch"):
        super().__init__()
        self.enc = nn.Sequential(make_norm(norm, dims, c_enc), act("relu"), conv(dims, c_enc, c_dec, 3), max_pool(dims, 2))
        self.dec = nn.Sequential(make_norm(norm, dims, c_dec), act("relu"), conv(dims, c_dec, c_dec, 3))
        self.out = nn.Sequential(make_norm(norm, dims, c_dec), act("relu"), conv(dims, c_dec, 1, 1), nn.Sigmoid())

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return dec * self.out(self.enc(enc) + self.dec(dec))


class ResUNetPlusPlus(SegmentationModel):
    """ResUNet++. Width ``channels`` (paper: 16, 32, 64, 128, 256; the last is the ASPP bridge)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), norm: Optional[str] = "batch",
                 upsample: str = "interp", aspp_rates: Optional[Sequence[int]] = None):
        super().__init__(spatial_dims, in_channels, out_channels)
        ch = [int(c) for c in channels]
        if len(ch) < 3:
            raise MedsegError(f"resunetpp: channels needs at least 3 entries (stem, levels, bridge), got {ch}")
        dims, depth = spatial_dims, len(ch) - 2
        rates = tuple(aspp_rates or ((1, 6, 12, 18) if dims == 2 else (1, 2, 3, 4)))
        self.set_size_rule(2 ** depth, f"depth {depth}")
        self.stem = nn.Sequential(conv(dims, in_channels, ch[0], 3), make_norm(norm, dims, ch[0]), act("relu"),
                                  conv(dims, ch[0], ch[0], 3))
        self.stem_skip = conv(dims, in_channels, ch[0], 1)
        self.encoder = nn.ModuleList([nn.Sequential(SqueezeExcite(dims, ch[i]), PreActResidual(dims, ch[i], ch[i + 1], 2, norm))
                                      for i in range(depth)])
        self.bridge = ASPP(dims, ch[depth], ch[depth + 1], rates, norm, separable=False, image_pool=False)
        self.attn = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        width = ch[depth + 1]
        for i in reversed(range(depth)):
            self.attn.append(DecoderAttention(dims, ch[i], width, norm))
            self.ups.append(Upsample(dims, width, width, 2, upsample))
            self.decoder.append(PreActResidual(dims, width + ch[i], ch[i + 1], 1, norm))
            width = ch[i + 1]
        self.out_aspp = ASPP(dims, width, ch[0], rates, norm, separable=False, image_pool=False)
        self.head = conv(dims, ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = self.stem(x) + self.stem_skip(x)
        skips = [y]
        for stage in self.encoder:
            y = stage(y)
            skips.append(y)
        y = self.bridge(skips.pop())
        for attn, up, block in zip(self.attn, self.ups, self.decoder):
            skip = skips.pop()
            y = block(torch.cat([up(attn(skip, y)), skip], 1))
        return self.head(self.out_aspp(y))


@register("resunetpp", (2, 3), PAPER, test_kwargs={"channels": (4, 8, 8, 16)})
def resunetpp(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> ResUNetPlusPlus:
    return ResUNetPlusPlus(spatial_dims, in_channels, out_channels, **kwargs)
