"""HRNetV2 (Sun et al. 2019; Wang et al. 2020) and HRNet + OCR (Yuan, Chen, Wang 2020), any dimension.

HRNet keeps a high-resolution branch through the whole network and adds lower-resolution branches stage by stage,
exchanging information between them at the end of every module:

* stem: two 3x3 stride-2 conv-norm-ReLU (``stem_channels``, 64) -> stride 4;
* stage 1: ``stage1_blocks`` (4) bottleneck blocks (64 -> 256 channels);
* stages 2, 3, 4: 2, 3, 4 branches of widths ``width`` x 1, 2, 4, 8 (strides 4, 8, 16, 32); a new branch is made
  from the coarsest one by a 3x3 stride-2 conv; ``modules`` (1, 4, 3) modules per stage, each with ``blocks`` (4)
  basic blocks per branch and a fusion: every output branch sums all inputs, finer ones brought down by stride-2
  3x3 conv-norm (ReLU between them), coarser ones by 1x1 conv-norm and up-sampling; ReLU;
* HRNetV2 head: the four branches up-sampled to stride 4 and concatenated (15 x ``width`` channels), 1x1
  conv-norm-ReLU, 1x1 classifier, linear x4 up-sampling.

``width=18`` is HRNetV2-W18, ``48`` HRNetV2-W48 (the paper's segmentation model). ``hrnet_ocr`` adds the
object-contextual representations head of Yuan et al.: soft object regions from an auxiliary head on the
concatenated features (1x1 conv-norm-ReLU, 1x1 to the classes), a 3x3 conv-norm-ReLU to ``ocr_channels`` (512),
:class:`~medseg.models.blocks.ObjectContext` with ``key_channels`` (256), 1x1 classifier. The soft regions are
supervised in the paper (auxiliary loss weight 0.4): with ``deep_supervision=True`` (default for ``hrnet_ocr``)
``forward_train`` returns them, up-sampled to the input, as the auxiliary output, used when the pipeline sets
``loss.deep_supervision: true`` (medseg weighs main and auxiliary 2/3 and 1/3 instead of 1 and 0.4).

Differences: trained from scratch (the papers pre-train on ImageNet); up-sampling is linear everywhere.

Shapes: ``x: (B, in_channels, *S) -> (B, out_channels, *S)``, each axis a multiple of 32.

Example:
    >>> import torch
    >>> from medseg.models import create_model
    >>> net = create_model("hrnet", 2, 3, 2, width=4, stem_channels=8, blocks=1, modules=(1, 1, 1), stage1_blocks=1)
    >>> net(torch.zeros(1, 3, 64, 96)).shape
    torch.Size([1, 2, 64, 96])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.models.base import SegmentationModel, TrainOutput
from medseg.models.blocks import Bottleneck, ConvNormAct, ObjectContext, conv, interpolate, norm as make_norm
from medseg.models.pspnet import BasicBlock
from medseg.models.registry import register

PAPER = ("Wang et al. 2020, Deep High-Resolution Representation Learning for Visual Recognition (HRNetV2, TPAMI; "
         "Sun et al. 2019, CVPR)")
PAPER_OCR = "Yuan, Chen, Wang 2020, Object-Contextual Representations for Semantic Segmentation (ECCV), on HRNetV2"


class HRModule(nn.Module):
    """Parallel branches of basic blocks and the multi-resolution fusion. ``xs``: one tensor per branch, finest first."""

    def __init__(self, dims: int, widths: Sequence[int], blocks: int, norm: Optional[str]):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(*[BasicBlock(dims, w, w, 1, 1, norm) for _ in range(blocks)])
                                       for w in widths])
        self.fuse = nn.ModuleList()
        for i, wi in enumerate(widths):
            row = nn.ModuleList()
            for j, wj in enumerate(widths):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # coarser: 1x1 conv-norm, up-sampled in forward
                    row.append(nn.Sequential(conv(dims, wj, wi, 1, bias=False), make_norm(norm, dims, wi)))
                else:  # finer: (i - j) stride-2 3x3 convs
                    steps = [ConvNormAct(dims, wj, wj, 3, 2, norm=norm) for _ in range(i - j - 1)]
                    steps.append(nn.Sequential(conv(dims, wj, wi, 3, 2, bias=False), make_norm(norm, dims, wi)))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [b(x) for b, x in zip(self.branches, xs)]
        outs = []
        for i, row in enumerate(self.fuse):
            total = xs[i]
            for j, f in enumerate(row):
                if j != i:
                    y = f(xs[j])
                    total = total + (interpolate(y, xs[i].shape[2:]) if y.shape[2:] != xs[i].shape[2:] else y)
            outs.append(F.relu(total))
        return outs


class HRNetBackbone(nn.Module):
    """Stem, stage 1 and stages 2-4; ``forward`` gives the four branches concatenated at stride 4 (15 x width)."""

    def __init__(self, dims: int, in_channels: int, width: int = 18, stem_channels: int = 64, stage1_blocks: int = 4,
                 blocks: int = 4, modules: Sequence[int] = (1, 4, 3), norm: Optional[str] = "batch"):
        super().__init__()
        if len(modules) != 3:
            raise MedsegError(f"hrnet: modules needs 3 entries (stages 2, 3, 4), got {list(modules)}")
        s = stem_channels
        self.stem = nn.Sequential(ConvNormAct(dims, in_channels, s, 3, 2, norm=norm), ConvNormAct(dims, s, s, 3, 2, norm=norm))
        self.stage1 = nn.Sequential(*[Bottleneck(dims, s if i == 0 else 4 * s, s, 1, norm) for i in range(stage1_blocks)])
        widths = [width * 2 ** i for i in range(4)]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev = [4 * s]
        for k, n_modules in enumerate(modules):
            cur = widths[: k + 2]
            trans = nn.ModuleList()
            for i, w in enumerate(cur):
                if i < len(prev):
                    trans.append(nn.Identity() if prev[i] == w else ConvNormAct(dims, prev[i], w, 3, norm=norm))
                else:  # a new, coarser branch from the coarsest existing one
                    trans.append(ConvNormAct(dims, prev[-1], w, 3, 2, norm=norm))
            self.transitions.append(trans)
            self.stages.append(nn.Sequential(*[HRModule(dims, cur, blocks, norm) for _ in range(n_modules)]))
            prev = cur
        self.out_channels = sum(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.stage1(self.stem(x))]
        for trans, stage in zip(self.transitions, self.stages):
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(trans)]
            for module in stage:
                xs = module(xs)
        size = xs[0].shape[2:]
        return torch.cat([xs[0]] + [interpolate(v, size) for v in xs[1:]], 1)


class HRNet(SegmentationModel):
    """HRNetV2 segmentation network. Width ``width`` (18: W18; 48: the paper's W48); depth ``modules``, ``blocks``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int = 18, stem_channels: int = 64,
                 stage1_blocks: int = 4, blocks: int = 4, modules: Sequence[int] = (1, 4, 3), norm: Optional[str] = "batch"):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims = spatial_dims
        self.set_size_rule(32, "4 branches, stride 32")
        self.backbone = HRNetBackbone(dims, in_channels, width, stem_channels, stage1_blocks, blocks, modules, norm)
        c = self.backbone.out_channels
        self.head = nn.Sequential(ConvNormAct(dims, c, c, 1, norm=norm), conv(dims, c, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return interpolate(self.head(self.backbone(x)), x.shape[2:])


class HRNetOCR(SegmentationModel):
    """HRNetV2 + OCR. ``ocr_channels`` (512), ``key_channels`` (256); ``deep_supervision`` returns the soft object
    regions as auxiliary output in ``forward_train``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, width: int = 18, stem_channels: int = 64,
                 stage1_blocks: int = 4, blocks: int = 4, modules: Sequence[int] = (1, 4, 3), norm: Optional[str] = "batch",
                 ocr_channels: int = 512, key_channels: int = 256, deep_supervision: bool = True):
        super().__init__(spatial_dims, in_channels, out_channels)
        dims = spatial_dims
        self.set_size_rule(32, "4 branches, stride 32")
        self.deep_supervision = bool(deep_supervision)
        self.backbone = HRNetBackbone(dims, in_channels, width, stem_channels, stage1_blocks, blocks, modules, norm)
        c = self.backbone.out_channels
        self.regions = nn.Sequential(ConvNormAct(dims, c, c, 1, norm=norm), conv(dims, c, out_channels, 1))
        self.reduce = ConvNormAct(dims, c, ocr_channels, 3, norm=norm)
        self.ocr = ObjectContext(dims, ocr_channels, key_channels, norm)
        self.head = conv(dims, ocr_channels, out_channels, 1)

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        f = self.backbone(x)
        regions = self.regions(f)
        return self.head(self.ocr(self.reduce(f), regions)), regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return interpolate(self._logits(x)[0], x.shape[2:])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        seg, regions = self._logits(x)
        aux = (interpolate(regions, x.shape[2:]),) if self.deep_supervision else ()
        return TrainOutput(interpolate(seg, x.shape[2:]), aux)


TINY = {"width": 2, "stem_channels": 4, "blocks": 1, "modules": (1, 1, 1), "stage1_blocks": 1}


@register("hrnet", (2, 3), PAPER, test_kwargs=TINY)
def hrnet(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> HRNet:
    return HRNet(spatial_dims, in_channels, out_channels, **kwargs)


@register("hrnet_ocr", (2, 3), PAPER_OCR, test_kwargs={**TINY, "ocr_channels": 8, "key_channels": 4},
          test_variants=({}, {"deep_supervision": False}))
def hrnet_ocr(spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> HRNetOCR:
    return HRNetOCR(spatial_dims, in_channels, out_channels, **kwargs)
