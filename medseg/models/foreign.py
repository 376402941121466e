"""Other people's networks behind the model contract: MONAI networks by name and plain ``nn.Module`` factories.

A network that is not a :class:`~medseg.models.SegmentationModel` is wrapped in :class:`ForeignModel`, which

* declares its **input-size rule** (each axis a multiple of ``size_divisor``, at least ``min_size``, at most
  ``max_size`` for networks with a fixed input size); a rule that is not declared is inferred on the meta device
  (shapes only, no memory, no compute) by trying sizes ``d * (3, 5, 7)`` for ``d`` = 1, 2, 4, ... 128 — the
  smallest ``d`` whose outputs keep the input's size is the divisor;
* reads its **output** with a named adapter (:data:`OUTPUTS`); the output of a train-mode and an eval-mode forward
  is checked on the meta device when the model is built, so a tuple, list, dict or an extra axis is a clear error
  naming the adapters instead of a silent misuse in the loss;
* checks every input (:meth:`SegmentationModel.check_input`) like the built-in models.

``monai:ClassName`` builds ``monai.networks.nets.ClassName`` with ``spatial_dims``, ``in_channels`` and
``out_channels`` passed where the class takes them and the pipeline's ``model.kwargs`` as its arguments. For
``DynUNet``, ``UNet``, ``AttentionUnet``, ``BasicUNet``, ``BasicUNetPlusPlus``, ``SegResNet``, ``SegResNetVAE``,
``VNet``, ``SwinUNETR`` and ``UNETR`` the size rule and output adapter follow from the arguments (e.g. DynUNet: the
product of ``strides``, and ``stacked`` when ``deep_supervision``; UNETR: exactly ``img_size``); for other classes
they are inferred. Three extra keys in ``kwargs`` are medseg's, not MONAI's: ``size_divisor``, ``min_size``/
``max_size`` and ``output`` declare the rule and the adapter explicitly.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("monai:DynUNet", 3, 2, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
    ...                    filters=[4, 8, 16])
    >>> net.size_divisor
    (4, 4, 4)
    >>> net(torch.zeros(1, 2, 16, 12, 8)).shape
    torch.Size([1, 3, 16, 12, 8])
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError, suggest
from medseg.models.base import SegmentationModel, TrainOutput, as_tuple, stride_product

OUTPUTS = {
    "tensor": "one tensor (B, out_channels, *S)",
    "seg_aux": "a tuple/list (segmentation, auxiliary outputs...): the first is the segmentation, the others deep supervision",
    "aux_seg": "a tuple/list whose LAST item is the segmentation and the others deep supervision (MONAI BasicUNetPlusPlus)",
    "seg_loss": "a tuple (segmentation, loss term or None) such as MONAI SegResNetVAE's (seg, vae_loss): the term is added to the loss",
    "stacked": "a tensor (B, 1 + n, out_channels, *S) in training (MONAI DynUNet with deep_supervision): main + n auxiliary",
    "key:NAME": "a dict: the segmentation is the item NAME (e.g. key:out for torchvision-style {'out': ..., 'aux': ...})",
}
MEDSEG_KWARGS = ("size_divisor", "min_size", "max_size", "output")


def check_output_spec(output: str) -> str:
    if not isinstance(output, str) or not (output in OUTPUTS or (output.startswith("key:") and len(output) > 4)):
        raise MedsegError(f"output: {output!r} is not a known output adapter{suggest(output, OUTPUTS)}; choose one of "
                          + "; ".join(f"{k} = {v}" for k, v in OUTPUTS.items()))
    return output


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if out is None:
        return "None"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(_describe(o) for o in out)})"
    if isinstance(out, dict):
        return "a dict {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in out.items()) + "}"
    return f"a {type(out).__name__}"


def adapt_output(out: Any, output: str, x: torch.Tensor, out_channels: int, label: str) -> TrainOutput:
    """The network's raw output read as :class:`TrainOutput` by the adapter ``output``; anything else is an error."""
    expected = (x.shape[0], out_channels, *x.shape[2:])
    aux: tuple[torch.Tensor, ...] = ()
    extra = None
    seg: Any = out
    try:
        if output == "stacked" and isinstance(out, torch.Tensor) and out.ndim == x.ndim + 1:
            seg, *rest = out.unbind(1)
            aux = tuple(rest)
        elif output in ("seg_aux", "aux_seg") and isinstance(out, (tuple, list)) and out:
            items = list(out) if output == "seg_aux" else list(reversed(out))
            seg, aux = items[0], tuple(items[1:])
        elif output == "seg_loss" and isinstance(out, (tuple, list)) and len(out) == 2:
            seg, extra = out
        elif output.startswith("key:") and isinstance(out, dict) and output[4:] in out:
            seg = out[output[4:]]
    except (TypeError, ValueError):
        pass
    ok = isinstance(seg, torch.Tensor) and tuple(seg.shape) == expected and all(isinstance(a, torch.Tensor) for a in aux)
    ok = ok and (extra is None or (isinstance(extra, torch.Tensor) and extra.numel() == 1))
    if not ok:
        mode = "training" if torch.is_grad_enabled() else "inference"
        raise MedsegError(
            f"{label} returned {_describe(out)} for an input of shape {tuple(x.shape)} ({mode}); read with output={output!r} "
            f"({OUTPUTS.get(output, 'a dict item')}) it does not give the segmentation {expected}. medseg models return one "
            "tensor (B, out_channels, *S); declare how to read this network's output with output= one of: "
            + "; ".join(f"{k} = {v}" for k, v in OUTPUTS.items()))
    return TrainOutput(seg, aux, extra.reshape(()) if extra is not None else None)


class ForeignModel(SegmentationModel):
    """A network built elsewhere (MONAI, a user's module) with a size rule and an output adapter.

    ``forward(x)`` returns the segmentation; ``forward_train(x)`` the :class:`TrainOutput` the adapter reads
    (auxiliary outputs, a loss term). The wrapped network is ``self.net`` (its weights are ``net.*``)."""

    def __init__(self, net: nn.Module, label: str, spatial_dims: int, in_channels: int, out_channels: int,
                 size_divisor, min_size=None, max_size=None, output: str = "tensor", note: str = "",
                 deep_supervision: bool = False):
        super().__init__(spatial_dims, in_channels, out_channels)
        self.net = net
        self.output = check_output_spec(output)
        self.model_name = label
        self.set_size_rule(size_divisor, note, min_size, max_size)
        self.deep_supervision = bool(deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x).seg

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        self.check_input(x)
        return adapt_output(self.net(x), self.output, x, self.out_channels, self.model_name)


# ----------------------------------------------------------------------------------------------- probing
def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose parameters and buffers live on the meta device (no data copied)."""
    import copy

    memo: dict = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)


def _meta_forward(probe: nn.Module, x: torch.Tensor, train: bool) -> Any:
    """``probe(x)`` on the meta device (``probe`` from :func:`meta_copy`) in train or eval mode."""
    probe.train(train)
    with torch.no_grad():
        return probe(x.to("meta"))


def _accepts(net: nn.Module, size: Sequence[int], in_channels: int, out_channels: int, output: str, label: str) -> bool:
    """Whether an eval-mode forward of ``size`` runs and, read with ``output``, keeps the size. An output of the wrong
    kind (a tuple where a tensor is expected...) raises at once: no input size would fix it."""
    x = torch.empty(1, in_channels, *size, device="meta")
    try:
        out = _meta_forward(net, x, False)
    except Exception:
        return False
    try:
        adapt_output(out, output, x, out_channels, label)
        return True
    except MedsegError:
        size_only = isinstance(out, torch.Tensor) and out.ndim == x.ndim and out.shape[:2] == (1, out_channels)
        if size_only or output != "tensor":
            return False
        raise


def infer_size_rule(net: nn.Module, spatial_dims: int, in_channels: int, out_channels: int, output: str,
                    label: str) -> int:
    """The smallest power of two ``d`` (1 ... 128) such that inputs ``d * (3, 5, 7)`` and ``d * (5, 7, 3)`` give outputs
    of the same size: the network's size divisor."""
    last = ""
    for d in (1, 2, 4, 8, 16, 32, 64, 128):
        a, b = [d * q for q in (3, 5, 7)[:spatial_dims]], [d * q for q in (5, 7, 3)[:spatial_dims]]
        if _accepts(net, a, in_channels, out_channels, output, label) and _accepts(net, b, in_channels, out_channels, output, label):
            return d
        last = f"{d}"
    raise MedsegError(f"{label}: could not infer which input sizes it accepts (no input d*(3, 5, 7) with d up to {last} "
                      "gave an output of the input's size on the meta device); declare the rule: size_divisor (and "
                      "min_size / max_size for a fixed-size network) in register(...) or, for monai:..., in model.kwargs")


def check_outputs(net: nn.Module, label: str, spatial_dims: int, in_channels: int, out_channels: int, output: str,
                  size: Sequence[int]) -> bool:
    """Run a train-mode and an eval-mode forward on the meta device and read both with ``output``; a clear error when
    the output does not fit. Returns whether the training forward gives auxiliary outputs (deep supervision)."""
    x = torch.empty(2, in_channels, *size, device="meta")
    aux = False
    for train in (True, False):
        try:
            out = _meta_forward(net, x, train)
        except MedsegError:
            raise
        except NotImplementedError:
            return aux  # an operation without a meta kernel: the output is checked at the first real forward instead
        except Exception as err:
            raise MedsegError(f"{label}: a forward pass on an input of shape {tuple(x.shape)} (a size its rule accepts) "
                              f"failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the declared "
                              "size rule (size_divisor, min_size, max_size) and the model arguments") from None
        with torch.set_grad_enabled(train):
            result = adapt_output(out, output, x, out_channels, label)
        aux = aux or (train and bool(result.aux))
    return aux


def wrap(net: nn.Module, label: str, spatial_dims: int, in_channels: int, out_channels: int,
         size_divisor=None, min_size=None, max_size=None, output: str = "tensor", note: str = "") -> ForeignModel:
    """``net`` as a :class:`ForeignModel`: the size rule declared or inferred, the output checked on the meta device."""
    check_output_spec(output)
    probe = meta_copy(net)
    if size_divisor is None:
        size_divisor = infer_size_rule(probe, spatial_dims, in_channels, out_channels, output, label)
        note = f"size rule inferred: multiples of {size_divisor}"
    div = as_tuple(size_divisor, spatial_dims, "size_divisor")
    mins = as_tuple(min_size, spatial_dims, "min_size") if min_size is not None else div
    size = tuple(max(m + (-m) % d, 4 * d) for m, d in zip(mins, div))  # large enough for train-mode norms at the bottom
    if max_size is not None:
        size = tuple(min(s, x) for s, x in zip(size, as_tuple(max_size, spatial_dims, "max_size")))
    aux = check_outputs(probe, label, spatial_dims, in_channels, out_channels, output, size)
    return ForeignModel(net, label, spatial_dims, in_channels, out_channels, div, mins, max_size, output,
                        note or "declared size rule", deep_supervision=aux or output == "stacked")


# ----------------------------------------------------------------------------------------------- MONAI by name
def _prod_strides(kw: dict, dims: int, default: Sequence = ()) -> tuple[int, ...]:
    return stride_product(kw.get("strides", default), dims)


def _known_rule(cls_name: str, kw: dict, dims: int) -> tuple[Any, Any, Any, str, str]:
    """(size_divisor, min_size, max_size, output, note) of a MONAI network from its arguments; (None, ...) if unknown."""
    if cls_name == "DynUNet":
        out = "stacked" if kw.get("deep_supervision") else "tensor"
        return _prod_strides(kw, dims), None, None, out, f"{len(kw.get('strides', ()))} levels"
    if cls_name in ("UNet", "AttentionUnet"):
        return _prod_strides(kw, dims), None, None, "tensor", f"{len(kw.get('strides', ()))} strides"
    if cls_name in ("BasicUNet", "BasicUnet"):
        return 16, None, None, "tensor", "4 poolings"
    if cls_name in ("BasicUNetPlusPlus", "BasicUnetPlusPlus"):
        return 16, None, None, "aux_seg", "4 poolings"
    if cls_name == "SegResNet":
        n = len(kw.get("blocks_down", (1, 2, 2, 4))) - 1
        return 2 ** n, None, None, "tensor", f"{n} down-samplings"
    if cls_name == "SegResNetVAE":
        size = as_tuple(kw["input_image_size"], dims, "input_image_size") if "input_image_size" in kw else None
        n = len(kw.get("blocks_down", (1, 2, 2, 4))) - 1
        return 2 ** n, size, size, "seg_loss", "VAE dense layers sized for input_image_size"
    if cls_name == "VNet":
        return 16, None, None, "tensor", "depth 4"
    if cls_name == "SwinUNETR":
        return 32, 64, None, "tensor", "patch 2, 4 patch mergings; instance norm needs 2^3 at the bottom"
    if cls_name == "UNETR":
        size = as_tuple(kw["img_size"], dims, "img_size") if "img_size" in kw else None
        return 16, size, size, "tensor", "position embedding sized for img_size"
    return None, None, None, "tensor", ""


def _monai_class(cls_name: str):
    import monai.networks.nets as nets

    cls = getattr(nets, cls_name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        names = [n for n in dir(nets) if isinstance(getattr(nets, n), type) and issubclass(getattr(nets, n), nn.Module)]
        raise MedsegError(f"model: 'monai:{cls_name}' is not a network of monai.networks.nets{suggest(cls_name, names)}; "
                          f"e.g. monai:DynUNet, monai:SwinUNETR, monai:UNETR, monai:SegResNet, monai:BasicUNet")
    return cls


def _monai_factory(cls_name: str):
    def factory(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> ForeignModel:
        cls = _monai_class(cls_name)
        medseg_kw = {k: kwargs.pop(k) for k in MEDSEG_KWARGS if k in kwargs}
        params = inspect.signature(cls).parameters
        given = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
        missing = [k for k in given if k not in params]
        if "in_channels" in missing or "out_channels" in missing:
            raise MedsegError(f"monai:{cls_name} takes no in_channels/out_channels argument; it is not a segmentation "
                              "network medseg can build by name (wrap it in a factory of your own module)")
        if "spatial_dims" in missing and spatial_dims != 3:
            raise MedsegError(f"monai:{cls_name} has no spatial_dims argument (3D only); use model.spatial_dims: 3")
        args = {k: v for k, v in given.items() if k in params}
        label = f"monai:{cls_name}"
        try:
            net = cls(**args, **kwargs)
        except TypeError as err:
            raise TypeError(f"monai:{cls_name}: {err}") from None
        except Exception as err:
            if type(err).__name__ == "OptionalImportError":
                raise MedsegError(f"{label} needs an optional package of MONAI ({str(err).splitlines()[0]}); install it, "
                                  "e.g. pip install einops") from None
            raise MedsegError(f"{label}: MONAI refused the arguments {sorted(kwargs)} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
        div, mins, maxs, output, note = _known_rule(cls_name, kwargs, spatial_dims)
        div = medseg_kw.get("size_divisor", div)
        mins = medseg_kw.get("min_size", mins)
        maxs = medseg_kw.get("max_size", maxs)
        output = medseg_kw.get("output", output)
        return wrap(net, label, spatial_dims, in_channels, out_channels, div, mins, maxs, output, note=note)

    return factory


_MONAI_ENTRIES: dict = {}


def monai_entry(name: str):
    """A registry entry for ``monai:ClassName`` (made on first use, not listed by ``list_models``)."""
    from medseg.models.registry import ModelEntry

    if name not in _MONAI_ENTRIES:
        cls_name = name.split(":", 1)[1]
        cls = _monai_class(cls_name)
        params = inspect.signature(cls).parameters
        dims = (2, 3) if "spatial_dims" in params else (3,)
        _MONAI_ENTRIES[name] = ModelEntry(name, _monai_factory(cls_name), dims,
                                          f"MONAI {cls.__module__}.{cls_name} (used as is, wrapped by medseg.models.foreign)")
    return _MONAI_ENTRIES[name]
