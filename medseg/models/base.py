"""Base class of the registered models and the input-size rules.

Every model has a ``size_divisor``: per spatial axis, the factor each input size must be a multiple of
(the product of its down-sampling strides). ``forward`` checks the input with :func:`check_input_size` (a few
integer operations), so a bad size fails with a message naming the sizes to use instead of a torch error
deep inside a concatenation.

Example:
    >>> import torch
    >>> from medseg.models import create_model, check_input_size, valid_input_size
    >>> net = create_model("unet", spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    >>> net.size_divisor
    (4, 4, 4)
    >>> valid_input_size(net, (97, 96, 30))
    (100, 96, 32)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from medseg.errors import MedsegError


def as_tuple(value: int | Sequence[int], n: int, what: str = "value") -> tuple[int, ...]:
    """``3 -> (3, 3, 3)``; a sequence must have ``n`` entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise MedsegError(f"{what} {list(value)} must have {n} entries (one per spatial axis) or be one integer")
    return value


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise MedsegError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def stride_product(strides: Iterable[int | Sequence[int]], n: int) -> tuple[int, ...]:
    """Per-axis product of a list of (per-axis) strides: ``[2, (2, 2, 1)] -> (4, 4, 2)``."""
    out = [1] * n
    for s in strides:
        for i, v in enumerate(as_tuple(s, n, "stride")):
            out[i] *= v
    return tuple(out)


@dataclass(frozen=True)
class TrainOutput:
    """What a forward pass for training gives, for every model alike.

    Attributes:
        seg: the segmentation logits ``(B, out_channels, *S)`` (what ``forward`` returns).
        aux: auxiliary logits for deep supervision, finest first (may be at lower resolution); empty otherwise.
        extra_loss: a scalar the model adds to the training loss (the VAE regulariser of ``segresnet_vae``), or None.
    """

    seg: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()
    extra_loss: torch.Tensor | None = None


def forward_train(model: nn.Module, x: torch.Tensor) -> TrainOutput:
    """``model.forward_train(x)`` for medseg models; any other ``nn.Module`` gives ``TrainOutput(model(x))``."""
    if hasattr(model, "forward_train"):
        return model.forward_train(x)
    return TrainOutput(model(x))


class SegmentationModel(nn.Module):
    """Common attributes: ``spatial_dims``, ``in_channels``, ``out_channels``, ``size_divisor`` (per-axis tuple),
    ``min_size`` (per-axis tuple), ``size_note`` (why, e.g. "depth 4"), ``deep_supervision`` (whether
    :meth:`forward_train` gives auxiliary outputs), and ``unused_in_forward``: name prefixes of parameters that plain
    ``forward`` does not use in the current configuration (e.g. a VAE branch).

    ``forward(x)`` returns one tensor in every mode; :meth:`forward_train` returns a :class:`TrainOutput` with the
    extra training outputs. Neither stores outputs on the module, so both are re-entrant.
    """

    unused_in_forward: tuple[str, ...] = ()
    deep_supervision: bool = False

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Logits plus the model's extra training outputs (none by default)."""
        return TrainOutput(self(x))

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.size_divisor: tuple[int, ...] = (1,) * spatial_dims
        self.min_size: tuple[int, ...] = (1,) * spatial_dims
        self.max_size: tuple[int, ...] | None = None
        self.size_note = ""

    def set_size_rule(self, divisor: int | Sequence[int], note: str = "", min_size: int | Sequence[int] | None = None,
                      max_size: int | Sequence[int] | None = None) -> None:
        """Each axis a multiple of ``divisor``, at least ``min_size`` (default: the divisor) and, for networks with a
        fixed input size (a transformer's position embedding, a dense layer), at most ``max_size``."""
        self.size_divisor = as_tuple(divisor, self.spatial_dims, "size divisor")
        self.min_size = as_tuple(min_size, self.spatial_dims, "min size") if min_size is not None else self.size_divisor
        self.max_size = as_tuple(max_size, self.spatial_dims, "max size") if max_size is not None else None
        self.size_note = note

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`MedsegError` if ``x`` is not ``(B, in_channels, *spatial)`` with an accepted spatial size."""
        if x.ndim != self.spatial_dims + 2:
            raise MedsegError(f"{_label(self)} expects a (B, C, {', '.join('XYZ'[:self.spatial_dims])}) tensor with "
                              f"{self.spatial_dims} spatial axes, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise MedsegError(f"{_label(self)} was built for {self.in_channels} input channel(s), got {x.shape[1]} "
                              f"(shape {tuple(x.shape)})")
        check_input_size(self, tuple(x.shape[2:]))


def _label(model: nn.Module) -> str:
    name = getattr(model, "model_name", None) or type(model).__name__
    note = getattr(model, "size_note", "")
    return f"{name} ({note})" if note else name


def _size_rules(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    div, mins, _ = _size_rules_max(model)
    return div, mins


def _size_rules_max(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    from medseg.models.registry import unwrap

    model = unwrap(model)
    if not hasattr(model, "size_divisor"):
        raise MedsegError(f"{type(model).__name__} has no input-size rule (size_divisor): it was not built by "
                          "medseg.models.create_model; register it (medseg.models.register, or 'monai:ClassName' for a "
                          "MONAI network) and build it with create_model(name, ...), which declares or infers the rule")
    n = model.spatial_dims
    div = as_tuple(model.size_divisor, n, "size divisor")
    maxs = getattr(model, "max_size", None)
    return div, as_tuple(getattr(model, "min_size", div), n, "min size"), (as_tuple(maxs, n, "max size") if maxs else None)


def _round_up(s: int, d: int, m: int) -> int:
    return max(m + (-m) % d, s + (-s) % d)


def _round_down(s: int, d: int, m: int) -> int | None:
    low = s - s % d
    return low if low >= m else None


def check_input_size(model: nn.Module, spatial_shape: Sequence[int]) -> None:
    """Raise :class:`MedsegError` naming the nearest accepted sizes if ``spatial_shape`` is not accepted."""
    div, mins, maxs = _size_rules_max(model)
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != len(div):
        raise MedsegError(f"spatial size {shape} has {len(shape)} axes but {_label(model)} is {len(div)}D")
    if maxs is not None and all(s % d == 0 and m <= s <= x for s, d, m, x in zip(shape, div, mins, maxs)):
        return
    if maxs is not None:
        fixed = mins == maxs
        rule = f"exactly {maxs}" if fixed else f"between {mins} and {maxs}, a multiple of {div}"
        raise MedsegError(f"spatial size {shape} is not accepted by {_label(model)}: its input size is fixed at build time, "
                          f"each axis must be {rule}; use {tuple(min(max(s + (-s) % d, m), x) for s, d, m, x in zip(shape, div, mins, maxs))} "
                          "(as the patch and the sliding-window size)")
    if all(s % d == 0 and s >= m for s, d, m in zip(shape, div, mins)):
        return
    up = tuple(_round_up(s, d, m) for s, d, m in zip(shape, div, mins))
    downs = [_round_down(s, d, m) for s, d, m in zip(shape, div, mins)]
    options = [] if None in downs or tuple(downs) == up else [tuple(downs)]
    options.append(up)
    rule = f"a multiple of {div[0]}" if len(set(div)) == 1 else f"a multiple of {div} respectively"
    if any(m > d for m, d in zip(mins, div)):
        rule += f" and at least {mins[0] if len(set(mins)) == 1 else mins}"
    raise MedsegError(f"spatial size {shape} is not accepted by {_label(model)}: each axis must be {rule}; "
                      f"use {' or '.join(str(o) for o in options)}")


def valid_input_size(model_or_name: nn.Module | str, size: Sequence[int], spatial_dims: int | None = None,
                     **kwargs) -> tuple[int, ...]:
    """The smallest accepted spatial size ``>= size`` on every axis (the size to pad to).

    ``model_or_name`` is a model, or a registered name built with ``kwargs`` (on the meta device: no memory, no
    compute); ``spatial_dims`` defaults to ``len(size)``.
    """
    if isinstance(model_or_name, str):
        from medseg.models.registry import create_model

        with torch.device("meta"):
            model = create_model(model_or_name, spatial_dims=spatial_dims or len(size), **kwargs)
    else:
        model = model_or_name
    div, mins, maxs = _size_rules_max(model)
    if len(size) != len(div):
        raise MedsegError(f"size {tuple(size)} has {len(size)} axes but the model is {len(div)}D")
    out = tuple(_round_up(int(s), d, m) for s, d, m in zip(size, div, mins))
    if maxs is not None and any(o > x for o, x in zip(out, maxs)):
        raise MedsegError(f"size {tuple(size)} is larger than {_label(model)} accepts (at most {maxs}, fixed at build time); "
                          f"use windows of {maxs} (sliding window)")
    return out
