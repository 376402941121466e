"""The contract of instance-segmentation models, and the conversions between instance maps and per-object targets.

An instance model (``task="instances"`` in the registry: ``maskrcnn``, ``yolact``) trains on instance label maps —
0 background, one id per object, the map that the ``instance-masks`` layout reads from a folder of masks — and
predicts a list of objects (mask probabilities, score, class, box) per image. It shares the data layer, the
trainer and ``medseg predict`` with the semantic models:

* :meth:`InstanceModel.training_losses` ``(x, instances)`` gives the loss terms (their sum is the loss);
* :meth:`InstanceModel.predict_instances` ``(x)`` gives :class:`Instances` per image;
* ``forward(x)`` returns, like every model, one tensor ``(B, out_channels, *S)``: the log of the semantic
  probabilities rendered from the predicted objects (:func:`render_semantic`), so validation and semantic output
  work unchanged. It runs the detector in inference mode and has no gradient.

Boxes are ``(min_0, min_1, ..., max_0, max_1, ...)`` in array-axis order, in voxels, the maximum exclusive (a box of
one voxel at the origin is ``(0, 0, 1, 1)``): MONAI's ``xyxy``/``xyzxyz`` standard mode with x = the first spatial
axis of the tensor.

Example:
    >>> inst = torch.zeros(6, 5, dtype=torch.long); inst[1:3, 1:4] = 7; inst[4:6, 0:2] = 9
    >>> t = instance_targets(inst)
    >>> t.boxes.tolist(), t.ids.tolist(), t.masks.shape
    ([[1.0, 1.0, 3.0, 4.0], [4.0, 0.0, 6.0, 2.0]], [7, 9], torch.Size([2, 6, 5]))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput


@dataclass
class InstanceTargets:
    """The objects of one instance map: ``masks`` (N, *S) bool, ``boxes`` (N, 2 * dims) float, ``labels`` (N,) long
    class indices 1..K-1 (1 when no class map is given), ``ids`` (N,) the instance ids in the map."""

    masks: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


@dataclass
class Instances:
    """Predicted objects of one image: ``masks`` (N, *S) float probabilities on the input's grid, ``scores`` (N,),
    ``labels`` (N,) long class indices 1..K-1, ``boxes`` (N, 2 * dims) float (see the module docstring)."""

    masks: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    @classmethod
    def empty(cls, shape: Sequence[int], device: torch.device | str = "cpu") -> "Instances":
        dims = len(shape)
        return cls(torch.zeros((0, *shape), device=device), torch.zeros(0, device=device),
                   torch.zeros(0, dtype=torch.long, device=device), torch.zeros((0, 2 * dims), device=device))


def instance_targets(instances: torch.Tensor, classes: Optional[torch.Tensor] = None) -> InstanceTargets:
    """The objects of an instance map ``(*S)`` (0 background; ids need not be consecutive).

    ``classes`` ``(*S)``: class indices per voxel; an object's class is the most frequent one under its mask
    (1 for every object when ``None``).
    """
    if instances.dtype.is_floating_point:
        raise MedsegError(f"an instance map holds integer object ids, got dtype {instances.dtype}")
    dims = instances.ndim
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    if ids.numel() == 0:
        return InstanceTargets(torch.zeros((0, *instances.shape), dtype=torch.bool, device=instances.device),
                               torch.zeros((0, 2 * dims), device=instances.device),
                               torch.zeros(0, dtype=torch.long, device=instances.device), ids.long())
    masks = instances[None] == ids.view(-1, *([1] * dims))
    lows, highs = [], []
    for axis in range(dims):  # per axis: where the object projects onto it
        other = tuple(a + 1 for a in range(dims) if a != axis)
        present = masks.any(dim=other) if other else masks
        coords = torch.arange(instances.shape[axis], device=instances.device).expand_as(present)
        lows.append(torch.where(present, coords, instances.shape[axis]).min(dim=1).values)
        highs.append(torch.where(present, coords, -1).max(dim=1).values + 1)
    boxes = torch.stack(lows + highs, dim=1).float()
    if classes is None:
        labels = torch.ones(ids.numel(), dtype=torch.long, device=instances.device)
    else:
        labels = torch.stack([torch.mode(classes[m]).values for m in masks]).long()
    return InstanceTargets(masks, boxes, labels, ids.long())


def instance_map(pred: Instances, mask_threshold: float = 0.5, score_threshold: float = 0.5,
                 min_size: int = 0) -> tuple[np.ndarray, dict[int, float], dict[int, int]]:
    """Predicted objects painted into one instance map ``(*S)`` int32 (ids 1..N in order of decreasing score).

    An object keeps the voxels where its mask probability is above ``mask_threshold`` and no higher-scoring object
    already claimed them; objects scoring below ``score_threshold``, or left with fewer than ``min_size`` voxels, are
    dropped. Returns the map, ``{id: score}`` and ``{id: class index}``.
    """
    shape = tuple(pred.masks.shape[1:])
    out = np.zeros(shape, np.int32)
    scores: dict[int, float] = {}
    classes: dict[int, int] = {}
    order = torch.argsort(pred.scores, descending=True).tolist()
    next_id = 1
    for i in order:
        score = float(pred.scores[i])
        if score < score_threshold:
            break
        mask = (pred.masks[i] > mask_threshold).cpu().numpy() & (out == 0)
        if int(mask.sum()) <= max(min_size - 1, 0):
            continue
        out[mask] = next_id
        scores[next_id], classes[next_id] = score, int(pred.labels[i])
        next_id += 1
    return out, scores, classes


def render_semantic(pred: Instances, num_classes: int, shape: Sequence[int]) -> torch.Tensor:
    """Semantic probabilities ``(num_classes, *S)`` from objects: class k's probability is the highest
    ``score x mask probability`` of its objects at a voxel (background = 1 - the sum, clipped), normalised to sum 1."""
    probs = torch.zeros((num_classes, *shape), device=pred.scores.device)
    for k in range(1, num_classes):
        sel = pred.labels == k
        if bool(sel.any()):
            probs[k] = (pred.masks[sel] * pred.scores[sel].view(-1, *([1] * len(shape)))).amax(dim=0)
    probs[0] = (1 - probs[1:].sum(dim=0)).clamp_min(0)
    return probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-6)


class InstanceModel(SegmentationModel):
    """Base of the instance-segmentation models. ``out_channels`` = number of classes including background
    (2 for one kind of object). Subclasses implement :meth:`training_losses` and :meth:`predict_instances`."""

    task = "instances"

    def training_losses(self, x: torch.Tensor, instances: torch.Tensor,
                        classes: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Loss terms for images ``x`` (B, C, *S) and instance maps ``instances`` (B, 1, *S) long (0 background);
        ``classes`` (B, 1, *S) class indices, or None (one object class). The training loss is their sum."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_instances(self, x: torch.Tensor) -> list[Instances]:
        """Objects per image of ``x`` (B, C, *S), masks on the input's grid."""
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        raise MedsegError(f"{type(self).__name__} is an instance model: it trains on instance maps through "
                          "training_losses(x, instances); set data.target: instances in the pipeline")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log semantic probabilities ``(B, out_channels, *S)`` rendered from :meth:`predict_instances`."""
        shape = tuple(x.shape[2:])
        preds = self.predict_instances(x)
        return torch.stack([render_semantic(p, self.out_channels, shape) for p in preds]).clamp_min(1e-6).log()
