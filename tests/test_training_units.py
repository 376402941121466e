"""Pipeline validation, samplers, schedule and patch dataset: the parts of training below the loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.data.dataset import CaseData, _class_coords
from medseg.data.labels import get_scheme
from medseg.data.sampling import choose_centre, crop_patch
from medseg.errors import MedsegError
from medseg.training.config import load_pipeline, parse_pipeline
from medseg.training.optim import LRFactor
from medseg.training.setup import PatchDataset, check_patch_size, make_target

BASE = {"data": {"synthetic": {"cases": 4}}, "sampling": {"patch_size": [32, 32, 32]}}


def _with(**sections):
    d = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return d


# ----------------------------------------------------------------------------- pipeline files
@pytest.mark.parametrize("section, values, fragment", [
    ("sampling", {"patchsize": [1]}, "sampling.patchsize: unknown key (did you mean 'patch_size'?)"),
    ("training", {"epochs": "ten"}, "training.epochs: expected an integer"),
    ("training", {"epochs": 0}, "training.epochs: must be positive"),
    ("loss", {"name": "dise"}, "did you mean 'dice'?"),
    ("sampling", {"patch_size": [32, 32]}, "sampling.patch_size: [32, 32] must have 3 positive sizes"),
    ("sampling", {"foreground_fraction": 1.5}, "sampling.foreground_fraction"),
    ("inference", {"overlap": 1.0}, "inference.overlap"),
    ("data", {"manifest": "x.csv"}, "exactly one of data.manifest"),
    ("model", {"spatial_dims": 4}, "model.spatial_dims"),
])
def test_bad_pipeline_names_key_and_fix(section, values, fragment):
    with pytest.raises(MedsegError) as err:
        parse_pipeline(_with(**{section: values}))
    assert fragment in str(err.value)


def test_pipeline_file_and_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: t\ndata:\n  manifest: data/m.csv\nsampling:\n  patch_size: [16, 16, 16]\n")
    p = load_pipeline(f, ["training.epochs=3", "optimizer.lr=0.01"])
    assert p.training.epochs == 3 and p.optimizer.lr == 0.01
    assert p.resolve(p.data.manifest) == (tmp_path / "data" / "m.csv").resolve()  # relative to the pipeline file
    with pytest.raises(MedsegError, match="p.yaml: training.epochs: expected an integer"):
        load_pipeline(f, ["training.epochs=many"])


def test_shipped_pipelines_are_valid_and_their_models_take_their_sizes():
    from pathlib import Path

    from medseg.data.labels import get_scheme
    from medseg.models import check_input_size, create_model

    files = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))
    assert len(files) >= 6, "pipelines/ lacks shipped experiments"
    for f in files:
        p = load_pipeline(f)
        scheme = get_scheme(p.data.label_scheme or "brats")
        out = len(scheme.regions) if p.data.target == "regions" else len(scheme.values)
        with torch.device("meta"):  # no memory, no compute: only the architecture and its size rules
            model = create_model(p.model.name, p.model.spatial_dims, 4, out, **p.model.kwargs)
        check_input_size(model, tuple(p.sampling.patch_size))
        check_input_size(model, p.roi_size)


def test_patch_larger_than_every_volume_is_an_error():
    p = parse_pipeline(_with(sampling={"patch_size": [32, 32, 64]}))
    case = CaseData("a", np.zeros((1, 40, 40, 40), np.float32), np.zeros((40, 40, 40), np.uint8), {})
    with pytest.raises(MedsegError, match=r"sampling.patch_size: .* axis 2 .* at most 40"):
        check_patch_size(p, {"a": case})


# ----------------------------------------------------------------------------- sampling
def _label():
    label = np.zeros((30, 20, 10), np.uint8)
    label[2:4, 3:5, 1:3] = 1
    label[20:22, 10:12, 5:7] = 4
    return label


def test_foreground_fraction_is_respected():
    label = _label()
    coords = _class_coords(label)
    rng = np.random.default_rng(0)
    hits = sum(label[choose_centre("foreground", label.shape, coords, rng, 0.33)] > 0 for _ in range(3000))
    fg_share = (label > 0).mean()
    expected = 0.33 + 0.67 * fg_share
    assert abs(hits / 3000 - expected) < 0.03


def test_foreground_centres_are_drawn_over_all_foreground_voxels_as_one_list():
    """The foreground sampler draws one voxel of all classes without joining their coordinates (they may be
    memory-mapped): the same centre as drawing from the joined list, so runs keep their patches."""
    label = _label()
    label[0:10, 0:10, 0:10] = np.where(label[0:10, 0:10, 0:10] == 0, 2, label[0:10, 0:10, 0:10])
    coords = _class_coords(label)
    joined = np.concatenate([coords[v] for v in coords])
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(500):
        centre = choose_centre("foreground", label.shape, coords, a, 1.0)
        b.random()  # the foreground-fraction draw
        assert centre == tuple(int(x) for x in joined[b.integers(len(joined))])


def test_class_balanced_draws_each_class_equally():
    label = _label()
    label[0:10, 0:10, 0:10] = np.where(label[0:10, 0:10, 0:10] == 0, 2, label[0:10, 0:10, 0:10])  # a big class 2
    coords = _class_coords(label)
    rng = np.random.default_rng(1)
    values = [label[choose_centre("class_balanced", label.shape, coords, rng, 1.0)] for _ in range(3000)]
    counts = np.bincount(values, minlength=5)
    assert counts[0] == 0
    for v in (1, 2, 4):
        assert abs(counts[v] / 3000 - 1 / 3) < 0.04


@pytest.mark.parametrize("sampler", ["uniform", "foreground", "class_balanced"])
def test_empty_label_never_crashes(sampler):
    label = np.zeros((12, 10, 8), np.uint8)
    image = np.random.default_rng(0).normal(size=(2, 12, 10, 8)).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(50):
        centre = choose_centre(sampler, label.shape, _class_coords(label), rng, 1.0)
        img, lab = crop_patch(image, label, centre, (16, 8, 8))  # larger than the volume on axis 0: padded
        assert img.shape == (2, 16, 8, 8) and lab.shape == (16, 8, 8)


def test_crop_is_centred_and_inside():
    image = np.arange(20 * 20 * 20, dtype=np.float32).reshape(1, 20, 20, 20)
    img, _ = crop_patch(image, None, (10, 0, 19), (4, 4, 4))
    assert img[0, 0, 0, 0] == image[0, 8, 0, 16]


# ----------------------------------------------------------------------------- schedule and dataset
def test_lr_factor_shapes():
    poly = LRFactor("poly", 10, 0, 0.9, 0.0)
    assert poly(0) == 1.0 and poly(10) == 0.0 and 0 < poly(5) < 1
    cos = LRFactor("cosine", 10, 2, 0.9, 0.0)
    assert cos(0) < cos(1) < cos(2) == 1.0 and cos(10) == pytest.approx(0.0)


def test_patch_dataset_is_deterministic_and_rank_disjoint():
    p = parse_pipeline(_with(sampling={"patch_size": [8, 8, 8], "batch_size": 2}))
    rng = np.random.default_rng(0)
    label = (rng.random((20, 18, 16)) > 0.9).astype(np.uint8) * 2
    case = CaseData("a", rng.normal(size=(4, 20, 18, 16)).astype(np.float32), label, _class_coords(label))
    scheme = get_scheme("brats")
    a, b = PatchDataset([case], p, scheme, 6), PatchDataset([case], p, scheme, 6)
    x0, y0 = a[3]
    x1, y1 = b[3]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert x0.shape == (4, 8, 8, 8) and y0.shape == (3, 8, 8, 8)
    b.epoch = 1
    assert not torch.equal(b[3][0], x0)  # another epoch, other patches
    r0, r1 = PatchDataset([case], p, scheme, 3, rank=0, world=2), PatchDataset([case], p, scheme, 3, rank=1, world=2)
    assert not torch.equal(r0[0][0], r1[0][0])
    assert torch.equal(r1[0][0], a[1][0])  # rank r takes samples r, r+W, ...


def test_make_target_regions_and_indices():
    scheme = get_scheme("brats")
    label = np.array([[0, 1], [2, 4]], np.uint8)
    regions = make_target(label, scheme, "regions")
    assert regions.shape == (3, 2, 2) and regions[0].tolist() == [[0, 1], [1, 1]] and regions[2].tolist() == [[0, 0], [0, 1]]
    assert make_target(label, scheme, "labels").tolist() == [[[0, 1], [2, 3]]]


def test_split_cases_by_fold_split_and_train_split():
    from pathlib import Path

    from medseg.data.manifest import Case, Manifest
    from medseg.training.setup import split_cases

    cases = tuple(Case(f"c{i}", {"t1": Path("x.nii.gz")}, Path("y.nii.gz"), split=s, fold=i % 3)
                  for i, s in enumerate(["train", "val", "test", "train", "val", "test"]))
    m = Manifest(("t1",), cases, "brats")
    base = {"data": {"manifest": "m.csv"}}
    train, val = split_cases(m, parse_pipeline({**base, "data": {"manifest": "m.csv", "val_fold": 1}}))
    assert val.ids == ["c1", "c4"] and train.ids == ["c0", "c2", "c3", "c5"]
    train, val = split_cases(m, parse_pipeline({"data": {"manifest": "m.csv", "val_fold": None, "val_split": "val",
                                                          "train_split": "train"}}))
    assert val.ids == ["c1", "c4"] and train.ids == ["c0", "c3"]
    train, val = split_cases(m, parse_pipeline({"data": {"manifest": "m.csv", "val_fold": None}}))
    assert val.ids == [] and len(train.ids) == 6


def test_soft_targets_from_the_prepared_case_to_the_batch(tmp_path):
    """data.soft_targets: cases carry each region's share of a resampled voxel (kept through the disk cache, which
    is keyed by the setting) and the patch dataset yields those shares as the regions target."""
    from medseg.data.dataset import CaseCache
    from medseg.data.io import write_volume
    from medseg.data.manifest import Case
    from medseg.data.preprocess import Preprocessing
    from medseg.data.volume import Volume

    grid = np.indices((24, 22, 20))
    ball = ((grid - np.array([11.5, 10.3, 9.7]).reshape(3, 1, 1, 1)) ** 2).sum(0)
    label = np.where(ball < 4.5**2, 4, np.where(ball < 7.0**2, 2, 0)).astype(np.uint8)  # ET inside oedema
    image = write_volume(Volume((label > 0) + np.ones(label.shape, np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    case = Case("a", {"t1": image}, write_volume(Volume(label, np.eye(4)), tmp_path / "lab.nii.gz"))
    prep = Preprocessing(orientation=None, spacing=(2.0, 2.0, 2.0), crop_foreground=False, normalize="none")
    scheme = get_scheme("brats")
    caches = [CaseCache([case], prep, scheme, cache_dir=tmp_path / "cache", workers=1, soft_targets=soft)["a"]
              for soft in (False, True, True)]  # the third is read back from the disk cache
    assert len(list((tmp_path / "cache").glob("a_*"))) == 2
    hard, soft, again = caches
    assert hard.soft is None and soft.soft.shape == (3, 12, 11, 10) and np.array_equal(again.soft, soft.soft)
    assert np.array_equal(soft.label, hard.label)  # the label (patch centres) is unchanged
    et = soft.soft[2].astype(np.float64)
    assert et.sum() * 8 == pytest.approx((label == 4).sum(), rel=0.02)  # shares keep the volume
    assert ((et > 0.05) & (et < 0.95)).sum() > 20  # and the partial voxels of the boundary

    p = parse_pipeline(_with(data={"soft_targets": True}, sampling={"patch_size": [8, 8, 8]}, augmentation={"enabled": False}))
    x, y = PatchDataset([soft], p, scheme, 1)[0]
    assert y.dtype == torch.float32 and y.shape == (3, 8, 8, 8)
    values = torch.unique(y)
    assert ((values > 0.05) & (values < 0.95)).any() and y.min() >= 0 and y.max() <= 1
    with pytest.raises(MedsegError, match="data.soft_targets: true needs data.target: regions"):
        from medseg.data.manifest import Manifest
        from medseg.training.setup import label_scheme

        label_scheme(parse_pipeline(_with(data={"soft_targets": True, "target": "labels"})), Manifest(("t1",), (), "brats"))
