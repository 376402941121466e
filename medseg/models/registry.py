"""The model registry: names, supported dimensions, paper references, and rebuildable configs.

Every model is registered once with :func:`register`; :func:`create_model` builds it by name and records the
arguments on the instance so that :func:`model_config` / :func:`build_from_config` can rebuild it later from
plain data (checkpoints store names and arguments; for a model registered by a user's module, also that module's
path or dotted name, so that ``medseg predict`` can import it again).

Models from elsewhere:

* a user's module (``medseg train --model-module my_models.py``, ``model.module`` in a pipeline, or
  :func:`load_model_module`) that registers factories with :func:`register`; a factory returning a plain
  ``nn.Module`` is wrapped (:mod:`medseg.models.foreign`) with its declared or inferred input-size rule and output
  adapter;
* packages exposing an entry point in the group ``medseg.models`` (loaded on first look-up);
* MONAI networks by name: ``monai:DynUNet``, ``monai:SwinUNETR``, ``monai:UNETR``, any ``monai.networks.nets`` class.

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
import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch.nn as nn

from medseg.errors import MedsegError, check_choice

_CONFIG_ATTR = "_medseg_config"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    ``test_kwargs`` make the model tiny for the contract tests; ``test_variants`` are extra keyword sets tested
    on top of them (e.g. ``{"deep_supervision": True}``), so every mode of a registered model is exercised.

    For a factory that returns a plain ``nn.Module`` (not a :class:`~medseg.models.SegmentationModel`):
    ``size_divisor`` / ``min_size`` / ``max_size`` declare its input-size rule (inferred on the meta device when
    ``size_divisor`` is None) and ``output`` how to read its output (:data:`medseg.models.foreign.OUTPUTS`).
    ``task`` is ``"semantic"`` (a map of logits per class or region) or ``"instances"`` (a
    :class:`~medseg.models.instance.InstanceModel`: objects, trained on instance maps). ``patch_size_kwarg`` names an argument that the trainer fills with ``sampling.patch_size`` (when its value is
    ``"patch"``, or when it is absent and a preset is named); ``preset_losses`` maps a preset to the loss that
    ``loss.name: auto`` picks for it. ``source`` is the module that registered a user's model.
    """

    name: str
    factory: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    paper: str
    test_kwargs: Mapping[str, Any] = field(default_factory=dict)
    test_variants: tuple[Mapping[str, Any], ...] = ({},)
    size_divisor: Optional[int | Sequence[int]] = None
    min_size: Optional[int | Sequence[int]] = None
    max_size: Optional[int | Sequence[int]] = None
    output: str = "tensor"
    patch_size_kwarg: Optional[str] = None
    preset_losses: Mapping[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    task: str = "semantic"


MODELS: dict[str, ModelEntry] = {}
TASKS = ("semantic", "instances")
ENTRY_POINT_GROUP = "medseg.models"


def register(name: str, spatial_dims: tuple[int, ...] = (2, 3), paper: str = "",
             test_kwargs: Mapping[str, Any] | None = None,
             test_variants: tuple[Mapping[str, Any], ...] = ({},), *,
             size_divisor: Optional[int | Sequence[int]] = None, min_size: Optional[int | Sequence[int]] = None,
             max_size: Optional[int | Sequence[int]] = None, output: str = "tensor",
             patch_size_kwarg: Optional[str] = None, preset_losses: Mapping[str, str] | None = None,
             task: str = "semantic") -> Callable:
    """Class/function decorator adding a model factory ``f(spatial_dims, in_channels, out_channels, **kwargs)``.

    The factory may return a :class:`~medseg.models.SegmentationModel` (it then follows the model contract itself)
    or any ``nn.Module``: the latter is wrapped with the declared (or inferred) ``size_divisor``/``min_size``/
    ``max_size`` and the ``output`` adapter ("tensor", "seg_aux", "aux_seg", "seg_loss", "stacked", "key:NAME").
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if ":" in name:
            raise ValueError(f"model name {name!r}: ':' is reserved for 'monai:ClassName'")
        from medseg.models.foreign import check_output_spec

        check_output_spec(output)
        check_choice(task, TASKS, "task")
        MODELS[name] = ModelEntry(name, factory, tuple(spatial_dims), paper, dict(test_kwargs or {}), tuple(test_variants),
                                  size_divisor, min_size, max_size, output, patch_size_kwarg, dict(preset_losses or {}),
                                  task=task)
        return factory

    return deco


_ENTRY_POINTS_LOADED = False


def load_entry_points() -> list[str]:
    """Import the ``medseg.models`` entry points of installed packages (once); names of the models they added.

    An entry point names a module whose import registers models (``my_pkg.models``) or a function to call
    (``my_pkg.models:register_all``)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    before = set(MODELS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type(sys)):
                obj()
        except Exception as err:  # a broken plug-in must not break the built-in models
            from medseg.data.checks import warn

            warn([f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP}) failed to load: {type(err).__name__}: {err}"])
            continue
        for n in set(MODELS) - before:
            MODELS[n] = dataclasses.replace(MODELS[n], source=ep.module)
        before = set(MODELS)
    return sorted(set(MODELS) - before)


_LOADED_MODULES: dict[str, str] = {}  # module spec (resolved path or dotted name) -> module name in sys.modules


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def load_model_module(spec: str | Path) -> list[str]:
    """Import a user's module that registers models: a ``.py`` file path or a dotted module name (importable).

    Returns the names it registered. Each of its entries records the module (the file's absolute path or the dotted
    name) as ``source``; :func:`model_config` stores it, so :func:`build_from_config` (``medseg predict``) imports the
    module again. Loading the same module twice does nothing.
    """
    text = str(spec)
    key = str(Path(text).expanduser().resolve()) if _is_path(text) else text
    if key in _LOADED_MODULES:
        modname = _LOADED_MODULES[key]
        return sorted(n for n, e in MODELS.items() if e.source == key)
    before = dict(MODELS)
    try:
        if _is_path(text):
            path = Path(key)
            if not path.is_file():
                raise MedsegError(f"model module {text}: file not found; give the path of a .py file that registers models "
                                  "with @medseg.models.register(...), or an importable module name")
            modname = f"medseg_user_models.{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[modname] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(modname, None)
                raise
        else:
            modname = text
            importlib.import_module(text)
    except MedsegError:
        raise
    except Exception as err:
        for n in set(MODELS) - set(before):  # leave the registry as it was
            del MODELS[n]
        raise MedsegError(f"model module {text}: importing it failed ({type(err).__name__}: {err})") from None
    mine = [n for n, e in MODELS.items() if n not in before or getattr(e.factory, "__module__", None) == modname]
    if not mine:
        raise MedsegError(f"model module {text}: it registered no model; decorate a factory "
                          "f(spatial_dims, in_channels, out_channels, **kwargs) with @medseg.models.register('my_net')")
    for n in mine:
        MODELS[n] = dataclasses.replace(MODELS[n], source=key)
    _LOADED_MODULES[key] = modname
    return sorted(mine)


def list_models() -> list[str]:
    """Names of the registered models (built-in, user modules loaded, entry points), sorted. MONAI networks are
    reachable as ``monai:ClassName`` without being listed."""
    load_entry_points()
    return sorted(MODELS)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (``monai:ClassName`` for a MONAI network); an unknown name raises
    :class:`MedsegError` with "did you mean"."""
    if isinstance(name, str) and name.startswith("monai:"):
        from medseg.models.foreign import monai_entry

        return monai_entry(name)
    if name not in MODELS:
        load_entry_points()
    if name not in MODELS:
        try:
            check_choice(name, list_models(), "model")
        except MedsegError as err:
            raise MedsegError(f"{err}; a model of your own: register it in a module and pass --model-module FILE.py "
                              "(or model.module in the pipeline); a MONAI network: 'monai:ClassName'") from None
    return MODELS[name]


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
    from medseg.models.base import SegmentationModel

    if not isinstance(model, SegmentationModel):  # someone else's network: size rule and output declared or inferred
        from medseg.models.foreign import wrap

        model = wrap(model, name, spatial_dims, in_channels, out_channels, entry.size_divisor, entry.min_size,
                     entry.max_size, entry.output)
    cfg = {"name": name, "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
           "kwargs": _plain(copy.deepcopy(kwargs))}
    if entry.source:
        cfg["module"] = entry.source
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
    name = cfg["name"]
    if cfg.get("module") and not str(name).startswith("monai:") and name not in MODELS:
        try:
            load_model_module(cfg["module"])
        except MedsegError as err:
            raise MedsegError(f"model {name!r} was registered by the module {cfg['module']}, which cannot be loaded now "
                              f"({err}); pass its current location with --model-module FILE.py") from None
    return create_model(cfg["name"], spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
                        out_channels=int(cfg["out_channels"]), **dict(cfg.get("kwargs") or {}))
