"""The model side of a training step: building the model, its loss terms, DDP wrapping.

``forward`` of every registered model returns one tensor. Extra training terms are reached here only:
``segresnet_vae`` gives its VAE regulariser through ``forward_with_vae_loss``, models with deep supervision
expose their auxiliary outputs as ``aux_outputs`` after a forward in training mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from medseg.errors import MedsegError
from medseg.training.config import Pipeline
from medseg.training.distributed import DistInfo


@dataclass
class ModelStep:
    model: nn.Module  # possibly DDP-wrapped
    bare_model: nn.Module
    config: dict
    vae_weight: float
    deep_supervision: bool

    @classmethod
    def build(cls, p: Pipeline, in_channels: int, out_channels: int, device: torch.device) -> "ModelStep":
        from medseg.models import create_model, model_config

        kwargs = dict(p.model.kwargs)
        if p.loss.deep_supervision:
            kwargs.setdefault("deep_supervision", True)
        try:
            model = create_model(p.model.name, spatial_dims=p.model.spatial_dims, in_channels=in_channels,
                                 out_channels=out_channels, **kwargs)
        except TypeError as err:
            raise MedsegError(f"model.kwargs: {err}; see 'medseg models' and docs/models.md for the arguments of {p.model.name}") from None
        if p.loss.deep_supervision and not hasattr(model, "aux_outputs"):
            raise MedsegError(f"loss.deep_supervision: model {p.model.name} has no deep supervision; set it to false or use unetpp/dynunet")
        model = model.to(device)
        return cls(model, model, model_config(model), p.loss.vae_weight, p.loss.deep_supervision)

    def check_size(self, size: tuple[int, ...], key: str) -> None:
        from medseg.models import check_input_size

        try:
            check_input_size(self.bare_model, tuple(size))
        except MedsegError as err:
            raise MedsegError(f"{key}: {err}") from None

    def wrap_ddp(self, info: DistInfo) -> None:
        if info.enabled:
            ids = [info.local_rank] if next(self.bare_model.parameters()).is_cuda else None
            self.model = nn.parallel.DistributedDataParallel(self.bare_model, device_ids=ids,
                                                             find_unused_parameters=self.deep_supervision)

    def loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        """Segmentation loss (+ deep supervision) (+ weighted VAE regulariser) for a batch."""
        if hasattr(self.bare_model, "forward_with_vae_loss"):
            if isinstance(self.model, nn.parallel.DistributedDataParallel):
                seg, vae = self.model(x, return_vae_loss=True)
            else:
                seg, vae = self.bare_model.forward_with_vae_loss(x)
            return loss_fn(seg, y) + self.vae_weight * vae
        seg = self.model(x)
        if self.deep_supervision:
            return loss_fn([seg, *self.bare_model.aux_outputs], y)
        return loss_fn(seg, y)
