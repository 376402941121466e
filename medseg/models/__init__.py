"""Segmentation networks, one registry; every model takes ``spatial_dims`` (2 or 3).

Public API:
    create_model(name, spatial_dims, in_channels, out_channels, **kwargs) -> nn.Module
    list_models() -> list[str];  MODELS: dict[str, ModelEntry];  register(name, spatial_dims, paper)
    model_config(model) -> dict;  build_from_config(cfg) -> nn.Module
    check_input_size(model, spatial_shape);  valid_input_size(model_or_name, size) -> tuple[int, ...]

Conventions: ``forward(x: (B, in_channels, *S))`` returns ONE tensor ``(B, out_channels, *S)`` in every mode.
Training uses ``forward_train(x) -> TrainOutput(seg, aux, extra_loss)`` (:func:`forward_train` for any module):
models with deep supervision (``unetpp``, ``dynunet``, ``deep_supervision=True``) give their auxiliary logits in
``aux`` (finest first), ``segresnet_vae`` its VAE regulariser in ``extra_loss``. Nothing is stored on the module,
so forward passes are re-entrant. Presets reproduce papers (``unet(preset="cicek2016")``, ``vnet(preset=
"milletari2016")``, ``segresnet_vae(preset="myronenko2018")``, ``unetpp(preset="zhou2018")``) or MONAI's layout
(``preset="monai"``). Other people's models: ``monai:ClassName`` and :func:`load_model_module`. See ``docs/models.md``.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    >>> net(torch.zeros(1, 1, 32, 24)).shape
    torch.Size([1, 2, 32, 24])
"""
from __future__ import annotations

from medseg.models.base import SegmentationModel, TrainOutput, check_input_size, forward_train, valid_input_size
from medseg.models.registry import (MODELS, ModelEntry, build_from_config, create_model, get_entry, list_models,
                                    model_config, register)

# Importing the model modules fills the registry.
from medseg.models import (danet, deconvnet, deeplab, dynunet, fcn, hrnet, pspnet, refinenet, resunetpp,  # noqa: E402,F401  isort: skip
                           segnet, segresnet, unet, unetpp, vnet)
from medseg.models import instance  # noqa: E402,F401  (registers maskrcnn, yolact)
from medseg.models.registry import load_entry_points, load_model_module  # noqa: E402

__all__ = ["MODELS", "ModelEntry", "load_entry_points", "load_model_module", "SegmentationModel", "build_from_config", "check_input_size", "create_model",
           "get_entry", "list_models", "model_config", "register", "valid_input_size", "TrainOutput", "forward_train"]
