"""Segmentation losses, one registry, built on MONAI's ``DiceLoss`` and ``DiceCELoss``.

=================== ========================= =================================================
name                target                    what
=================== ========================= =================================================
``dice``            labels or regions         soft Dice (softmax over classes / sigmoid per region)
``dice_ce``         labels                    soft Dice + cross-entropy (nnU-Net's default)
``region_dice_bce`` regions                   sigmoid Dice + binary cross-entropy per region (BraTS WT/TC/ET)
``dice_squared``    labels or regions         soft Dice with squared terms in the denominator, 1 - 2·Σpt / (Σp² + Σt²)
                                              (Milletari 2016, Myronenko 2018; MONAI ``squared_pred=True``)
=================== ========================= =================================================

``auto`` picks ``dice_ce`` for labels and ``region_dice_bce`` for regions; :func:`loss_names` lists the valid
values of ``loss.name``. :class:`DeepSupervisionLoss` adds auxiliary lower-resolution outputs with halving
weights. Inputs are logits ``(B, K, *spatial)`` in 2D or 3D, cast to float32 before the loss (AMP gives
bf16/fp16); targets are ``(B, R, *spatial)`` float masks for regions or ``(B, 1, *spatial)`` class indices for
labels. Dice is computed per sample and per channel, then averaged (MONAI ``batch=False``), with smoothing 1e-5
in numerator and denominator; softmax Dice leaves out the background class, sigmoid Dice keeps every region.
With ``batch_dice=True`` (``loss.batch_dice``; nnU-Net's setting for 3D full resolution and 2D) the sums run over
the whole batch per channel instead (MONAI ``batch=True``): a patch without, say, enhancing tumour then adds its
false positives to the batch's denominator instead of scoring a Dice of ~0 on its own, which with per-sample Dice
teaches the network to under-segment small structures (most patches miss them). Under DDP (``torchrun``) the
batch is every rank's patches, as in nnU-Net: :class:`AcrossRanks` gathers the logits and targets of all ranks
before the loss, so each rank's Dice sums run over the global batch instead of its own two patches.
The VAE regulariser of ``segresnet_vae`` is computed by the model and added by the training step.

Ignored voxels (a label scheme's ``ignore`` values, e.g. a trimap's boundary) arrive as class index -1 in a labels
target; the labels losses then leave them out of both terms (Dice sums and the cross-entropy mean run over the
other voxels only), and give exactly MONAI's value when no voxel is ignored.

Example:
    >>> import torch
    >>> loss = create_loss("region_dice_bce", target="regions")
    >>> logits, target = torch.zeros(1, 3, 8, 8, 8), torch.ones(1, 3, 8, 8, 8)
    >>> round(float(loss(logits, target)), 4)  # Dice 1 - 2*0.5/1.5 = 0.3333, BCE log 2 = 0.6931
    1.0265
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.errors import MedsegError, check_choice

Factory = Callable[[str, bool], nn.Module]  # (target, batch_dice) -> loss module
LOSSES: dict[str, Factory] = {}
TARGETS = ("regions", "labels")
SMOOTH = 1e-5


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding a factory ``factory(target, batch_dice) -> nn.Module`` to :data:`LOSSES` under ``name``."""
    def deco(factory: Factory) -> Factory:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = factory
        return factory

    return deco


def loss_names() -> tuple[str, ...]:
    """The valid values of ``loss.name``: ``auto`` and every registered loss."""
    return ("auto", *LOSSES)


def create_loss(name: str, target: str, batch_dice: bool = False) -> nn.Module:
    """A loss by name for ``target`` "regions" or "labels" (``auto`` picks the usual one); ``batch_dice``: Dice
    sums over the whole batch (module doc).

    The module is called as ``loss(logits, target)`` and returns a float32 scalar.
    """
    check_choice(target, TARGETS, "data.target")
    check_choice(name, loss_names(), "loss.name")
    if name == "auto":
        name = "region_dice_bce" if target == "regions" else "dice_ce"
    loss = LOSSES[name](target, bool(batch_dice))
    return AcrossRanks(loss) if batch_dice else loss


class AcrossRanks(nn.Module):
    """``loss`` over the batch of every DDP rank: logits (with their gradient) and targets are gathered from all
    ranks, and each rank computes the same loss of the global batch (a single process: ``loss`` as is).

    Gradients come out right: every rank's copy of the global loss sends its gradient back to each rank's logits
    (the gather's backward sums them, ``world_size`` times the global loss's gradient) and DDP averages the
    parameter gradients over the ranks, which gives exactly the gradient of the global loss. Mean terms
    (cross-entropy, BCE) are unchanged by the gather: equal batches on every rank, so the global mean is the mean of
    the ranks' means. Every rank must call the loss with tensors of one shape (the trainer's batches are: fixed
    patches, ``drop_last``). Costs one gather of the logits per step (2 x 3 x 128³ float32: 50 MB per rank).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.loss(logits, target)
        targets = [torch.empty_like(target) for _ in range(dist.get_world_size())]
        dist.all_gather(targets, target.contiguous())
        return self.loss(_GatherBatch.apply(logits.float().contiguous()), torch.cat(targets))


class _GatherBatch(torch.autograd.Function):
    """Every rank's batch, concatenated in rank order; backward: the gradient summed over the ranks, this rank's
    part (an all-reduce, which gloo has, where a reduce-scatter would need NCCL)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.part = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.part]


def _dice_settings(target: str, batch: bool = False) -> dict:
    """MONAI Dice arguments: sigmoid on every region, or softmax over classes without the background; ``batch``:
    sums over the batch too."""
    if target == "regions":
        act = dict(sigmoid=True, include_background=True)
    else:
        act = dict(softmax=True, to_onehot_y=True, include_background=False)
    return dict(act, batch=batch, smooth_nr=SMOOTH, smooth_dr=SMOOTH)


class _Float32(nn.Module):
    """Applies ``loss`` to float32 logits, so reductions under AMP do not run in bf16/fp16."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target)


class _RegionDiceBCE(nn.Module):
    """Sigmoid Dice over all regions + binary cross-entropy averaged over every voxel and region.

    MONAI's ``DiceCELoss`` uses binary cross-entropy only for a single channel, so the two terms are added here.
    """

    def __init__(self, batch: bool = False):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(**_dice_settings("regions", batch))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


# MONAI is imported when a loss is built, so that listing the names (config validation) stays light.
class _IgnoreAware(nn.Module):
    """A labels loss (softmax Dice, optionally + cross-entropy) that leaves out voxels whose class index is -1.

    Without ignored voxels the MONAI loss runs as is. With them, probabilities and one-hot targets are zeroed
    there before MONAI's Dice (so they add nothing to intersections or denominators) and the cross-entropy is
    averaged over the voxels that are not ignored.
    """

    def __init__(self, loss: nn.Module, with_ce: bool, squared: bool = False, batch: bool = False):
        super().__init__()
        from monai.losses import DiceLoss

        self.loss, self.with_ce = loss, with_ce
        self.masked_dice = DiceLoss(include_background=False, batch=batch, smooth_nr=SMOOTH, smooth_dr=SMOOTH,
                                    squared_pred=squared)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ignored = target < 0
        if not bool(ignored.any()):
            return self.loss(logits, target)
        keep = (~ignored).float()
        index = target.clamp(min=0).long()
        onehot = F.one_hot(index[:, 0], logits.shape[1]).movedim(-1, 1).float() * keep
        loss = self.masked_dice(torch.softmax(logits, 1) * keep, onehot)
        if self.with_ce:
            ce = F.cross_entropy(logits, index[:, 0], reduction="none") * keep[:, 0]
            loss = loss + ce.sum() / keep.sum().clamp(min=1.0)
        return loss


@register("dice")
def _dice(target: str, batch: bool) -> nn.Module:
    from monai.losses import DiceLoss

    loss = _Float32(DiceLoss(**_dice_settings(target, batch)))
    return loss if target == "regions" else _IgnoreAware(loss, with_ce=False, batch=batch)


@register("dice_ce")
def _dice_ce(target: str, batch: bool) -> nn.Module:
    if target == "regions":
        raise MedsegError("loss.name: dice_ce needs data.target: labels (softmax); for regions use region_dice_bce")
    from monai.losses import DiceCELoss

    return _IgnoreAware(_Float32(DiceCELoss(**_dice_settings(target, batch), lambda_dice=1.0, lambda_ce=1.0)), with_ce=True,
                        batch=batch)


@register("region_dice_bce")
def _region_dice_bce(target: str, batch: bool) -> nn.Module:
    if target != "regions":
        raise MedsegError("loss.name: region_dice_bce needs data.target: regions (sigmoid); for labels use dice_ce")
    return _RegionDiceBCE(batch)


@register("dice_squared")
def _dice_squared(target: str, batch: bool) -> nn.Module:
    from monai.losses import DiceLoss

    loss = _Float32(DiceLoss(**_dice_settings(target, batch), squared_pred=True))
    return loss if target == "regions" else _IgnoreAware(loss, with_ce=False, squared=True, batch=batch)


class DeepSupervisionLoss(nn.Module):
    """``sum_k w_k * loss(outputs[k], target)`` over outputs finest first, ``w_k = 2**-k / sum_j 2**-j``.

    The weights sum to 1, so the main (finest) output is weighted too: 2/3 with one auxiliary output, 4/7 with
    two, 8/15 with three. ``outputs``: a list of logits ``(B, K, *spatial_k)``; for an output at a lower
    resolution the target is taken to its grid by :func:`downsample_target` (each coarse voxel the majority of the
    block it covers; ``soft=True``: region targets keep each block's share), so class indices and masks stay valid
    and keep their dtype.

    MONAI's ``DeepSupervisionLoss`` is not used: its weights are not normalised and stop halving at 1/16, it
    resizes with "nearest-exact" (one voxel of each block, half a fine voxel off the coarse logits' centres) and it
    cannot resize int64 class-index targets.

    Example:
        >>> import torch
        >>> loss = DeepSupervisionLoss(create_loss("dice", target="regions"))
        >>> target = torch.ones(1, 1, 8, 8)
        >>> outputs = [torch.full((1, 1, 8, 8), 20.0), torch.zeros(1, 1, 4, 4)]  # Dice losses ~0 and 1/3
        >>> round(float(loss(outputs, target)), 4)  # 2/3 * 0 + 1/3 * 1/3
        0.1111
    """

    def __init__(self, loss: nn.Module, soft: bool = False):
        super().__init__()
        self.loss = loss
        self.soft = soft

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or not outputs:
            raise TypeError("DeepSupervisionLoss takes a non-empty list of outputs, finest first")
        weights = [0.5 ** k for k in range(len(outputs))]
        total = sum(weights)
        return sum(w / total * self.loss(out, downsample_target(target, out.shape[2:], self.soft))
                   for w, out in zip(weights, outputs))


def downsample_target(target: torch.Tensor, size: Sequence[int], soft: bool = False) -> torch.Tensor:
    """A target ``(B, R or 1, *spatial)`` on the coarser grid ``size`` of an auxiliary output, dtype kept.

    Where each axis shrinks by a whole factor (a network's strides), a coarse voxel covers a block of fine voxels and
    takes the block's majority: a region mask its share >= 0.5 (``soft``: the share itself), class indices the most
    frequent value (an ignored voxel's -1 counts as a value of its own; a tie goes to the lower value). Taking one
    voxel of each block (nearest neighbour) would put the target half a fine voxel off the coarse logits. Other
    sizes fall back to nearest neighbour.
    """
    size = tuple(int(v) for v in size)
    if tuple(target.shape[2:]) == size:
        return target
    fine = tuple(target.shape[2:])
    if len(size) not in (2, 3) or any(b < 1 or a % b for a, b in zip(fine, size)):
        return F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)
    factors = tuple(a // b for a, b in zip(fine, size))
    pool = F.avg_pool3d if len(size) == 3 else F.avg_pool2d
    if target.is_floating_point():
        share = pool(target.float(), factors, factors)
        return (share if soft else (share >= 0.5)).to(target.dtype)
    values = torch.unique(target)
    counts = torch.stack([pool((target == v).float(), factors, factors) for v in values])
    return values[counts.argmax(0)].to(target.dtype)
