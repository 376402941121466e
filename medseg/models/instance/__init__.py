"""Instance segmentation: models that give one mask per object (Mask R-CNN, a YOLACT-style prototype head).

See :mod:`medseg.models.instance.base` for the contract shared with the trainer and ``medseg predict``.
"""
from medseg.models.instance.base import (InstanceModel, Instances, InstanceTargets, instance_map, instance_targets,
                                         render_semantic)
from medseg.models.instance import yolact  # noqa: F401
from medseg.models.instance import maskrcnn  # noqa: F401

__all__ = ["InstanceModel", "Instances", "InstanceTargets", "instance_map", "instance_targets", "render_semantic"]
