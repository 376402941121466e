"""SegResNet and SegResNet-VAE (Myronenko 2018), any dimension.

``segresnet`` wraps MONAI's ``SegResNet`` (ResNet-style encoder with group norm, light decoder).
``segresnet_vae`` is our own model with the paper's VAE branch, built from MONAI's ``ResBlock``:

* encoder: initial conv to ``init_filters``; stages with ``blocks_down`` (1, 2, 2, 4) residual blocks, a
  strided 3x3 conv doubling the channels between stages (total stride 8);
* decoder: per stage 1x1 conv halving channels, up-sampling, sum with the encoder skip, ``blocks_up`` blocks;
* VAE branch (training only): GN-ReLU-conv (16 ch, stride 2) of the deepest features, flattened to a dense
  layer giving mean and log-variance of a 128-d latent; a sample is decoded by a dense layer, 1x1 conv and
  up-sampling stages without skips into a reconstruction of the input.

``forward(x)`` returns only the segmentation ``(B, out_channels, *S)``; the VAE branch is skipped.
``forward_train(x)`` returns ``TrainOutput(seg, extra_loss=vae_loss)`` with ``vae_loss = vae_l2_weight * mean((recon - x)^2)
+ vae_kl_weight * KL`` (weights 0.1 and 0.1 in the paper) and, by ``kl_normalization``:

* ``"latent"`` (default, the former behaviour): ``KL = mean over the latent dimensions of (mu^2 + sigma^2 - log sigma^2 - 1)``;
* ``"voxels"`` (the paper: "N is the total number of image voxels"): ``KL = sum over the latent dimensions / N``
  with ``N`` the input's voxels per sample (160·192·128 = 3,932,160 for the paper's crop, so ~3·10^4 times weaker
  than "latent" with 128 latent dimensions). Both are averaged over the batch.

``preset="myronenko2018"`` is the paper's network and regulariser: 32 initial filters, blocks 1, 2, 2, 4 / 1, 1, 1,
group norm (8 groups), spatial dropout 0.2 after the initial convolution, linear up-sampling, a plain 1x1x1 output
convolution (no norm/ReLU before it), a 128-d latent, ``kl_normalization="voxels"``, weights 0.1 / 0.1, and the VAE
input size set by ``medseg train`` to ``sampling.patch_size`` (outside a pipeline: ``vae_input_size`` or the paper's
160x192x128); with ``loss.name: auto`` the pipeline's loss becomes ``dice_squared`` (the paper's soft Dice with
squared terms in the denominator). Remaining differences: the encoder predicts the log-variance (the paper: the
standard deviation), clamped to ±20; L2 is the mean squared error per voxel (the paper writes ||I - I_pred||²₂; a
sum over 4·160·192·128 voxels would outweigh the Dice term ~10^7 times, and MONAI uses the mean too).

Any input size the encoder accepts (multiples of 8) works with the VAE: the paper flattens a fixed
``16 x S/16`` map, so its dense layers are sized for ``vae_input_size`` (default 160x192x128, the paper's crop);
at another size the 16-channel map is adaptively average-pooled to ``vae_input_size / 16`` before the dense
layer, and the decoded map is resized to the encoder's grid. At ``vae_input_size`` this is exactly the paper.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("segresnet_vae", 3, 2, 3, init_filters=8, vae_input_size=(32, 32, 32))
    >>> x = torch.randn(1, 2, 32, 24, 16)
    >>> out = net.forward_train(x)
    >>> out.seg.shape, out.extra_loss.ndim
    (torch.Size([1, 3, 32, 24, 16]), 0)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import SegResNet as _MonaiSegResNet

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput, as_tuple
from medseg.models.blocks import Upsample, adaptive_avg_pool, choose, conv, dropout, interpolate, norm as make_norm
from medseg.models.registry import register

PAPER = "Myronenko 2018, 3D MRI brain tumor segmentation using autoencoder regularization (BrainLes, MICCAI)"
PAPER_VAE_SIZE = (160, 192, 128)


class SegResNet(SegmentationModel):
    """MONAI SegResNet behind the common interface (input-size check, one tensor out)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_filters: int = 32,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
                 num_groups: int = 8, dropout_prob: Optional[float] = None, upsample: str = "interp"):
        super().__init__(spatial_dims, in_channels, out_channels)
        mode = {"interp": "nontrainable", "deconv": "deconv", "nontrainable": "nontrainable"}.get(upsample)
        if mode is None:
            raise MedsegError(f"segresnet: upsample={upsample!r} is not one of interp, deconv")
        self.set_size_rule(2 ** (len(blocks_down) - 1), f"{len(blocks_down) - 1} down-samplings")
        self.net = _MonaiSegResNet(spatial_dims, init_filters, in_channels, out_channels, dropout_prob,
                                   norm=("GROUP", {"num_groups": min(num_groups, init_filters)}),
                                   blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), upsample_mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(x)


def _res_stage(dims: int, channels: int, n: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(dims, channels, norm=("GROUP", {"num_groups": min(groups, channels)})) for _ in range(n)])


class _Decoder(nn.Module):
    """Stages of 1x1 conv (halving channels), x2 up-sampling, (+ skip), residual blocks."""

    def __init__(self, dims: int, top: int, blocks_up: Sequence[int], groups: int, upsample: str):
        super().__init__()
        self.ups = nn.ModuleList()
        self.stages = nn.ModuleList()
        ch = top
        for n in blocks_up:
            self.ups.append(Upsample(dims, ch, ch // 2, 2, upsample))
            ch //= 2
            self.stages.append(_res_stage(dims, ch, n, groups))
        self.out_channels = ch

    def forward(self, x: torch.Tensor, skips: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        for i, (up, stage) in enumerate(zip(self.ups, self.stages)):
            x = up(x)
            if skips is not None:
                x = x + skips[-(i + 1)]
            x = stage(x)
        return x


class SegResNetVAE(SegmentationModel):
    """SegResNet with the VAE regulariser. See the module docstring for shapes and the loss."""

    unused_in_forward = ("vae.",)

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_filters: int = 32,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1), num_groups: int = 8,
                 upsample: str = "interp", vae_input_size: Optional[Sequence[int]] = None, latent_dim: int = 128,
                 vae_l2_weight: float = 0.1, vae_kl_weight: float = 0.1, kl_normalization: str = "latent",
                 dropout_prob: float = 0.0, head_norm: bool = True):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims, f = spatial_dims, init_filters
        if isinstance(vae_input_size, str):
            raise MedsegError(f"segresnet_vae: vae_input_size={vae_input_size!r} is filled in by 'medseg train' from "
                              "sampling.patch_size; outside a pipeline give the size, e.g. vae_input_size=(160, 192, 128)")
        self.kl_normalization = choose(kl_normalization, ("latent", "voxels"), "kl_normalization")
        if len(blocks_up) != len(blocks_down) - 1:
            raise MedsegError(f"segresnet_vae: blocks_up {list(blocks_up)} needs len(blocks_down) - 1 entries")
        depth = len(blocks_down) - 1
        self.set_size_rule(2 ** depth, f"{depth} down-samplings")
        self.vae_l2_weight, self.vae_kl_weight = float(vae_l2_weight), float(vae_kl_weight)
        self.stem = conv(dims, in_channels, f, 3)
        self.stem_dropout = dropout(dims, float(dropout_prob))  # spatial (channel) dropout, 0.2 in the paper
        self.down = nn.ModuleList()
        for i, n in enumerate(blocks_down):
            ch = f * 2 ** i
            step = conv(dims, ch // 2, ch, 3, stride=2) if i else nn.Identity()
            self.down.append(nn.Sequential(step, _res_stage(dims, ch, n, num_groups)))
        top = f * 2 ** depth
        self.decoder = _Decoder(dims, top, blocks_up, num_groups, upsample)
        self.head = (nn.Sequential(make_norm("group", dims, f, num_groups), nn.ReLU(inplace=True), conv(dims, f, out_channels, 1))
                     if head_norm else nn.Sequential(conv(dims, f, out_channels, 1)))
        size = as_tuple(vae_input_size or PAPER_VAE_SIZE[:dims], dims, "vae_input_size")
        self.vae_grid = tuple(max(1, s // 2 ** (depth + 1)) for s in size)
        self.latent_dim = latent_dim
        flat = 16 * math.prod(self.vae_grid)
        self.vae = nn.ModuleDict({
            "reduce": nn.Sequential(make_norm("group", dims, top, num_groups), nn.ReLU(inplace=True), conv(dims, top, 16, 3, stride=2)),
            "pool": adaptive_avg_pool(dims, self.vae_grid),
            "encode": nn.Linear(flat, 2 * latent_dim),
            "decode": nn.Linear(latent_dim, flat),
            "expand": nn.Sequential(nn.ReLU(inplace=True), conv(dims, 16, top, 1)),
            "up": _Decoder(dims, top, [1] * depth, num_groups, upsample),
            "out": conv(dims, f, in_channels, 1),
        })

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_input(x)
        y = self.stem_dropout(self.stem(x))
        skips = []
        for stage in self.down:
            y = stage(y)
            skips.append(y)
        return skips.pop(), skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, out_channels, *S)``."""
        deep, skips = self._encode(x)
        return self.head(self.decoder(deep, skips))

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Segmentation logits and the VAE regulariser as ``extra_loss``; the latent is sampled in training, its
        mean in eval."""
        deep, skips = self._encode(x)
        seg = self.head(self.decoder(deep, skips))
        recon, mu, logvar = self._vae(deep)
        return TrainOutput(seg, (), self.vae_loss_terms(recon, x, mu, logvar))

    def _vae(self, deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.vae
        h = v["pool"](v["reduce"](deep)).flatten(1)
        mu, logvar = v["encode"](h).chunk(2, dim=1)
        logvar = logvar.clamp(-20.0, 20.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        g = v["decode"](z).view(z.shape[0], 16, *self.vae_grid)
        g = interpolate(v["expand"](g), deep.shape[2:])
        return v["out"](v["up"](g)), mu, logvar

    def vae_loss_terms(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        l2 = (recon.float() - x.float()).pow(2).mean()
        terms = mu.float().pow(2) + logvar.float().exp() - logvar.float() - 1
        if self.kl_normalization == "voxels":  # the paper: divided by N, the number of image voxels
            kl = terms.sum(1).mean() / math.prod(x.shape[2:])
        else:
            kl = terms.mean()
        return self.vae_l2_weight * l2 + self.vae_kl_weight * kl

    def vae_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE regulariser alone (scalar)."""
        return self.forward_train(x).extra_loss


@register("segresnet", (2, 3), PAPER + " (without the VAE branch)", test_kwargs={"init_filters": 8})
def segresnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> SegResNet:
    return SegResNet(spatial_dims, in_channels, out_channels, **kwargs)


def myronenko2018(spatial_dims: int, in_channels: int, out_channels: int, init_filters: int = 32,
                  vae_input_size: Optional[Sequence[int]] = None) -> SegResNetVAE:
    """The paper's SegResNet-VAE (see the module docstring); ``vae_input_size`` defaults to the paper's crop."""
    return SegResNetVAE(spatial_dims, in_channels, out_channels, init_filters=init_filters, blocks_down=(1, 2, 2, 4),
                        blocks_up=(1, 1, 1), num_groups=8, upsample="interp", vae_input_size=vae_input_size,
                        latent_dim=128, vae_l2_weight=0.1, vae_kl_weight=0.1, kl_normalization="voxels",
                        dropout_prob=0.2, head_norm=False)


SEGRESNET_VAE_PRESETS = {"myronenko2018": myronenko2018}


@register("segresnet_vae", (2, 3), PAPER, test_kwargs={"init_filters": 8, "vae_input_size": 32},
          test_variants=({"latent_dim": 8}, {"preset": "myronenko2018"}),
          patch_size_kwarg="vae_input_size", preset_losses={"myronenko2018": "dice_squared"})
def segresnet_vae(spatial_dims: int, in_channels: int, out_channels: int, preset: Optional[str] = None,
                  **kwargs) -> SegResNetVAE:
    """SegResNet-VAE; ``preset="myronenko2018"`` for the paper's settings."""
    if preset is not None:
        from medseg.models.unet import build_preset

        return build_preset("segresnet_vae", SEGRESNET_VAE_PRESETS, preset, spatial_dims, in_channels, out_channels, kwargs)
    return SegResNetVAE(spatial_dims, in_channels, out_channels, **kwargs)
