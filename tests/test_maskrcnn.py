"""Mask R-CNN (``maskrcnn``) and its parts: RoIAlign against hand-computed values, the FPN level rule, mask pasting,
IoU matching / sampling / NMS (MONAI as the reference), the instance-model contract and a short training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data.box_utils import batched_nms as monai_batched_nms
from monai.data.box_utils import non_max_suppression

from medseg.errors import MedsegError
from medseg.models import build_from_config, create_model, model_config
from medseg.models.instance.base import instance_map
from medseg.models.instance.detection import (BACKGROUND, IGNORED, batched_nms, box_iou, clip_boxes, match_by_iou,
                                              nms, remove_small_boxes, sample_balanced)
from medseg.models.instance.maskrcnn import RPN, mask_targets
from medseg.models.instance.roi import box_levels, multilevel_roi_align, paste_masks, roi_align, roi_align_per_box

TINY = dict(base_channels=4, blocks=(1, 1, 1, 1), fpn_channels=8, box_width=16, mask_channels=8, mask_convs=1,
            rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50), roi_batch=64, max_instances=20)


def ramp(shape, slopes=(2.0, 0.5), offset=3.0):
    """Value ``offset + sum(slope_a * index_a)`` at every cell (indices of cell centres)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return offset + sum(k * g for k, g in zip(slopes, grids))


# ---------------------------------------------------------------- RoIAlign
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_is_exact_on_a_ramp(aligned):
    """Bilinear sampling of a linear function is exact, so each bin's mean is the ramp at the bin centre: with
    ``aligned`` the continuous feature coordinate f is read at index f - 0.5, without it at f."""
    feats = ramp((20, 30))[None, None]
    box = torch.tensor([[6.4, 8.2, 23.4, 38.6]])  # image voxels; stride 2 -> feature box (3.2, 4.1, 11.7, 19.3)
    out = roi_align(feats, [box], (3, 5), spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    centre0 = 3.2 + (torch.arange(3) + 0.5) * (11.7 - 3.2) / 3
    centre1 = 4.1 + (torch.arange(5) + 0.5) * (19.3 - 4.1) / 5
    shift = 0.5 if aligned else 0.0
    expected = 3.0 + 2.0 * (centre0[:, None] - shift) + 0.5 * (centre1[None] - shift)
    assert out.shape == (1, 1, 3, 5)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-4, rtol=0)


def test_roi_align_whole_image_box():
    feats = torch.randn(2, 3, 8, 12)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 12.0]])] * 2
    # one sample per bin at every cell centre: the map itself; 2x2 samples per 2x2-cell bin: average pooling
    torch.testing.assert_close(roi_align(feats, boxes, (8, 12), sampling_ratio=1), feats)
    torch.testing.assert_close(roi_align(feats, boxes, (4, 6), sampling_ratio=2), F.avg_pool2d(feats, 2))
    # a stride-4 map of a 32 x 48 image, and the same in 3D
    torch.testing.assert_close(roi_align(feats, [b * 4 for b in boxes], (8, 12), 0.25, sampling_ratio=1), feats)
    vol = torch.randn(1, 2, 4, 6, 8)
    torch.testing.assert_close(roi_align(vol, [torch.tensor([[0.0, 0, 0, 4, 6, 8]])], (2, 3, 4)), F.avg_pool3d(vol, 2))


def test_roi_align_per_box_and_several_boxes():
    feats = ramp((16, 16))[None, None]
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 4.0, 10.0, 8.0]])
    shared = roi_align(feats, [boxes], 4)
    per_box = roi_align_per_box(feats.expand(2, 1, 16, 16), boxes, 4)
    torch.testing.assert_close(shared, per_box)
    assert not torch.allclose(shared[0], shared[1])


def test_box_levels_follow_the_fpn_rule():
    sizes = torch.tensor([5.0, 14.0, 27.0, 28.0, 56.0, 111.0, 112.0, 500.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sizes, sizes], dim=1)
    # floor(4 + log2(s / 56)) clamped to levels 2..5, as indices from level 2
    assert box_levels(boxes, 4).tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert box_levels(boxes, 4, canonical_size=224).tolist() == [0, 0, 0, 0, 0, 0, 1, 3]


def test_multilevel_roi_align_reads_each_box_on_its_level():
    feats = [torch.randn(2, 3, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0], [3.0, 3.0, 13.0, 15.0]]), torch.tensor([[10.0, 20.0, 40.0, 48.0]])]
    out = multilevel_roi_align(feats, (4, 8, 16, 32), boxes, 7)
    assert out.shape == (3, 3, 7, 7)
    expected = [roi_align(feats[2][:1], [boxes[0][:1]], 7, 1 / 16), roi_align(feats[0][:1], [boxes[0][1:]], 7, 1 / 4),
                roi_align(feats[1][1:], [boxes[1]], 7, 1 / 8)]
    torch.testing.assert_close(out, torch.cat(expected))


def test_paste_masks_fills_the_box_only():
    masks = torch.ones(2, 28, 28)
    boxes = torch.tensor([[2.0, 3.0, 9.0, 10.0], [4.5, 0.0, 7.5, 40.0]])  # the second leaves the image
    out = paste_masks(masks, boxes, (12, 11))
    expected = torch.zeros(2, 12, 11)
    expected[0, 2:9, 3:10] = 1
    expected[1, 4:7, :] = 1  # voxel centres 4.5, 5.5, 6.5 lie in [4.5, 7.5)
    torch.testing.assert_close(out, expected)
    # pasting and reading back a smooth mask gives it again (RoIAlign is the inverse)
    smooth = ramp((28, 28), (0.01, 0.02), 0.1)[None]
    box = torch.tensor([[8.0, 4.0, 64.0, 60.0]])
    back = roi_align_per_box(paste_masks(smooth, box, (70, 70))[:, None], box, 28, sampling_ratio=1)
    torch.testing.assert_close(back[0, 0, 1:-1, 1:-1], smooth[0, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_mask_targets_crop_the_matched_object_into_its_box():
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 4:12, 6:30] = True  # a bar
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    masks[1] = (yy - 25.5) ** 2 + (xx - 20.5) ** 2 <= 36  # a disc of radius 6 filling its box (20, 15, 32, 27)
    rois = torch.tensor([[20.0, 15.0, 32.0, 27.0], [2.0, 6.0, 14.0, 30.0]])
    t = mask_targets(masks, torch.tensor([1, 0]), rois, (28, 28))
    disc = ((torch.arange(28)[:, None] + 0.5) / 28 - 0.5) ** 2 + ((torch.arange(28)[None] + 0.5) / 28 - 0.5) ** 2
    assert (t[0] != (disc <= 0.25).float()).float().mean() < 0.03  # the disc fills its box
    assert t[1, :4].sum() == 0 and t[1, -4:].sum() == 0 and t[1, 6:22].min() == 1  # the bar: rows 4..12 of 2..14


# ---------------------------------------------------------------- matching, sampling, NMS
def test_match_by_iou_rules():
    iou = torch.tensor([[0.8, 0.1], [0.5, 0.2], [0.1, 0.25], [0.05, 0.0]])
    assert match_by_iou(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, IGNORED, BACKGROUND, BACKGROUND]
    # ground truth 1 has no candidate above 0.3: its best one (0.25) becomes positive
    assert match_by_iou(iou, 0.7, 0.3).tolist() == [0, IGNORED, 1, BACKGROUND]
    assert match_by_iou(torch.zeros(3, 0), 0.7, 0.3).tolist() == [BACKGROUND] * 3


def test_rpn_anchor_matching_gives_every_object_its_best_anchor():
    rpn = RPN(2, 4, (8, 16, 32, 64), (0.5, 1.0, 2.0))
    image = torch.zeros(1, 1, 64, 64)
    anchors, counts = rpn.anchors(image, [torch.zeros(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)])
    assert counts == [16 * 16 * 3, 8 * 8 * 3, 4 * 4 * 3, 2 * 2 * 3] and anchors.shape == (sum(counts), 4)
    gt = torch.tensor([[10.0, 10.0, 13.0, 12.0], [30.0, 20.0, 58.0, 50.0]])  # a tiny object and a large one
    iou = box_iou(anchors, gt)
    matches = match_by_iou(iou, 0.7, 0.3)
    assert iou[:, 0].max() < 0.3  # the tiny object overlaps no anchor enough ...
    for g in range(2):  # ... yet its best anchor is positive for it
        assert matches[iou[:, g].argmax()] == g
    assert set(matches[matches >= 0].tolist()) == {0, 1}


def test_rpn_outputs_line_up_with_the_anchors():
    """Output i of the RPN belongs to anchor i: position-major (row-major over the map), anchor shape minor."""
    rpn = RPN(2, 1, (8, 16, 32, 64), (0.5, 1.0, 2.0))
    with torch.no_grad():  # the shared conv passes the map through; the heads add a per-(shape, coordinate) constant
        rpn.conv.weight.zero_()
        rpn.conv.weight[0, 0, 1, 1] = 1
        rpn.objectness.weight.fill_(1)
        rpn.objectness.bias.copy_(1000 * torch.arange(3.0))
        rpn.deltas.weight.fill_(1)
        rpn.deltas.bias.copy_(1000 * torch.arange(12.0))
    feat = torch.arange(1.0, 1 + 4 * 6).view(1, 1, 4, 6)  # value p + 1 at position p
    logits, deltas = rpn([feat])
    position = torch.arange(1.0, 25).view(24, 1)
    torch.testing.assert_close(logits.view(24, 3), position + 1000 * torch.arange(3.0))
    torch.testing.assert_close(deltas.view(24, 3, 4), position[:, :, None] + 1000 * torch.arange(12.0).view(3, 4))
    rpn2 = RPN(2, 1, (8,), (0.5, 1.0, 2.0))
    anchors, _ = rpn2.anchors(torch.zeros(1, 1, 16, 24), [feat])
    centres = (anchors[:, :2] + anchors[:, 2:]).view(24, 3, 2) / 2
    expected = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1).view(24, 1, 2) * 4 + 2
    torch.testing.assert_close(centres, expected.expand(24, 3, 2))


def test_sample_balanced_respects_the_budget():
    matches = torch.tensor([0] * 10 + [BACKGROUND] * 100 + [IGNORED] * 5)
    torch.manual_seed(0)
    pos, neg = sample_balanced(matches, 16, 0.25)
    assert len(pos) == 4 and len(neg) == 12 and (matches[pos] >= 0).all() and (matches[neg] == BACKGROUND).all()
    pos, neg = sample_balanced(torch.full((5,), BACKGROUND), 16, 0.5)
    assert len(pos) == 0 and len(neg) == 5


def test_nms_matches_monai():
    g = torch.Generator().manual_seed(0)
    corner = torch.rand(300, 2, generator=g) * 60
    boxes = torch.cat([corner, corner + 3 + torch.rand(300, 2, generator=g) * 20], dim=1)
    scores, groups = torch.rand(300, generator=g), torch.randint(0, 3, (300,), generator=g)
    assert torch.equal(nms(boxes, scores, 0.5), non_max_suppression(boxes, scores, 0.5))
    assert torch.equal(nms(boxes, scores, 0.3, 10), non_max_suppression(boxes, scores, 0.3, 10))
    assert torch.equal(batched_nms(boxes, scores, groups, 0.5, 40), monai_batched_nms(boxes, scores, groups, 0.5, 40))
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_clip_and_small_boxes():
    boxes = torch.tensor([[-3.0, 2.0, 5.0, 70.0], [10.0, 10.0, 10.5, 20.0]])
    torch.testing.assert_close(clip_boxes(boxes, (32, 64)), torch.tensor([[0.0, 2.0, 5.0, 64.0], [10, 10, 10.5, 20]]))
    assert remove_small_boxes(boxes, 1.0).tolist() == [0]


# ---------------------------------------------------------------- the model
def discs(batch: int, size: int, seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 1, size, size) of bright discs on noise and their instance maps (B, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inst = torch.zeros(batch, 1, size, size, dtype=torch.long)
    for b in range(batch):
        for i in range(n):
            r = 4 + float(torch.rand(1, generator=g)) * 5
            c = 10 + torch.rand(2, generator=g) * (size - 20)
            inst[b, 0][(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r] = 2 * i + 3  # ids need not be consecutive
    x = (inst > 0).float() + 0.1 * torch.randn(batch, 1, size, size, generator=g)
    return x, inst


def test_predict_contract_on_an_odd_size():
    torch.manual_seed(0)
    net = create_model("maskrcnn", spatial_dims=2, in_channels=2, out_channels=3, **TINY).eval()
    x = torch.rand(2, 2, 45, 71)
    preds = net.predict_instances(x)
    assert len(preds) == 2
    for p in preds:
        assert 0 < len(p) <= 20 and p.masks.shape == (len(p), 45, 71)
        assert (p.scores[:-1] >= p.scores[1:]).all() and p.scores.min() >= 0 and p.scores.max() <= 1
        assert p.labels.min() >= 1 and p.labels.max() <= 2
        assert p.masks.min() >= 0 and p.masks.max() <= 1
        assert (p.boxes[:, :2] >= 0).all() and (p.boxes[:, 2] <= 45).all() and (p.boxes[:, 3] <= 71).all()
    logp = net(x)
    assert logp.shape == (2, 3, 45, 71) and torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(dim=1), torch.ones(2, 45, 71), atol=1e-4, rtol=0)


def test_config_round_trip_gives_the_same_predictions():
    torch.manual_seed(1)
    net = create_model("maskrcnn", spatial_dims=2, in_channels=1, out_channels=2, **TINY).eval()
    twin = build_from_config(model_config(net))
    twin.load_state_dict(net.state_dict())
    twin.eval()
    x, _ = discs(1, 64, seed=3)
    a, b = net.predict_instances(x)[0], twin.predict_instances(x)[0]
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)


def test_training_lowers_the_loss_and_finds_the_discs(one_thread):
    torch.manual_seed(0)
    net = create_model("maskrcnn", spatial_dims=2, in_channels=1, out_channels=2,
                       **{**TINY, "base_channels": 8, "fpn_channels": 16, "mask_channels": 16, "box_width": 128})
    x, inst = discs(4, 64, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(80):
        losses = net.training_losses(x, inst)
        assert sorted(losses) == ["box_class", "box_reg", "mask", "rpn_box", "rpn_objectness"]
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.7 * history[0], history
    # the objects it was trained on are found and outlined: Dice of the painted instance map vs the truth
    net.eval()
    for pred, truth in zip(net.predict_instances(x), inst[:, 0].numpy() > 0):
        found = instance_map(pred)[0] > 0
        assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.85


def test_an_image_without_objects_gives_finite_losses():
    torch.manual_seed(0)
    net = create_model("maskrcnn", spatial_dims=2, in_channels=1, out_channels=2, **TINY)
    x, inst = discs(2, 64, seed=1)
    inst[1] = 0
    for maps in (inst, torch.zeros_like(inst)):  # one empty image, then a batch with no object at all
        losses = net.training_losses(x, maps)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        net.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert losses["rpn_box"] == 0 and losses["box_reg"] == 0 and losses["mask"] == 0


def test_class_maps_give_each_object_its_class():
    torch.manual_seed(0)
    net = create_model("maskrcnn", spatial_dims=2, in_channels=1, out_channels=3, **TINY)
    x, inst = discs(2, 64, seed=4)
    classes = torch.where(inst > 0, 1 + (inst == 5).long(), 0)  # the second disc of each image is class 2
    losses = net.training_losses(x, inst, classes)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["mask"] > 0


def test_bad_arguments_are_refused():
    net = create_model("maskrcnn", spatial_dims=2, in_channels=1, out_channels=2, **TINY)
    with pytest.raises(MedsegError, match="instance maps"):
        net.training_losses(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 32, 64, dtype=torch.long))
    x, inst = discs(1, 64, seed=2)
    with pytest.raises(MedsegError, match="class"):  # a class map naming class 2 for a 2-class model
        net.training_losses(x, inst, classes=2 * (inst > 0).long())
    with pytest.raises(MedsegError, match="input channel"):
        net.predict_instances(torch.zeros(1, 3, 64, 64))
    with pytest.raises(MedsegError, match="anchor_sizes"):
        create_model("maskrcnn", spatial_dims=2, anchor_sizes=(8, 16))
    with pytest.raises(TypeError, match="unknown argument"):
        create_model("maskrcnn", spatial_dims=2, anchor_size=(8, 16, 32, 64))
    with pytest.raises(MedsegError, match="spatial_dims"):
        create_model("maskrcnn", spatial_dims=3)
