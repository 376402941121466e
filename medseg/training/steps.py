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


class InstanceTrainForward(nn.Module):
    """``forward(x, instances)`` = the summed loss terms of an instance model (what DDP wraps for such models)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        terms = self.net.training_losses(x, instances)
        return torch.stack([t.float() for t in terms.values()]).sum()


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
                              "unet/attention_unet/unetpp/dynunet/hrnet_ocr/danet")
        instances = getattr(model, "task", "semantic") == "instances"
        if instances != (p.data.target == "instances"):
            raise MedsegError(f"data.target: {p.data.target} does not fit model {p.model.name}, "
                              + ("an instance model: set data.target: instances (labels are instance maps, one id per object)"
                                 if instances else "a semantic model: data.target instances needs an instance model (maskrcnn, yolact)"))
        if instances and out_channels != 2:
            raise MedsegError(f"data.label_scheme: instance models are trained here on instance maps of one kind of object, "
                              f"but the scheme has {out_channels - 1} foreground classes; use a one-class scheme such as "
                              "foreground (per-object classes are not read from the labels yet)")
        if p.model.init_weights:
            load_initial_weights(model, p.resolve(p.model.init_weights))
        model = model.to(device)
        forward = InstanceTrainForward(model) if instances else TrainForward(model)
        return cls(model, model_config(model), p.loss.vae_weight, p.loss.deep_supervision, forward)

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

    def loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module | None) -> torch.Tensor:
        """Segmentation loss (over the main and, with deep supervision, auxiliary outputs) + weighted extra loss;
        for an instance model, the sum of its own loss terms on the instance maps ``y``."""
        if isinstance(self.train_forward, InstanceTrainForward) or isinstance(getattr(self.train_forward, "module", None), InstanceTrainForward):
            return self.train_forward(x, y)
        out = TrainOutput(*self.train_forward(x))
        total = loss_fn([out.seg, *out.aux], y) if self.deep_supervision else loss_fn(out.seg, y)
        if out.extra_loss is not None:
            total = total + self.vae_weight * out.extra_loss
        return total


def load_initial_weights(model: nn.Module, path) -> None:
    """Start training from weights trained elsewhere (``model.init_weights``): a medseg checkpoint or a ``state_dict``
    file. Tensors whose name and shape match are loaded; the others keep their initialisation, and what was left out
    is printed. Nothing is downloaded: give a local file."""
    from pathlib import Path

    from medseg.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"model.init_weights: {path} not found; give a medseg checkpoint (RUN/checkpoints/last.pt) or a "
                          "file saved with torch.save(model.state_dict(), PATH)")
    try:
        blob = load_checkpoint(path, map_location="cpu")
    except MedsegError:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsegError(f"model.init_weights: {path} holds no state_dict (a dict of tensors); save one with "
                          "torch.save(model.state_dict(), PATH)")
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise MedsegError(f"model.init_weights: no tensor of {path} matches the model by name and shape (the file has "
                          f"{len(state)}, e.g. {next(iter(state), '')}); were they saved from this architecture?")
    model.load_state_dict(fits, strict=False)
    skipped = len(own) - len(fits)
    print(f"model.init_weights: {len(fits)} of {len(own)} tensors loaded from {path}" +
          (f"; {skipped} keep their initialisation" if skipped else ""))
