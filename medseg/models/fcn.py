"""FCN (Long, Shelhamer, Darrell 2015) on a VGG-16-style backbone, any dimension.

Backbone: five stages of 2, 2, 3, 3, 3 conv-ReLU layers (``base_channels`` x 1, 2, 4, 8, 8), each ended by
2x max-pooling (stride 32 in total); ``fc6``/``fc7`` as convolutions; a 1x1 score layer. ``variant``:

* ``"32s"``: scores up-sampled x32;
* ``"16s"``: scores up-sampled x2 (``upsample``, default k4 s2 p1 as in the paper) + 1x1 scores of pool4, then x16;
* ``"8s"``: additionally + scores of pool3, then x8.

The final up-sampling is fixed (bi/trilinear) interpolation, as the paper's bilinear-initialised last layer.
Differences: no 100-pixel input padding and no cropping (inputs must be multiples of 32 instead); fc6 has
kernel 7 and 4096 channels in 2D but kernel 3 and 1024 channels in 3D (``fc_kernel``, ``fc_channels``), as a
7^3 x 4096 layer would hold ~720M parameters; optional ``norm`` (none in the paper).

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 32.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("fcn", 2, 3, 2, base_channels=4, fc_channels=16, variant="8s")
    >>> net(torch.zeros(1, 3, 64, 96)).shape
    torch.Size([1, 2, 64, 96])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from medseg.models.base import SegmentationModel
from medseg.models.blocks import ConvNormAct, Upsample, choose, conv, dropout, interpolate, max_pool
from medseg.models.registry import register

PAPER = "Long, Shelhamer, Darrell 2015, Fully Convolutional Networks for Semantic Segmentation (CVPR)"
VGG16 = (2, 2, 3, 3, 3)


def vgg_stage(dims: int, cin: int, cout: int, n: int, norm: Optional[str]) -> nn.Sequential:
    """``n`` 3x3 conv-norm-ReLU layers ``cin -> cout`` (one VGG stage, without its pooling)."""
    return nn.Sequential(*[ConvNormAct(dims, cin if i == 0 else cout, cout, 3, norm=norm) for i in range(n)])


class FCN(SegmentationModel):
    """FCN-32s/16s/8s. Width: ``base_channels`` (64 in the paper) and ``fc_channels``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, variant: str = "8s",
                 base_channels: int = 64, fc_channels: Optional[int] = None, fc_kernel: Optional[int] = None,
                 norm: Optional[str] = None, upsample: str = "deconv4", dropout_prob: float = 0.5):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims = spatial_dims
        self.variant = choose(variant, ("8s", "16s", "32s"), "variant")
        self.set_size_rule(32, "5 poolings")
        fc_channels = fc_channels or (4096 if dims == 2 else 1024)
        fc_kernel = fc_kernel or (7 if dims == 2 else 3)
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)]
        self.stages = nn.ModuleList()
        cin = in_channels
        for w, n in zip(widths, VGG16):
            self.stages.append(vgg_stage(dims, cin, w, n, norm))
            cin = w
        self.pool = max_pool(dims, 2)
        self.fc = nn.Sequential(ConvNormAct(dims, widths[-1], fc_channels, fc_kernel, norm=norm), dropout(dims, dropout_prob),
                                ConvNormAct(dims, fc_channels, fc_channels, 1, norm=norm), dropout(dims, dropout_prob))
        self.score = conv(dims, fc_channels, out_channels, 1)
        n_skips = {"32s": 0, "16s": 1, "8s": 2}[self.variant]
        self.skip_scores = nn.ModuleList([conv(dims, widths[3 - k], out_channels, 1) for k in range(n_skips)])
        self.ups = nn.ModuleList([Upsample(dims, out_channels, out_channels, 2, upsample) for _ in range(n_skips)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = x.shape[2:]
        pools = []
        for stage in self.stages:
            x = self.pool(stage(x))
            pools.append(x)
        y = self.score(self.fc(x))
        for k, (up, score) in enumerate(zip(self.ups, self.skip_scores)):
            y = up(y) + score(pools[3 - k])
        return interpolate(y, size)


@register("fcn", (2, 3), PAPER, test_kwargs={"base_channels": 4, "fc_channels": 16},
          test_variants=({}, {"variant": "32s", "upsample": "interp"}))
def fcn(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> FCN:
    return FCN(spatial_dims, in_channels, out_channels, **kwargs)
