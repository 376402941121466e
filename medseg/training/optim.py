"""Optimiser and learning-rate schedule of a run.

The schedule is a pure function of the epoch (:class:`LRFactor`): each epoch starts by setting every parameter
group's learning rate to ``optimizer.lr * factor(epoch)``. Nothing about the schedule is stored, so a resumed run,
or one extended with ``--extend-epochs``, continues from the epoch it reached.

Example:
    >>> f = LRFactor("poly", epochs=10, warmup=0, power=0.9, floor=0.0)
    >>> f(0), round(f(5), 4), f(10)
    (1.0, 0.5359, 0.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medseg.training.config import Pipeline


def build_optimizer(p: Pipeline, params) -> torch.optim.Optimizer:
    o = p.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


@dataclass(frozen=True)
class LRFactor:
    """Learning-rate factor per epoch: linear warm-up, then poly, cosine or constant, never below ``floor``."""

    name: str
    epochs: int
    warmup: int
    power: float
    floor: float

    @classmethod
    def of(cls, p: Pipeline, epochs: int) -> "LRFactor":
        s = p.schedule
        return cls(s.name, epochs, s.warmup_epochs, s.power, s.min_lr / p.optimizer.lr if p.optimizer.lr else 0.0)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        t = min(1.0, (epoch - self.warmup) / max(1, self.epochs - self.warmup))
        if self.name == "poly":
            f = (1 - t) ** self.power
        elif self.name == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * t))
        else:
            f = 1.0
        return max(f, self.floor)


def set_lr(optimizer: torch.optim.Optimizer, p: Pipeline, epoch: int, epochs: int) -> float:
    """Set the learning rate of ``epoch`` (0-based) of an ``epochs``-long schedule; returns it."""
    lr = p.optimizer.lr * LRFactor.of(p, epochs)(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
