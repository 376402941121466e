"""U-Net (Çiçek 2016 style) and Attention U-Net (Oktay 2018), any dimension.

``unet`` has three layouts (``preset``):

* ``None`` (default, unchanged): the layout described below (strided convolutions, residual units, instance norm; the
  first level runs at full resolution);
* ``"cicek2016"``: the 3D U-Net of Çiçek et al. 2016 layer by layer — per level two 3x3x3 conv-BN-ReLU, the first
  giving half the level's channels ("doubling before max-pooling": 32→64, 64→128, 128→256, 256→512), 2x2x2
  max-pooling, 2x2x2 stride-2 up-convolutions keeping the channels (512→512), concatenation, two conv-BN-ReLU,
  1x1x1 output conv; 19,069,955 parameters for 3 inputs and 3 labels as in the paper. Difference: "same" padding
  (the paper uses unpadded convolutions, 132x132x116 in → 44x44x28 out) so that outputs keep the input size;
* ``"monai"``: exactly ``monai.networks.nets.UNet`` (its modules, under the same ``model.*`` weight names, so a
  state dict loads into MONAI's UNet and gives the same output) with the size check of medseg models; arguments as
  MONAI's (``channels``, ``strides``, ``kernel_size``, ``up_kernel_size``, ``num_res_units``, ``act``, ``norm``,
  ``dropout``, ``bias``, ``adn_ordering``), ``channels``/``strides``/``num_res_units`` defaulting to medseg's
  (16..256, 2s, 2).

Encoder level ``i`` turns ``channels[i-1]`` into ``channels[i]`` at stride ``strides[i-1]`` (strided first
convolution, as MONAI's UNet); each level is two conv-norm-act layers, or a MONAI ``ResidualUnit`` with
``num_res_units`` sub-units. The decoder up-samples (``upsample``), concatenates the skip (weighted by an
attention gate in ``attention_unet``) and applies the same block. A 1x1 convolution gives the logits. With
``deep_supervision=True`` a 1x1 head on each decoder output from half resolution down to the second coarsest gives
auxiliary logits at that output's resolution, finest first (nnU-Net's deep supervision: every decoder resolution
but the coarsest; ``forward_train`` only, ``forward`` is unchanged).

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

import inspect

import torch
import torch.nn as nn
from monai.networks.blocks import ResidualUnit

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput, as_tuple, stride_product
from monai.networks.layers.factories import Norm

from medseg.models.blocks import AttentionGate, ConvNormAct, Upsample, choose, conv, conv_transpose, max_pool
from medseg.models.blocks import norm as make_norm
from medseg.models.registry import register

PAPER_UNET = "Çiçek et al. 2016, 3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation (MICCAI)"
PAPER_ATTENTION = "Oktay et al. 2018, Attention U-Net: Learning Where to Look for the Pancreas (MIDL)"


def _level_block(dims: int, cin: int, cout: int, stride, num_res_units: int, norm: str, dropout: float) -> nn.Module:
    if num_res_units > 0:
        norm_arg = ("group", {"num_groups": 8}) if norm == "group" else norm
        return ResidualUnit(dims, cin, cout, strides=stride, kernel_size=3, subunits=num_res_units, norm=norm_arg,
                            act="PRELU", dropout=dropout or None)
    def drop() -> list[nn.Module]:  # none at 0, so checkpoints without dropout keep their keys
        return [nn.Dropout(dropout)] if dropout else []

    return nn.Sequential(ConvNormAct(dims, cin, cout, 3, stride, norm=norm, act="leakyrelu"), *drop(),
                         ConvNormAct(dims, cout, cout, 3, 1, norm=norm, act="leakyrelu"), *drop())


class UNet(SegmentationModel):
    """U-Net; ``attention=True`` adds attention gates on the skips (Attention U-Net).

    Args:
        channels: features per level, e.g. ``(16, 32, 64, 128, 256)``; depth = ``len(channels) - 1``.
        strides: down-sampling per level (``len(channels) - 1`` entries, each an int or per-axis tuple).
        num_res_units: 0 for two plain convolutions per level, else residual units with this many sub-units.
        norm: "instance" | "batch" | "group". upsample: "deconv" | "deconv4" | "interp" ("nontrainable" = "interp").
        deep_supervision: auxiliary heads on the decoder outputs at levels ``1 .. depth - 2`` (none for depth < 3).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Optional[Sequence] = None,
                 num_res_units: int = 2, norm: str = "instance", upsample: str = "deconv", dropout: float = 0.0,
                 attention: bool = False, deep_supervision: bool = False):
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
        self.deep_supervision = bool(deep_supervision)
        if self.deep_supervision:  # heads of levels 1 .. depth-2, finest first; absent otherwise (checkpoints keep their keys)
            self.aux_heads = nn.ModuleList([conv(dims, channels[i], out_channels, 1) for i in range(1, len(strides) - 1)])
            self.unused_in_forward = ("aux_heads.",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._decode(x, keep=False)[-1])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Main logits, and with deep supervision the auxiliary logits of levels 1 .. depth-2 (finest first)."""
        outs = self._decode(x, keep=self.deep_supervision)
        if not self.deep_supervision:
            return TrainOutput(self.head(outs[-1]))
        levels = outs[-2:0:-1]  # decoder outputs at levels 1, 2, ..., depth - 2
        return TrainOutput(self.head(outs[-1]), tuple(h(o) for h, o in zip(self.aux_heads, levels)))

    def _decode(self, x: torch.Tensor, keep: bool) -> list[torch.Tensor]:
        """The decoder's outputs, coarsest (level depth-1) first, full resolution (level 0) last; only the last unless
        ``keep`` (inference holds no coarser output longer than it needs)."""
        self.check_input(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        outs = []
        for k, (up, merge) in enumerate(zip(self.up, self.merge)):
            skip = skips.pop()
            x = up(x)
            if len(self.gates):
                skip = self.gates[k](skip, x)
            x = merge(torch.cat([x, skip], 1))
            if keep:
                outs.append(x)
        return outs if keep else [x]


class CicekUNet(SegmentationModel):
    """3D U-Net of Çiçek et al. 2016 (``unet(preset="cicek2016")``), any dimension.

    Args:
        channels: output channels of each level, the last being the bottom (paper: 64, 128, 256, 512); the first
            convolution of a level gives half of them.
        strides: max-pooling per level (``len(channels) - 1`` entries, int or per-axis; paper: 2).
        norm: "batch" (paper), "instance", "group" or "none".

    Parameter count: the paper's 19,069,955 (3 inputs, 3 labels) is reproduced exactly when every 3x3x3 and the 1x1x1
    convolution has a bias, batch norm has no learned scale/shift (Caffe's ``BatchNorm`` layer without a ``Scale``
    layer, as in the authors' Caffe implementation) and the up-convolutions have no bias; the preset is built so.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (64, 128, 256, 512), strides: Optional[Sequence] = None, norm: str = "batch"):
        super().__init__(spatial_dims, in_channels, out_channels)
        ch = [int(c) for c in channels]
        strides = list(strides) if strides is not None else [2] * (len(ch) - 1)
        if len(ch) < 2 or len(strides) != len(ch) - 1 or any(c % 2 for c in ch):
            raise MedsegError(f"unet (cicek2016): channels {ch} needs at least 2 even entries and strides one fewer, got {strides}")
        norm = choose(norm, ("instance", "batch", "group", "none"), "norm")
        dims = spatial_dims
        self.strides = [as_tuple(s, dims, "stride") for s in strides]
        self.set_size_rule(stride_product(self.strides, dims), f"{len(strides)} poolings")
        self.down = nn.ModuleList()
        cin = in_channels
        def cbr(a: int, b: int) -> nn.Sequential:  # conv (with bias) - norm - ReLU
            n = (Norm[Norm.BATCH, dims](b, affine=False) if norm == "batch" else make_norm(norm, dims, b))
            return nn.Sequential(conv(dims, a, b, 3), n, nn.ReLU(inplace=True))

        for c in ch:
            self.down.append(nn.Sequential(cbr(cin, c // 2), cbr(c // 2, c)))
            cin = c
        self.pools = nn.ModuleList([max_pool(dims, s, s) for s in self.strides])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):
            self.up.append(conv_transpose(dims, ch[i + 1], ch[i + 1], self.strides[i], self.strides[i], bias=False))
            self.merge.append(nn.Sequential(cbr(ch[i + 1] + ch[i], ch[i]), cbr(ch[i], ch[i])))
        self.head = conv(dims, ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else self.pools[k - 1](x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


class MonaiUNet(SegmentationModel):
    """``monai.networks.nets.UNet`` itself (``unet(preset="monai")``): ``self.model`` is MONAI's ``model`` sequence,
    so ``state_dict()`` has MONAI's key names and loads into ``monai.networks.nets.UNet`` unchanged."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Optional[Sequence] = None,
                 kernel_size=3, up_kernel_size=3, num_res_units: int = 2, act="PRELU", norm="INSTANCE",
                 dropout: float = 0.0, bias: bool = True, adn_ordering: str = "NDA"):
        from monai.networks.nets import UNet as _MonaiUNet

        super().__init__(spatial_dims, in_channels, out_channels)
        strides = list(strides) if strides is not None else [2] * (len(channels) - 1)
        self.set_size_rule(stride_product(strides, spatial_dims), f"{len(strides)} strides")
        net = _MonaiUNet(spatial_dims, in_channels, out_channels, tuple(channels), tuple(strides), kernel_size,
                         up_kernel_size, num_res_units, act, norm, dropout, bias, adn_ordering)
        self.model = net.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.model(x)


UNET_PRESETS = {"cicek2016": CicekUNet, "monai": MonaiUNet}


def build_preset(model: str, presets: dict, preset: str, spatial_dims: int, in_channels: int, out_channels: int,
                 kwargs: dict) -> nn.Module:
    """``presets[preset](spatial_dims, in_channels, out_channels, **kwargs)`` with a message naming the arguments the
    preset takes when one is not."""
    preset = choose(preset, tuple(presets), f"{model} preset")
    cls = presets[preset]
    params = [p for p in inspect.signature(cls).parameters if p not in ("self", "spatial_dims", "in_channels", "out_channels")]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"{model} preset {preset!r} does not take {', '.join(unknown)}; it takes {', '.join(params)}")
    return cls(spatial_dims, in_channels, out_channels, **kwargs)


@register("unet", (2, 3), PAPER_UNET + "; default: strided residual variant, preset cicek2016: the paper, preset monai: MONAI's UNet",
          test_kwargs={"channels": (4, 8, 16), "strides": (2, 2)},
          test_variants=({"num_res_units": 1}, {"num_res_units": 0, "upsample": "interp", "norm": "batch"},
                         {"channels": (4, 8, 16, 32), "strides": (2, 2, 2), "num_res_units": 0, "deep_supervision": True},
                         {"preset": "cicek2016"}, {"preset": "monai", "num_res_units": 1}))
def unet(spatial_dims: int, in_channels: int, out_channels: int, preset: Optional[str] = None, **kwargs) -> nn.Module:
    """U-Net; ``preset`` "cicek2016" (the paper's layout) or "monai" (MONAI's UNet) instead of the default layout."""
    if preset is not None:
        return build_preset("unet", UNET_PRESETS, preset, spatial_dims, in_channels, out_channels, kwargs)
    return UNet(spatial_dims, in_channels, out_channels, **kwargs)


@register("attention_unet", (2, 3), PAPER_ATTENTION, test_kwargs={"channels": (4, 8, 16), "strides": (2, 2)})
def attention_unet(spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                   strides: Optional[Sequence] = None, num_res_units: int = 0, norm: str = "instance",
                   upsample: str = "deconv", dropout: float = 0.0, deep_supervision: bool = False) -> UNet:
    """Attention U-Net: U-Net with plain double-conv levels and an additive attention gate on every skip."""
    return UNet(spatial_dims, in_channels, out_channels, channels, strides, num_res_units, norm, upsample, dropout,
                attention=True, deep_supervision=deep_supervision)
