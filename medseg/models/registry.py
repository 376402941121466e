"""The model registry: names, supported dimensions, paper references, and rebuildable configs.

Every model is registered once with :func:`register`; :func:`create_model` builds it by name and records the
arguments on the instance so that :func:`model_config` / :func:`build_from_config` can rebuild it later from
plain data (checkpoints store names and arguments, never import paths).

Example:
    >>> from medseg.models import create_model, model_config, build_from_config
    >>> net = create_model("unet", spatial_dims=3, in_channels=4, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    >>> cfg = model_config(net)
    >>> cfg["name"], cfg["kwargs"]["channels"]
    ('unet', [4, 8, 16])
    >>> twin = build_from_config(cfg)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from medseg.errors import MedsegError, check_choice

_CONFIG_ATTR = "_medseg_config"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    ``test_kwargs`` make the model tiny for the contract tests; ``test_variants`` are extra keyword sets tested
    on top of them (e.g. ``{"deep_supervision": True}``), so every mode of a registered model is exercised.
    """

    name: str
    factory: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    paper: str
    test_kwargs: Mapping[str, Any] = field(default_factory=dict)
    test_variants: tuple[Mapping[str, Any], ...] = ({},)


MODELS: dict[str, ModelEntry] = {}


def register(name: str, spatial_dims: tuple[int, ...] = (2, 3), paper: str = "",
             test_kwargs: Mapping[str, Any] | None = None,
             test_variants: tuple[Mapping[str, Any], ...] = ({},)) -> Callable:
    """Class/function decorator adding a model factory ``f(spatial_dims, in_channels, out_channels, **kwargs)``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, factory, tuple(spatial_dims), paper, dict(test_kwargs or {}), tuple(test_variants))
        return factory

    return deco


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises :class:`MedsegError` with "did you mean"."""
    return MODELS[check_choice(name, list_models(), "model")]


def _plain(value: Any) -> Any:
    """Tuples become lists so that a config survives JSON/YAML unchanged."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def create_model(name: str, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        spatial_dims: 2 or 3, and supported by the model.
        in_channels / out_channels: image channels (modalities) and output channels (classes or regions).
        kwargs: model-specific arguments (see ``docs/models.md``); unknown ones raise ``TypeError``.

    Returns:
        an ``nn.Module`` whose ``forward(x: (B, in_channels, *spatial))`` returns ``(B, out_channels, *spatial)``.
    """
    entry = get_entry(name)
    if spatial_dims not in entry.spatial_dims:
        dims = " or ".join(str(d) for d in entry.spatial_dims)
        raise MedsegError(f"model {name!r} does not support spatial_dims={spatial_dims!r}; use spatial_dims={dims}")
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or value < 1:
            raise MedsegError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    model = entry.factory(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    cfg = {"name": name, "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
           "kwargs": _plain(copy.deepcopy(kwargs))}
    object.__setattr__(model, _CONFIG_ATTR, cfg)
    if not getattr(model, "model_name", None):
        object.__setattr__(model, "model_name", name)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_config(model: nn.Module) -> dict[str, Any]:
    """``{"name", "spatial_dims", "in_channels", "out_channels", "kwargs"}`` of a model made by :func:`create_model`."""
    cfg = getattr(unwrap(model), _CONFIG_ATTR, None)
    if cfg is None:
        raise MedsegError(f"{type(model).__name__} was not built by medseg.models.create_model, so it has no config; "
                          "build models with create_model(name, ...)")
    return copy.deepcopy(cfg)


def build_from_config(cfg: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model (random weights) from :func:`model_config` output; load the ``state_dict`` afterwards."""
    missing = [k for k in ("name", "spatial_dims", "in_channels", "out_channels") if k not in cfg]
    if missing:
        raise MedsegError(f"model config lacks {', '.join(missing)}; expected keys name, spatial_dims, in_channels, "
                          f"out_channels, kwargs (got {sorted(cfg)})")
    return create_model(cfg["name"], spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
                        out_channels=int(cfg["out_channels"]), **dict(cfg.get("kwargs") or {}))
