"""DynUNet: the nnU-Net topology (Isensee 2021) with per-axis kernels and strides (MONAI ``DynUNet``).

The wrapper makes ``forward`` return one tensor in every mode. With ``deep_supervision=True``,
``forward_train`` in training mode also returns the ``deep_supr_num`` auxiliary logits (already resized by MONAI
to the input size, highest resolution first).

Defaults follow nnU-Net's 3D full-resolution plan for a 128^3 patch: 6 levels, 3x3x3 kernels, first stride 1
then 2, filters 32, 64, 128, 256, 320, 320.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``; each axis a multiple of the product of the
strides on that axis (32 by default).

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("dynunet", 3, 2, 3, filters=(4, 8, 16), strides=(1, 2, (2, 2, 1)), deep_supervision=True)
    >>> net.size_divisor
    (4, 4, 2)
    >>> _ = net.train()
    >>> out = net.forward_train(torch.zeros(1, 2, 16, 12, 6))
    >>> out.seg.shape, len(out.aux)
    (torch.Size([1, 3, 16, 12, 6]), 1)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from monai.networks.nets import DynUNet as _MonaiDynUNet

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput, as_tuple, stride_product
from medseg.models.blocks import choose
from medseg.models.registry import register

PAPER = ("Isensee et al. 2021, nnU-Net: a self-configuring method for deep learning-based biomedical image "
         "segmentation (Nature Methods)")


class DynUNet(SegmentationModel):
    """Args: ``filters`` per level (the width; defaults to 32 doubling, capped at 320 in 3D / 512 in 2D),
    ``strides`` per level (first usually 1), ``kernel_size`` per level (int or per-axis; default 3 everywhere),
    ``norm``, ``res_block`` (residual blocks), ``deep_supervision`` and ``deep_supr_num``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, filters: Optional[Sequence[int]] = None,
                 strides: Sequence = (1, 2, 2, 2, 2, 2), kernel_size: Optional[Sequence] = None, norm: str = "instance",
                 res_block: bool = False, deep_supervision: bool = False, deep_supr_num: int = 1):
        super().__init__(spatial_dims, in_channels, out_channels)
        n = len(strides)
        strides = [as_tuple(s, spatial_dims, "stride") for s in strides]
        kernels = [as_tuple(k, spatial_dims, "kernel_size") for k in (kernel_size or [3] * n)]
        cap = 320 if spatial_dims == 3 else 512
        filters = [int(f) for f in filters] if filters is not None else [min(32 * 2 ** i, cap) for i in range(n)]
        if len(kernels) != n or len(filters) != n or n < 2:
            raise MedsegError(f"dynunet: strides ({n}), kernel_size ({len(kernels)}) and filters ({len(filters)}) "
                              "need one entry per level, at least 2 levels")
        if deep_supervision and not 1 <= deep_supr_num <= n - 2:
            raise MedsegError(f"dynunet: deep_supr_num must be between 1 and {n - 2} for {n} levels, got {deep_supr_num}")
        norm = choose(norm, ("instance", "batch", "group"), "norm")
        norm_arg = {"instance": ("INSTANCE", {"affine": True}), "batch": "BATCH", "group": ("GROUP", {"num_groups": 8})}[norm]
        self.set_size_rule(stride_product(strides, spatial_dims), f"{n} levels")
        self.deep_supervision = bool(deep_supervision)
        self.net = _MonaiDynUNet(spatial_dims, in_channels, out_channels, kernels, strides, strides[1:], filters=filters,
                                 norm_name=norm_arg, deep_supervision=self.deep_supervision, deep_supr_num=deep_supr_num,
                                 res_block=res_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x).seg

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Main logits and, with deep supervision in training mode, the auxiliary heads (resized to the input)."""
        self.check_input(x)
        out = self.net(x)
        if self.training and self.deep_supervision:  # MONAI's DynUNet stacks the heads on axis 1 in training mode
            main, *aux = out.unbind(1)
            return TrainOutput(main, tuple(aux))
        return TrainOutput(out)


@register("dynunet", (2, 3), PAPER, test_kwargs={"filters": (4, 8, 16, 16), "strides": (1, 2, 2, 2)},
          test_variants=({}, {"deep_supervision": True, "deep_supr_num": 2, "res_block": True}))
def dynunet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> DynUNet:
    return DynUNet(spatial_dims, in_channels, out_channels, **kwargs)
