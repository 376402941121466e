"""Losses: every registered loss against MONAI built directly, hand-computed values, deep supervision, AMP."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from medseg.errors import MedsegError
from medseg.losses import LOSSES, TARGETS, DeepSupervisionLoss, create_loss, downsample_target, loss_names, register

S = 1e-5  # smoothing in numerator and denominator


def _valid_pairs() -> list[tuple[str, str]]:
    pairs = []
    for name in loss_names():
        for target in TARGETS:
            try:
                create_loss(name, target)
            except MedsegError:
                continue
            pairs.append((name, target))
    return pairs


PAIRS = _valid_pairs()


def _monai_region_dice_bce():
    dice, bce = DiceLoss(sigmoid=True, include_background=True, batch=False, smooth_nr=S, smooth_dr=S), torch.nn.BCEWithLogitsLoss()
    return lambda x, y: dice(x, y) + bce(x, y)


def _reference(name: str, target: str):
    """The MONAI loss built directly for a (name, target) pair."""
    softmax = dict(softmax=True, to_onehot_y=True, include_background=False, batch=False, smooth_nr=S, smooth_dr=S)
    refs = {
        ("dice", "labels"): lambda: DiceLoss(**softmax),
        ("dice", "regions"): lambda: DiceLoss(sigmoid=True, include_background=True, batch=False, smooth_nr=S, smooth_dr=S),
        ("dice_ce", "labels"): lambda: DiceCELoss(**softmax, lambda_dice=1.0, lambda_ce=1.0),
        ("region_dice_bce", "regions"): _monai_region_dice_bce,
        ("dice_squared", "labels"): lambda: DiceLoss(**softmax, squared_pred=True),
        ("dice_squared", "regions"): lambda: DiceLoss(sigmoid=True, include_background=True, batch=False, smooth_nr=S,
                                                      smooth_dr=S, squared_pred=True),
    }
    refs[("auto", "labels")], refs[("auto", "regions")] = refs[("dice_ce", "labels")], refs[("region_dice_bce", "regions")]
    return refs[(name, target)]()


def _batch(target: str, spatial_dims: int, classes: int = 4, seed: int = 0):
    """Random logits (3, K, *spatial), a different size per axis, and unbalanced targets: per sample and
    channel the foreground differs, one class/region occurs in one sample only, one sample lacks most."""
    g = torch.Generator().manual_seed(seed)
    spatial = (5, 6, 7)[:spatial_dims]
    logits = torch.randn(3, classes, *spatial, generator=g) * 2
    u = torch.rand(3, *spatial, generator=g)
    labels = torch.zeros(3, *spatial, dtype=torch.long)
    labels[0][u[0] < 0.5] = 1
    labels[0][u[0] < 0.1] = 2
    labels[1][u[1] < 0.05] = 1
    labels[1][u[1] > 0.3] = 3  # class 3 only in sample 1
    labels[2][u[2] < 0.02] = 2  # sample 2 almost all background
    if target == "labels":
        return logits, labels[:, None]
    regions = torch.stack([labels > 0, labels == 2, labels == 3, labels == 1], 1)[:, :classes]
    return logits, regions.float()


# ----------------------------------------------------------------------------- registry and names
def test_names_are_auto_and_the_registry():
    assert loss_names() == ("auto", *LOSSES)
    assert set(LOSSES) >= {"dice", "dice_ce", "region_dice_bce"}


def test_every_registered_loss_has_a_reference():
    expected = {("auto", "labels"), ("auto", "regions"), ("dice", "labels"), ("dice", "regions"),
                ("dice_ce", "labels"), ("region_dice_bce", "regions"), ("dice_squared", "labels"), ("dice_squared", "regions")}
    assert set(PAIRS) == expected, "a new loss needs a MONAI reference in _reference()"


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        register("dice")(lambda target: torch.nn.Identity())


@pytest.mark.parametrize("name, target, fragment", [
    ("dise", "labels", "loss.name: 'dise' is not valid (did you mean 'dice'?); choose one of auto, dice, dice_ce"),
    ("dice", "region", "data.target: 'region' is not valid (did you mean 'regions'?)"),
    ("dice_ce", "regions", "loss.name: dice_ce needs data.target: labels"),
    ("region_dice_bce", "labels", "loss.name: region_dice_bce needs data.target: regions"),
])
def test_bad_names_say_key_and_fix(name, target, fragment):
    with pytest.raises(MedsegError) as err:
        create_loss(name, target)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_auto_picks_the_usual_loss():
    logits, target = _batch("labels", 2)
    assert torch.equal(create_loss("auto", "labels")(logits, target), create_loss("dice_ce", "labels")(logits, target))
    logits, target = _batch("regions", 2)
    assert torch.equal(create_loss("auto", "regions")(logits, target), create_loss("region_dice_bce", "regions")(logits, target))


# ----------------------------------------------------------------------------- against MONAI
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name, target", PAIRS)
def test_matches_monai_reference(name, target, spatial_dims):
    logits, y = _batch(target, spatial_dims)
    ours = create_loss(name, target)(logits, y)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert float(ours) == pytest.approx(float(_reference(name, target)(logits, y)), abs=1e-5)


# ----------------------------------------------------------------------------- hand-computed values
def _dice_loss(p: float, t: int, n: int) -> float:
    """1 - soft Dice of a constant probability ``p`` over ``n`` voxels, ``t`` of them in the target."""
    return 1 - (2 * p * t + S) / (p * n + t + S)


def test_dice_is_per_sample_and_channel_regions():
    # logits 0 -> p = 1/2; 4 voxels; foreground counts per (sample, region): (4, 1) and (0, 2)
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0] = 1
    target[0, 1, 0, 0] = 1
    target[1, 1, 0] = 1
    loss = create_loss("dice", "regions")(torch.zeros(2, 2, 2, 2), target)
    per_sample = (_dice_loss(0.5, 4, 4) + _dice_loss(0.5, 1, 4) + _dice_loss(0.5, 0, 4) + _dice_loss(0.5, 2, 4)) / 4
    pooled_batch = (_dice_loss(0.5, 4, 8) + _dice_loss(0.5, 3, 8)) / 2
    assert per_sample == pytest.approx(0.625, abs=1e-5) and abs(per_sample - pooled_batch) > 0.05
    assert float(loss) == pytest.approx(per_sample, abs=1e-6)


def test_dice_is_per_sample_and_channel_without_background_labels():
    # logits 0 over 3 classes -> p = 1/3; 6 voxels; sample 0: class 1 x3, class 2 x0; sample 1: class 1 x1, class 2 x5
    target = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 2, 2, 2, 2, 2]]).reshape(2, 1, 1, 6)
    loss = create_loss("dice", "labels")(torch.zeros(2, 3, 1, 6), target)
    third = 1 / 3
    per_sample = (_dice_loss(third, 3, 6) + _dice_loss(third, 0, 6) + _dice_loss(third, 1, 6) + _dice_loss(third, 5, 6)) / 4
    assert per_sample == pytest.approx((0.6 + 1 + 7 / 9 + 11 / 21) / 4, abs=1e-5)
    assert float(loss) == pytest.approx(per_sample, abs=1e-6)


def test_golden_dice_ce():
    # class-1 logit log 3 then 0 -> p1 = 3/4, 1/2; target classes 1, 0
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])
    target = torch.tensor([[[[1, 0]]]])
    dice = 1 - (2 * 0.75 + S) / (1.25 + 1 + S)  # background left out: class 1 only
    ce = (math.log(4 / 3) + math.log(2)) / 2
    assert float(create_loss("dice_ce", "labels")(logits, target)) == pytest.approx(dice + ce, abs=1e-6)


def test_golden_region_dice_bce():
    # region 0: p = 3/4, 1/2 against 1, 0; region 1: p = 1/2, 1/2 against 0, 1
    logits = torch.tensor([[[[math.log(3), 0.0]], [[0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    dice = (1 - (1.5 + S) / (2.25 + S) + 1 - (1 + S) / (2 + S)) / 2
    bce = (math.log(4 / 3) + 3 * math.log(2)) / 4
    assert float(create_loss("region_dice_bce", "regions")(logits, target)) == pytest.approx(dice + bce, abs=1e-6)


def test_batch_dice_sums_over_the_batch_per_channel():
    # sample 0 has the structure, sample 1 has none but predicts p = 1/2 on both voxels
    logits = torch.tensor([[[[math.log(3), 0.0]]], [[[0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    per_sample = ((1 - (1.5 + S) / (2.25 + S)) + (1 - S / (1 + S))) / 2  # sample 1 alone: Dice ~0, loss ~1
    batch = 1 - (2 * 0.75 + S) / ((0.75 + 0.5 + 0.5 + 0.5) + 1 + S)  # one Dice over every voxel of the batch
    assert float(create_loss("dice", "regions")(logits, target)) == pytest.approx(per_sample, abs=1e-6)
    assert float(create_loss("dice", "regions", batch_dice=True)(logits, target)) == pytest.approx(batch, abs=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    got = create_loss("region_dice_bce", "regions", batch_dice=True)(logits, target)
    assert float(got) == pytest.approx(batch + float(bce), abs=1e-6)
    labels = torch.tensor([[[[1, 0]]], [[[0, 0]]]])
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)  # class 1 logit as above against 0 for background
    p1 = torch.softmax(two, 1)[:, 1]
    expected = 1 - (2 * float((p1 * (labels[:, 0] == 1)).sum()) + S) / (float(p1.sum()) + 1 + S)
    assert float(create_loss("dice", "labels", batch_dice=True)(two, labels)) == pytest.approx(expected, abs=1e-6)
    ignored = labels.clone()
    ignored[1, 0, 0, 1] = -1  # the ignore-aware path: that voxel leaves both sums
    keep = p1.clone()
    keep[1, 0, 1] = 0
    expected = 1 - (2 * float((keep * (labels[:, 0] == 1)).sum()) + S) / (float(keep.sum()) + 1 + S)
    assert float(create_loss("dice", "labels", batch_dice=True)(two, ignored)) == pytest.approx(expected, abs=1e-6)


def test_perfect_prediction_gives_zero_dice():
    target = torch.tensor([[[[0, 1], [2, 1]]]])
    logits = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert float(create_loss("dice", "labels")(logits, target)) == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- deep supervision
def test_deep_supervision_weights_and_block_majority_targets():
    # target 1 on three of each 2x2x2 block's corners: the majority is 1 everywhere, while one voxel per block
    # (nearest neighbour: the block's first corner) would be 0 everywhere
    target = torch.ones(1, 1, 8, 4, 12)
    target[:, :, 0::2, 0::2, 0::2] = 0
    target[:, :, 1::2, 1::2, 1::2] = 0  # two of eight corners off: share 0.75
    outputs = [torch.zeros(1, 1, 8, 4, 12), torch.full((1, 1, 4, 2, 6), math.log(3)), torch.full((1, 1, 2, 1, 3), -math.log(3))]
    fine = float(create_loss("dice", "regions")(outputs[0], target))
    losses = [fine, _dice_loss(0.75, 48, 48), _dice_loss(0.25, 6, 6)]  # the coarse targets are all ones
    expected = 4 / 7 * losses[0] + 2 / 7 * losses[1] + 1 / 7 * losses[2]
    loss = DeepSupervisionLoss(create_loss("dice", "regions"))
    assert float(loss(outputs, target)) == pytest.approx(expected, abs=1e-6)


def test_downsample_target_takes_each_block_majority():
    torch.manual_seed(0)
    regions = (torch.rand(2, 3, 8, 6, 4) > 0.5).float()
    share = regions.reshape(2, 3, 4, 2, 3, 2, 2, 2).mean((3, 5, 7))  # the 2x2x2 blocks' means
    torch.testing.assert_close(downsample_target(regions, (4, 3, 2)), (share >= 0.5).float())
    torch.testing.assert_close(downsample_target(regions, (4, 3, 2), soft=True), share)
    # class indices, -1 ignored: the block's most frequent value, a tie to the lower value
    labels = torch.tensor([[[[0, 2, 3, 3],
                             [2, 2, 3, -1],
                             [1, 1, -1, -1],
                             [0, 0, -1, 1]]]])
    assert downsample_target(labels, (2, 2)).tolist() == [[[[2, 3], [0, -1]]]]
    assert downsample_target(labels, (2, 2)).dtype == labels.dtype
    # anisotropic factors (a stride of 1 on an axis)
    torch.testing.assert_close(downsample_target(regions, (4, 3, 4), soft=True),
                               regions.reshape(2, 3, 4, 2, 3, 2, 4).mean((3, 5)))


def test_deep_supervision_resizes_class_indices_by_nearest_when_sizes_do_not_divide():
    logits, target = _batch("labels", 3)
    half = torch.randn(3, 4, 2, 3, 3)
    base = create_loss("dice_ce", "labels")
    # (5, 6, 7) to (2, 3, 3) is no whole factor: nearest takes voxel floor(i * scale): rows 0, 2; columns 0, 2, 4; slices 0, 2, 4
    small = target[:, :, [0, 2]][:, :, :, [0, 2, 4]][..., [0, 2, 4]]
    expected = 2 / 3 * base(logits, target) + 1 / 3 * base(half, small)
    assert float(DeepSupervisionLoss(base)([logits, half], target)) == pytest.approx(float(expected), abs=1e-6)


def test_deep_supervision_refuses_a_lone_tensor():
    with pytest.raises(TypeError, match="list of outputs"):
        DeepSupervisionLoss(create_loss("dice", "regions"))(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))


# ----------------------------------------------------------------------------- gradients and AMP
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("name, target", PAIRS)
def test_gradient_reaches_every_logit(name, target, deep_supervision):
    logits, y = _batch(target, 3)
    logits.requires_grad_(True)
    loss = create_loss(name, target)
    if deep_supervision:
        aux = torch.randn(3, 4, 2, 3, 3, requires_grad=True)
        DeepSupervisionLoss(loss)([logits, aux], y).backward()
        assert aux.grad is not None and torch.isfinite(aux.grad).all() and aux.grad.abs().sum() > 0
    else:
        loss(logits, y).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().flatten(2).sum(-1) > 0).all()  # every sample and channel gets a gradient


@pytest.mark.parametrize("name, target", PAIRS)
def test_bf16_logits_give_a_float32_loss(name, target):
    logits, y = _batch(target, 3)
    half = logits.bfloat16()
    loss = create_loss(name, target)(half, y)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(_reference(name, target)(half.float(), y)), abs=1e-6)


# ---------------------------------------------------------------------------------------------- batch Dice under DDP
def _ddp_rank(rank: int, world: int, init: str, out: dict) -> None:
    """One DDP rank: its share of each batch through a tiny DDP model and the batch-Dice loss, for both targets,
    with the loss across ranks (``gather``) and on the rank's own patches only (the behaviour before AcrossRanks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for target_kind in TARGETS:
            for gather in (True, False):
                x, y, model = _ddp_case(target_kind)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                loss_fn = create_loss("auto", target_kind, batch_dice=True)
                loss_fn = loss_fn if gather else loss_fn.loss
                share = slice(rank * 2, rank * 2 + 2)
                loss = loss_fn(ddp(x[share]), y[share])
                loss.backward()
                out[(rank, target_kind, gather)] = (float(loss.detach()), [p.grad.clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def _ddp_case(target_kind: str):
    """A batch of 4 where the first two patches have no foreground in channel 1 (so per-rank and global batch Dice
    differ), and a 1x1x1 convolution with fixed weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 6, 6, 6, generator=g)
    if target_kind == "regions":
        y = (torch.rand(4, 2, 6, 6, 6, generator=g) > 0.6).float()
        y[:2, 1] = 0.0
    else:
        y = torch.randint(0, 3, (4, 1, 6, 6, 6), generator=g)
        y[:2][y[:2] == 2] = 0
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 2 if target_kind == "regions" else 3, 1)
    return x, y, model


def test_batch_dice_under_ddp_is_the_dice_of_the_global_batch(tmp_path):
    """Two gloo ranks with two patches each train as one process with all four: the same loss on every rank and the
    same (DDP-averaged) gradients, as nnU-Net's batch Dice under DDP. Each rank on its own patches would not."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2)
    for target_kind in TARGETS:
        x, y, model = _ddp_case(target_kind)
        reference = create_loss("auto", target_kind, batch_dice=True)(model(x), y)
        reference.backward()
        ref_grads, reference = [p.grad for p in model.parameters()], float(reference.detach())
        for rank in (0, 1):
            loss, grads = out[(rank, target_kind, True)]
            assert loss == pytest.approx(reference, rel=1e-5)
            for g, ref in zip(grads, ref_grads):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        local_loss, local_grads = out[(0, target_kind, False)]
        assert local_loss != pytest.approx(reference, rel=1e-3)  # per-rank batch Dice is another loss
        assert not all(torch.allclose(g, ref, rtol=1e-3, atol=1e-6) for g, ref in zip(local_grads, ref_grads))
