"""The model side of a training step: building the model, its loss terms, DDP wrapping.

Every model's training forward gives one :class:`medseg.models.TrainOutput` (segmentation logits, auxiliary
outputs for deep supervision, an extra loss such as the VAE regulariser); the step turns it into one loss. Under
DDP the wrapped module is :class:`TrainForward`, whose ``forward`` *is* the training forward, so DDP sees every
parameter the loss uses and nothing is stored on the model between calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.models import TrainOutput, forward_train
from medseg.training.config import Pipeline
from medseg.training.distributed import DistInfo


class TrainForward(nn.Module):
    """``forward(x)`` = ``forward_train(net, x)`` as a tuple (what DDP can wrap and traverse)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = forward_train(self.net, x)
        return out.seg, out.aux, out.extra_loss


@dataclass
class ModelStep:
    bare_model: nn.Module
    config: dict
    vae_weight: float
    deep_supervision: bool
    train_forward: nn.Module  # TrainForward, DDP-wrapped when distributed

    @classmethod
    def build(cls, p: Pipeline, in_channels: int, out_channels: int, device: torch.device) -> "ModelStep":
        from medseg.models import create_model, get_entry, model_config

        kwargs = dict(p.model.kwargs)
        if p.loss.deep_supervision:
            kwargs.setdefault("deep_supervision", True)
        size_kwarg = get_entry(p.model.name).patch_size_kwarg  # e.g. segresnet_vae's vae_input_size
        if size_kwarg and (kwargs.get(size_kwarg) == "patch" or (size_kwarg not in kwargs and kwargs.get("preset"))):
            kwargs[size_kwarg] = list(p.sampling.patch_size)  # recorded in the checkpoint's config as a size
        try:
            model = create_model(p.model.name, spatial_dims=p.model.spatial_dims, in_channels=in_channels,
                                 out_channels=out_channels, **kwargs)
        except TypeError as err:
            raise MedsegError(f"model.kwargs: {err}; see 'medseg models' and docs/models.md for the arguments of {p.model.name}") from None
        if p.loss.deep_supervision and not getattr(model, "deep_supervision", False):
            raise MedsegError(f"loss.deep_supervision: model {p.model.name} has no deep supervision; set it to false or use "
                              "unetpp/dynunet/hrnet_ocr/danet")
        model = model.to(device)
        return cls(model, model_config(model), p.loss.vae_weight, p.loss.deep_supervision, TrainForward(model))

    def check_size(self, size: tuple[int, ...], key: str) -> None:
        from medseg.models import check_input_size

        try:
            check_input_size(self.bare_model, tuple(size))
        except MedsegError as err:
            raise MedsegError(f"{key}: {err}") from None

    def wrap_ddp(self, info: DistInfo) -> None:
        if info.enabled:
            ids = [info.local_rank] if next(self.bare_model.parameters()).is_cuda else None
            self.train_forward = nn.parallel.DistributedDataParallel(self.train_forward, device_ids=ids)

    def loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        """Segmentation loss (over the main and, with deep supervision, auxiliary outputs) + weighted extra loss."""
        out = TrainOutput(*self.train_forward(x))
        total = loss_fn([out.seg, *out.aux], y) if self.deep_supervision else loss_fn(out.seg, y)
        if out.extra_loss is not None:
            total = total + self.vae_weight * out.extra_loss
        return total
