"""V-Net (Milletari 2016), any dimension and any number of input channels.

Residual stages with 1, 2, 3, 3 convolutions on the way down and a 3-convolution bottom stage, 5x5x5 kernels,
PReLU, strided 2x2x2 convolutions for down-sampling (channels double) and transposed 2x2x2 convolutions for
up-sampling; decoder stages with 3, 3, 2, 1 convolutions on the concatenated skip; 1x1 output convolution.

Unlike the paper (and MONAI's VNet, which repeats the input ``base/in`` times and so requires
``out % in == 0``), the input stage adds a 1x1 projection of the input as its residual, so any number of input
channels works.

Presets (``vnet(preset=...)``; the default layout above is unchanged):

* ``"milletari2016"``: the paper's network — the stage layout above (the paper's Fig. 1: 1, 2, 3, 3 convolutions
  down, 3 at the bottom, 3, 3, 2, 1 up), PReLU, **no normalisation** (the paper describes none) and the input
  stage's residual made by repeating the input channels 16 / in_channels times (the paper: one channel copied to
  16; needs 16 % in_channels == 0, i.e. 1, 2, 4, 8 or 16 inputs);
* ``"monai"``: ``monai.networks.nets.VNet`` itself (same module names, so a state dict loads into MONAI's VNet).
  MONAI follows the PyTorch port of Matt Macy rather than the paper's figure: 1, 2, 3, 2 convolutions down, 2, 2,
  1, 1 up, batch norm, ELU, dropout 0.5, a 5x5x5 conv before the 1x1 output — hence its 45.6M parameters against
  the paper layout's 65M at 16 base channels (the difference is the number of 5x5x5 convolutions at 128 and 256
  channels, not the normalisation).

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``; each axis of ``S`` a multiple of 16 (depth 4).

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("vnet", 3, in_channels=4, out_channels=3, base_channels=4, kernel_size=3)
    >>> net(torch.zeros(1, 4, 32, 16, 48)).shape
    torch.Size([1, 3, 32, 16, 48])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel
from medseg.models.blocks import act, choose, conv, conv_transpose, dropout, norm as make_norm
from medseg.models.registry import register

PAPER = "Milletari et al. 2016, V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation (3DV)"


class _ConvStack(nn.Module):
    """``n`` conv-norm-PReLU layers (the last activation applied after the residual sum)."""

    def __init__(self, dims: int, channels: int, n: int, kernel_size: int, norm: str):
        super().__init__()
        layers = []
        for i in range(n):
            layers += [conv(dims, channels, channels, kernel_size), make_norm(norm, dims, channels)]
            if i < n - 1:
                layers.append(act("prelu", channels))
        self.body = nn.Sequential(*layers)
        self.out_act = act("prelu", channels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.body(x) + residual)


class VNet(SegmentationModel):
    """V-Net. ``base_channels`` (16 in the paper) doubles per level; ``down_convs``/``up_convs`` per stage."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 16,
                 kernel_size: int = 5, down_convs: Sequence[int] = (1, 2, 3, 3), bottom_convs: int = 3,
                 up_convs: Sequence[int] = (3, 3, 2, 1), norm: str = "batch", dropout_prob: float = 0.0,
                 input_residual: str = "project"):
        super().__init__(spatial_dims, in_channels, out_channels)
        self.input_residual = choose(input_residual, ("project", "repeat"), "input_residual")
        if self.input_residual == "repeat" and base_channels % in_channels:
            raise MedsegError(f"vnet: the input residual repeats the {in_channels} input channels to {base_channels}, which "
                              f"needs base_channels % in_channels == 0; use input_residual='project' (the default layout) "
                              "or 1, 2, 4, 8 or 16 input channels")
        if len(down_convs) != len(up_convs) or len(down_convs) < 1:
            raise MedsegError(f"vnet: down_convs {list(down_convs)} and up_convs {list(up_convs)} need the same length")
        if kernel_size % 2 == 0:
            raise MedsegError(f"vnet: kernel_size must be odd, got {kernel_size}")
        dims, depth = spatial_dims, len(down_convs)
        ch = [base_channels * 2 ** i for i in range(depth + 1)]
        self.set_size_rule(2 ** depth, f"depth {depth}")
        # Input stage: first conv maps any number of channels; the residual is a 1x1 projection of the input.
        self.in_conv = nn.Sequential(conv(dims, in_channels, ch[0], kernel_size), make_norm(norm, dims, ch[0]), act("prelu", ch[0]))
        self.in_proj = conv(dims, in_channels, ch[0], 1, bias=False) if self.input_residual == "project" else None
        self.in_stack = _ConvStack(dims, ch[0], down_convs[0] - 1, kernel_size, norm) if down_convs[0] > 1 else None
        self.downs = nn.ModuleList()
        self.down_stacks = nn.ModuleList()
        stage_convs = list(down_convs[1:]) + [bottom_convs]
        for i in range(depth):
            self.downs.append(nn.Sequential(conv(dims, ch[i], ch[i + 1], 2, stride=2), make_norm(norm, dims, ch[i + 1]),
                                            act("prelu", ch[i + 1]), dropout(dims, dropout_prob)))
            self.down_stacks.append(_ConvStack(dims, ch[i + 1], stage_convs[i], kernel_size, norm))
        self.ups = nn.ModuleList()
        self.up_stacks = nn.ModuleList()
        width = ch[depth]
        for k, i in enumerate(reversed(range(depth))):
            # up-sample `width` -> ch[i], concatenate the skip (ch[i]): the stage works at 2 * ch[i] channels
            self.ups.append(nn.Sequential(conv_transpose(dims, width, ch[i], 2, 2), make_norm(norm, dims, ch[i]),
                                          act("prelu", ch[i])))
            width = 2 * ch[i]
            self.up_stacks.append(_ConvStack(dims, width, up_convs[k], kernel_size, norm))
        self.head = conv(dims, width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        residual = self.in_proj(x) if self.in_proj is not None else x.repeat(1, self.in_conv[0].out_channels // x.shape[1],
                                                                              *([1] * self.spatial_dims))
        y = self.in_conv(x) + residual
        if self.in_stack is not None:
            y = self.in_stack(y, y)
        skips = [y]
        for down, stack in zip(self.downs, self.down_stacks):
            y = down(y)
            y = stack(y, y)
            skips.append(y)
        y = skips.pop()
        for up, stack in zip(self.ups, self.up_stacks):
            cat = torch.cat([up(y), skips.pop()], 1)
            y = stack(cat, cat)
        return self.head(y)


def milletari2016(spatial_dims: int, in_channels: int, out_channels: int, base_channels: int = 16, kernel_size: int = 5,
                  down_convs: Sequence[int] = (1, 2, 3, 3), bottom_convs: int = 3, up_convs: Sequence[int] = (3, 3, 2, 1),
                  norm: str = "none", dropout_prob: float = 0.0) -> VNet:
    """The paper's V-Net: no normalisation, input residual by channel repetition (see the module docstring)."""
    return VNet(spatial_dims, in_channels, out_channels, base_channels, kernel_size, down_convs, bottom_convs, up_convs,
                norm, dropout_prob, input_residual="repeat")


class MonaiVNet(SegmentationModel):
    """``monai.networks.nets.VNet`` itself (``vnet(preset="monai")``): MONAI's modules under MONAI's names
    (``in_tr``, ``down_tr32`` ... ``out_tr``) and MONAI's forward; arguments as MONAI's."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act=("elu", {"inplace": True}),
                 dropout_prob_down: float | None = 0.5, dropout_prob_up=(0.5, 0.5), dropout_dim: int = 3, bias: bool = False):
        from monai.networks.nets import VNet as _MonaiVNet

        super().__init__(spatial_dims, in_channels, out_channels)
        if 16 % in_channels:
            raise MedsegError(f"vnet (monai): MONAI's VNet repeats the input channels to 16, so in_channels must divide 16, "
                              f"got {in_channels}; use the default vnet (1x1 projection of the input)")
        self.set_size_rule(16, "depth 4")
        net = _MonaiVNet(spatial_dims, in_channels, out_channels, act=act, dropout_prob_down=dropout_prob_down,
                         dropout_prob_up=tuple(dropout_prob_up), dropout_dim=dropout_dim, bias=bias)
        for name, child in net.named_children():
            self.add_module(name, child)
        self._monai_forward = _MonaiVNet.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._monai_forward(self, x)


VNET_PRESETS = {"milletari2016": milletari2016, "monai": MonaiVNet}


@register("vnet", (2, 3), PAPER, test_kwargs={"base_channels": 4, "kernel_size": 3},
          test_variants=({}, {"preset": "milletari2016"}))
def vnet(spatial_dims: int, in_channels: int, out_channels: int, preset: str | None = None, **kwargs) -> nn.Module:
    """V-Net; ``preset`` "milletari2016" (the paper) or "monai" (MONAI's VNet) instead of the default layout."""
    if preset is not None:
        from medseg.models.unet import build_preset

        return build_preset("vnet", VNET_PRESETS, preset, spatial_dims, in_channels, out_channels, kwargs)
    return VNet(spatial_dims, in_channels, out_channels, **kwargs)
