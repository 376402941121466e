"""Segmentation losses, one registry.

=================== ========================= =================================================
name                target                    what
=================== ========================= =================================================
``dice``            labels or regions         soft Dice (softmax over classes / sigmoid per region)
``dice_ce``         labels                    soft Dice + cross-entropy (nnU-Net's default)
``region_dice_bce`` regions                   sigmoid Dice + binary cross-entropy per region (BraTS WT/TC/ET)
=================== ========================= =================================================

``auto`` picks ``dice_ce`` for labels and ``region_dice_bce`` for regions. :class:`DeepSupervisionLoss`
applies a loss to auxiliary lower-resolution outputs with halving weights. Inputs are logits
``(B, K, *spatial)``; targets are ``(B, R, *spatial)`` float masks for regions or ``(B, 1, *spatial)``
class indices for labels. Dice sums over ``range(2, ndim)``, so every loss works in 2D and 3D. The VAE
regulariser of ``segresnet_vae`` is computed by the model and added by the training step.

Example:
    >>> import torch
    >>> loss = create_loss("region_dice_bce", target="regions")
    >>> logits, target = torch.zeros(1, 3, 8, 8, 8), torch.ones(1, 3, 8, 8, 8)
    >>> round(float(loss(logits, target)), 4)  # Dice 1 - 2*0.5/1.5 = 0.3333, BCE log 2 = 0.6931
    1.0265
"""
from __future__ import annotations

import difflib
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.errors import MedsegError

LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(factory):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = factory
        return factory

    return deco


class SoftDice(nn.Module):
    """1 - soft Dice, averaged over channels and batch. ``activation``: "softmax" (labels) or "sigmoid" (regions).

    For labels the target holds class indices ``(B, 1, *spatial)``; the background channel is excluded
    from the average (``include_background=False``) as foreground overlap is what is optimised.
    """

    def __init__(self, activation: str = "softmax", include_background: bool = False, smooth: float = 1e-5):
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
        self.activation, self.include_background, self.smooth = activation, include_background, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "softmax":
            probs = logits.softmax(1)
            onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
            if not self.include_background:
                probs, onehot = probs[:, 1:], onehot[:, 1:]
        else:
            probs, onehot = logits.sigmoid(), target.to(logits.dtype)
        dims = tuple(range(2, logits.ndim))
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1 - dice.mean()


class _Sum(nn.Module):
    def __init__(self, *terms: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits, target):
        return sum(term(logits, target) for term in self.terms)


class _CE(nn.Module):
    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target[:, 0].long())


class _BCE(nn.Module):
    def forward(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


@register("dice")
def _dice(target: str) -> nn.Module:
    return SoftDice("sigmoid" if target == "regions" else "softmax")


@register("dice_ce")
def _dice_ce(target: str) -> nn.Module:
    if target == "regions":
        raise MedsegError("loss.name: dice_ce needs data.target: labels (softmax); for regions use region_dice_bce")
    return _Sum(SoftDice("softmax"), _CE())


@register("region_dice_bce")
def _region_dice_bce(target: str) -> nn.Module:
    if target != "regions":
        raise MedsegError("loss.name: region_dice_bce needs data.target: regions (sigmoid); for labels use dice_ce")
    return _Sum(SoftDice("sigmoid"), _BCE())


def create_loss(name: str, target: str) -> nn.Module:
    """A loss by name for ``target`` "regions" or "labels" (``auto`` picks the usual one)."""
    if name == "auto":
        name = "region_dice_bce" if target == "regions" else "dice_ce"
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MedsegError(f"unknown loss '{name}'{hint}; valid losses: auto, {', '.join(LOSSES)}")
    return LOSSES[name](target)


class DeepSupervisionLoss(nn.Module):
    """``loss(main) + sum_k w_k loss(aux_k)`` with weights halving per level, normalised to sum to 1.

    Auxiliary outputs may be at lower resolution; the target is resized with nearest neighbour (regions and
    class indices stay valid).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([0.5 ** k for k in range(len(outputs))])
        weights = weights / weights.sum()
        total = 0.0
        for w, out in zip(weights, outputs):
            t = target if out.shape[2:] == target.shape[2:] else F.interpolate(target.float(), size=out.shape[2:], mode="nearest").to(target.dtype)
            total = total + float(w) * self.loss(out, t)
        return total
