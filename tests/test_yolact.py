"""The YOLACT-style instance model: output contract, mask assembly, matching and mining by hand, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.models import build_from_config, create_model, model_config
from medseg.models.instance import instance_map, instance_targets
from medseg.models.instance.detection import BACKGROUND, IGNORED
from medseg.models.instance.yolact import assemble_masks, box_mask, hard_negatives, mask_logits, mask_positives

TINY = {"base_channels": 4, "blocks": (1, 1, 1, 1), "fpn_channels": 8, "prototypes": 4, "proto_channels": 8}
SMALL = {"base_channels": 8, "blocks": (1, 1, 1, 1), "fpn_channels": 16, "prototypes": 8, "proto_channels": 16}


def _net(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_model("yolact", spatial_dims=2, in_channels=1, out_channels=2, **{**TINY, **kwargs})


def _discs(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with 3 bright discs of radius 4..8 each, and their instance maps ``(n, 1, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, maps = [], []
    for _ in range(n):
        img, inst = torch.zeros(size, size), torch.zeros(size, size, dtype=torch.long)
        for k in range(3):
            r = int(torch.randint(4, 9, (1,), generator=g))
            cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            inst[disc & (inst == 0)] = k + 1
            img[disc] = 1.0
        images.append(img + 0.1 * torch.randn(size, size, generator=g))
        maps.append(inst)
    return torch.stack(images)[:, None], torch.stack(maps)[:, None]


def test_predict_instances_contract_on_an_odd_size() -> None:
    net = _net().eval()
    x = torch.randn(2, 1, 45, 37)
    preds = net.predict_instances(x)
    assert len(preds) == 2 and sum(len(p) for p in preds) > 0  # untrained: many low scores pass 0.05
    for p in preds:
        n = len(p)
        assert p.masks.shape == (n, 45, 37) and p.boxes.shape == (n, 4) and p.labels.shape == (n,)
        assert n <= 300 and bool(((p.scores >= 0) & (p.scores <= 1)).all())
        assert bool((p.labels == 1).all())
        assert bool((p.boxes[:, :2] >= 0).all())
        assert bool((p.boxes[:, 2] <= 45).all()) and bool((p.boxes[:, 3] <= 37).all())
        assert bool((p.boxes[:, 2:] > p.boxes[:, :2]).all())
        assert bool((p.masks[~box_mask(p.boxes, (45, 37))] == 0).all())  # masks are cropped to their box
        assert bool(((p.masks >= 0) & (p.masks <= 1)).all())


def test_forward_gives_log_probabilities() -> None:
    net = _net().eval()
    out = net(torch.randn(2, 1, 33, 50))
    assert out.shape == (2, 2, 33, 50) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(2, 33, 50), atol=1e-4, rtol=0)


def test_mask_assembly_is_prototypes_times_coefficients_cropped_to_the_box() -> None:
    protos = torch.stack([torch.ones(4, 5), torch.arange(20.0).view(4, 5)])  # k = 2 prototypes at the image size
    coefs = torch.tensor([[1.0, 0.5], [-1.0, 0.0]])
    boxes = torch.tensor([[1.0, 1.0, 3.0, 4.0], [0.0, 0.0, 4.0, 5.0]])
    masks = assemble_masks(protos, coefs, boxes, (4, 5))
    expected = torch.zeros(2, 4, 5)
    for i in range(4):
        for j in range(5):
            if 1 <= i < 3 and 1 <= j < 4:
                expected[0, i, j] = torch.sigmoid(torch.tensor(1.0 + 0.5 * (5 * i + j)))
            expected[1, i, j] = torch.sigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(masks, expected)
    # prototypes at a coarser grid are up-sampled (bilinearly, a linear map) before the product
    coarse = torch.randn(3, 4, 6)
    c = torch.randn(2, 3)
    up = F.interpolate(coarse[None], size=(8, 12), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(mask_logits(coarse, c, (8, 12)), torch.einsum("nk,khw->nhw", c, up))


class _Code(torch.nn.Module):
    """Stands in for the class branch: per anchor shape a, channel 0 = 10000 a + 100 row + column, channel 1 = the
    level (read from the feature map's value)."""

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        a, h, w = torch.meshgrid(torch.arange(3), torch.arange(feat.shape[2]), torch.arange(feat.shape[3]),
                                 indexing="ij")
        code = torch.stack([10000 * a + 100 * h + w, torch.full_like(a, int(feat[0, 0, 0, 0]))], dim=1).float()
        return code.reshape(1, 6, *feat.shape[2:]).expand(feat.shape[0], -1, -1, -1)


def test_head_outputs_follow_the_anchor_order() -> None:
    net = _net()
    net.head.shared, net.head.cls = torch.nn.Identity(), _Code()
    x = torch.zeros(2, 1, 64, 96)
    levels = [torch.full((2, 8, 64 // 2 ** k, 96 // 2 ** k), float(k)) for k in (2, 3, 4, 5)]
    cls = net.head(levels)[0]
    anchors = net.anchor_generator(x, levels)[0]
    assert cls.shape == (2, anchors.shape[0], 2)
    extent = anchors[:, 2:] - anchors[:, :2]
    level = torch.round(torch.log2(extent.prod(dim=1).sqrt() / 8)).long() + 2  # sizes 8, 16, 32, 64 on P2..P5
    stride = 2 ** level
    row, col = ((anchors[:, :2] + anchors[:, 2:]) / 2 - (stride // 2)[:, None]).div(stride[:, None]).unbind(1)
    # aspect ratios 0.5, 1, 2 (w:h = 1:r): wider, square, taller along axis 0
    shape = torch.where(extent[:, 0] > extent[:, 1], 0, torch.where(extent[:, 0] == extent[:, 1], 1, 2))
    torch.testing.assert_close(cls[1, :, 1], level.float())
    torch.testing.assert_close(cls[1, :, 0], (10000 * shape + 100 * row + col).float())


def test_hard_negative_mining_keeps_three_negatives_per_positive() -> None:
    loss = torch.tensor([9.0, 9.0, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0, 0.5, 0.1, 100.0])
    state = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1])  # 2 positives, 10 negatives, 1 ignored
    keep = hard_negatives(loss, state == 0, num_positive=2, ratio=3.0)
    assert sorted(keep.nonzero()[:, 0].tolist()) == [2, 4, 6, 7, 8, 9]  # the 6 largest negative losses 8..3
    keep = hard_negatives(loss, state == 0, num_positive=0, ratio=3.0)  # no objects: as if one positive
    assert sorted(keep.nonzero()[:, 0].tolist()) == [2, 4, 6]
    keep = hard_negatives(loss, state == 0, num_positive=5, ratio=3.0)  # fewer negatives than asked: all of them
    assert int(keep.sum()) == 10 and not bool(keep[[0, 1, 12]].any())


def test_class_loss_sums_positives_and_mined_negatives() -> None:
    net = _net()
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 3.0], [0.0, 1.0], [0.0, -2.0], [0.0, 5.0]])
    target = torch.tensor([1, 0, 0, 0, 0, 0])
    matches = torch.tensor([0, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND, IGNORED])
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = ce[0] + ce[2] + ce[3] + ce[1]  # 3 hardest negatives: rows 2 (bg logit 0 vs 3), 3, 1; row 5 is ignored
    torch.testing.assert_close(net._class_loss(logits, target, matches), expected)


def test_mask_positives_cover_every_object_before_second_anchors() -> None:
    objects = torch.tensor([0, 0, 0, 1, 1, 2])
    iou = torch.tensor([0.6, 0.9, 0.7, 0.55, 0.8, 0.5])
    assert mask_positives(objects, iou, 3).tolist() == [1, 4, 5]
    assert mask_positives(objects, iou, 5).tolist() == [1, 4, 5, 2, 3]


def test_mask_loss_counts_only_pixels_in_the_box_normalised_by_its_area() -> None:
    net = _net()
    inst = torch.zeros(16, 16, dtype=torch.long)
    inst[3:7, 4:9] = 1
    inst[10:12, 10:15] = 2
    t = instance_targets(inst)
    protos = torch.randn(4, 16, 16)
    coefs = torch.randn(2, 4)
    objects = torch.tensor([0, 1])
    loss = net._mask_loss(protos, coefs, t, objects)
    logits = mask_logits(protos, coefs, (16, 16))
    bce = F.binary_cross_entropy_with_logits(logits, t.masks.float(), reduction="none")
    torch.testing.assert_close(loss, bce[0, 3:7, 4:9].mean() + bce[1, 10:12, 10:15].mean())
    changed = protos.clone()
    changed[:, 0:2, :] = 50.0  # outside both boxes
    torch.testing.assert_close(net._mask_loss(changed, coefs, t, objects), loss)


def test_config_round_trip_gives_the_same_predictions() -> None:
    net = _net(score_threshold=0.1, max_instances=50).eval()
    twin = build_from_config(model_config(net))
    twin.load_state_dict(net.state_dict())
    twin.eval()
    x = torch.randn(1, 1, 40, 70)
    a, b = net.predict_instances(x)[0], twin.predict_instances(x)[0]
    assert len(a) > 0 and len(a) <= 50
    for name in ("masks", "scores", "labels", "boxes"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_training_lowers_the_loss_and_finds_the_discs(one_thread) -> None:
    x, inst = _discs(4)
    torch.manual_seed(0)
    net = create_model("yolact", spatial_dims=2, in_channels=1, out_channels=2, **SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        losses = net.training_losses(x, inst)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    assert set(losses) == {"class", "box", "mask", "semantic"}
    assert np.mean(history[-5:]) < 0.7 * history[0] and np.mean(history[35:40]) < 0.7 * history[0]
    preds = net.eval().predict_instances(x)
    for p, gt in zip(preds, inst[:, 0].numpy()):
        assert int((p.scores > 0.5).sum()) == 3  # one confident detection per disc: NMS removed the duplicates
        found, _, _ = instance_map(p, score_threshold=0.3)
        for i in range(1, 4):  # every disc is matched by a predicted object with mask IoU > 0.7
            g = gt == i
            best = max(((found == j) & g).sum() / ((found == j) | g).sum() for j in range(1, found.max() + 1))
            assert best > 0.7


@pytest.mark.parametrize("class_loss", ["ohem", "focal"])
def test_images_without_objects_give_finite_losses_and_gradients(class_loss: str) -> None:
    net = _net(class_loss=class_loss).train()
    x = torch.randn(2, 1, 64, 48)
    inst = torch.zeros(2, 1, 64, 48, dtype=torch.long)
    inst[1, 0, 5:15, 20:30] = 3  # one image empty, one with an object
    for maps in (inst, torch.zeros_like(inst)):
        losses = net.training_losses(x, maps)
        assert all(bool(torch.isfinite(v)) for v in losses.values())
        sum(losses.values()).backward()
    assert losses["class"] > 0  # the empty batch still trains the background
    preds = net.eval().predict_instances(x)
    assert all(bool(((p.scores >= 0) & (p.scores <= 1)).all()) for p in preds)


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(MedsegError, match="one size per level"):
        _net(levels=(3, 4, 5))
    with pytest.raises(MedsegError, match="class_loss"):
        _net(class_loss="focall")
    with pytest.raises(TypeError):
        _net(prototype=8)
    net = _net()
    with pytest.raises(MedsegError, match="instance maps"):
        net.training_losses(torch.randn(1, 1, 32, 32), torch.zeros(1, 1, 32, 30, dtype=torch.long))
    with pytest.raises(MedsegError, match="out_channels"):
        classes = torch.full((1, 1, 32, 32), 2, dtype=torch.long)
        inst = torch.zeros(1, 1, 32, 32, dtype=torch.long)
        inst[0, 0, 4:9, 4:9] = 1
        net.training_losses(torch.randn(1, 1, 32, 32), inst, classes)  # refused before the forward pass
