"""DANet (Fu et al. 2019): dual attention — position and channel attention — on a dilated ResNet, any dimension.

Backbone: :class:`medseg.models.resnet.ResNetBackbone` with output stride 8 (stages 3 and 4 dilated 2 and 4).
Head: two branches on the last stage's ``C`` channels, each a 3x3 conv-norm-ReLU to ``C / 4``, then the position
attention module (:class:`~medseg.models.blocks.PositionAttention`: query/key 1x1 convs to C/32, softmax over all
positions, ``gamma`` from 0) or the channel attention module (:class:`~medseg.models.blocks.ChannelAttention`), and a
3x3 conv-norm-ReLU; the two are summed, dropout 0.1, 1x1 classifier, linear x8 up-sampling. With
``deep_supervision=True`` the two branches' own classifiers (dropout + 1x1) are the auxiliary outputs (the authors'
code trains with them), up-sampled to the input.

Differences: basic-block ResNet (``blocks``) trained from scratch instead of an ImageNet dilated ResNet-101; no
multi-grid. Position attention costs ``(prod S/8)^2`` memory per sample: 4096^2 at 512^2 in 2D and at 128^3 in 3D.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 8.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("danet", 3, 2, 3, base_channels=4, blocks=(1, 1, 1, 1))
    >>> net(torch.zeros(1, 2, 32, 24, 16)).shape
    torch.Size([1, 3, 32, 24, 16])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from medseg.models.base import SegmentationModel, TrainOutput
from medseg.models.blocks import ChannelAttention, ConvNormAct, PositionAttention, conv, dropout, interpolate
from medseg.models.registry import register
from medseg.models.resnet import ResNetBackbone

PAPER = "Fu et al. 2019, Dual Attention Network for Scene Segmentation (CVPR)"


class DANet(SegmentationModel):
    """DANet. Width ``base_channels`` (64: the last stage has 512 channels, the attention branches 128)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2), norm: Optional[str] = "batch", dropout_prob: float = 0.1,
                 deep_supervision: bool = False):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims = spatial_dims
        self.set_size_rule(8, "output stride 8")
        self.deep_supervision = bool(deep_supervision)
        self.backbone = ResNetBackbone(dims, in_channels, base_channels, blocks, norm, output_stride=8)
        c = self.backbone.channels[-1]
        inter = max(1, c // 4)
        self.pam_in, self.cam_in = ConvNormAct(dims, c, inter, 3, norm=norm), ConvNormAct(dims, c, inter, 3, norm=norm)
        self.pam, self.cam = PositionAttention(dims, inter), ChannelAttention()
        self.pam_out, self.cam_out = ConvNormAct(dims, inter, inter, 3, norm=norm), ConvNormAct(dims, inter, inter, 3, norm=norm)
        self.head = nn.Sequential(dropout(dims, dropout_prob), conv(dims, inter, out_channels, 1))
        if self.deep_supervision:
            self.aux_heads = nn.ModuleList([nn.Sequential(dropout(dims, dropout_prob), conv(dims, inter, out_channels, 1))
                                            for _ in range(2)])

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        f = self.backbone(x)[-1]
        return self.pam_out(self.pam(self.pam_in(f))), self.cam_out(self.cam(self.cam_in(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sa, sc = self._branches(x)
        return interpolate(self.head(sa + sc), x.shape[2:])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        sa, sc = self._branches(x)
        seg = interpolate(self.head(sa + sc), x.shape[2:])
        if not self.deep_supervision:
            return TrainOutput(seg)
        return TrainOutput(seg, tuple(interpolate(h(b), x.shape[2:]) for h, b in zip(self.aux_heads, (sa, sc))))


@register("danet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "blocks": (1, 1, 1, 1)},
          test_variants=({}, {"deep_supervision": True}))
def danet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> DANet:
    return DANet(spatial_dims, in_channels, out_channels, **kwargs)
