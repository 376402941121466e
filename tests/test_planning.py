"""Planning: manifests over several folders, CT normalisation, the fingerprint, each plan rule, the written pipeline,
and plans of the real datasets in ../shared/data (skipped without it).

Plans here use a fixed step timer (seconds proportional to the planned FLOPs), so every number is deterministic;
one CLI test measures for real on a tiny network.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data.io import write_volume
from medseg.data.layouts import BRATS_CHANNELS, build_manifest
from medseg.data.manifest import Case, Manifest, read_manifest, write_manifest
from medseg.data.preprocess import Preprocessing
from medseg.data.synthetic import SyntheticSpec, make_case
from medseg.data.volume import Volume
from medseg.errors import MedsegError
from medseg.planning import Budget, StepTime, fingerprint_manifest, make_plan, plan
from medseg.planning import planner as P
from medseg.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, guess_modality, intensity_stats
from medseg.planning.network import build_network, conv_flops, fit_network, pooling, training_bytes
from medseg.training.config import load_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]


def flops_timer(seconds_per_gflop: float = 0.01):
    """A deterministic timer: step and window seconds proportional to the FLOPs of the planned network."""
    def timer(net, batch):
        return StepTime(seconds_per_gflop * conv_flops(net, batch, 1, 2) / 1e9,
                        seconds_per_gflop * conv_flops(net, 1, 1, 2) / 3e9, "fixed")
    return timer


def fixed_timer(step: float, window: float = 0.1):
    return lambda net, batch: StepTime(step, window, "fixed")


def make_fp(spacings, shapes, channels=("t1",), modalities=None, folds=None, scheme="binary") -> Fingerprint:
    """A fingerprint built directly (no files): one class of 1000 voxels per case."""
    folds = folds or [None] * len(spacings)
    cases = tuple(CaseFingerprint(f"c{i}", tuple(float(s) for s in sp), tuple(int(n) for n in sh), {1: 1000},
                                  (0.0,) * len(channels), fold) for i, (sp, sh, fold) in enumerate(zip(spacings, shapes, folds)))
    intensity = {ch: IntensityStats(100.0, 20.0, 40.0, 180.0, 0.0, 300.0, 1000) for ch in channels}
    modalities = modalities or {ch: "mri" for ch in channels}
    return Fingerprint(tuple(channels), cases, intensity, modalities, {ch: "test" for ch in channels}, scheme)


# ---------------------------------------------------------------------------------------------- A: several folders
def _brats_folder(root: Path, ids, shape=(14, 12, 10)) -> Path:
    rng = np.random.default_rng(len(ids))
    for cid in ids:
        images, label, affine = make_case(SyntheticSpec(shape=shape), rng)
        for k, ch in enumerate(BRATS_CHANNELS):
            write_volume(Volume(np.round(images[k]).astype(np.int16), affine), root / cid / f"{cid}_{ch}.nii.gz")
        write_volume(Volume(label, affine), root / cid / f"{cid}_seg.nii.gz")
    return root


def test_manifest_over_two_folders(tmp_path, capsys):
    a = _brats_folder(tmp_path / "part1", ["A_1", "A_2", "A_3"])
    b = _brats_folder(tmp_path / "part2", ["B_1", "B_2"])
    out = tmp_path / "manifests" / "all.csv"
    assert main(["manifest", "--layout", "brats2018", str(a), str(b), "-o", str(out), "--folds", "5"]) == 0
    m = read_manifest(out)
    assert m.ids == ["A_1", "A_2", "A_3", "B_1", "B_2"] and m.channels == BRATS_CHANNELS and m.label_scheme == "brats"
    assert sorted(c.fold for c in m.cases) == [0, 1, 2, 3, 4]
    assert m["B_2"].images["t1ce"].path.resolve() == (b / "B_2" / "B_2_t1ce.nii.gz").resolve()
    assert str(tmp_path) not in out.read_text()  # relative paths
    assert "5 cases" in capsys.readouterr().out


def test_manifest_folders_must_not_share_case_ids(tmp_path):
    a = _brats_folder(tmp_path / "part1", ["A_1", "X_1"])
    b = _brats_folder(tmp_path / "part2", ["X_1"])
    with pytest.raises(MedsegError, match=r"case id X_1 is in both .*part1 and .*part2"):
        build_manifest("brats2018", a, b)
    with pytest.raises(MedsegError, match="twice in"):
        build_manifest("brats2018", a, a)


def test_manifest_folders_must_share_channels(tmp_path):
    a = _brats_folder(tmp_path / "brats", ["A_1"])
    b = tmp_path / "nnunet"
    for i in range(2):
        write_volume(Volume(np.ones((6, 5, 4), np.int16), np.eye(4)), b / "imagesTr" / f"case_{i:04d}.nii.gz")
    write_volume(Volume(np.ones((6, 5, 4), np.int16), np.eye(4)), b / "labelsTr" / "case.nii.gz")
    (b / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}))
    with pytest.raises(MedsegError, match=r"channels \['t1', 't2'\] differ from \['flair', 't1', 't1ce', 't2'\]"):
        build_manifest("auto", a, b)


def test_real_brats_folders_give_the_shipped_20_case_manifest(shared_data):
    built = build_manifest("brats2018", shared_data / "brats18", shared_data / "brats18_extra")
    assert len(built) == 20 and len(set(built.ids)) == 20
    shipped = read_manifest(ROOT / "data_manifests" / "brats18_20.csv")
    assert shipped.ids == built.ids and shipped.label_scheme == "brats"
    assert [c.images["flair"].path.resolve() for c in shipped.cases] == [c.images["flair"].path.resolve() for c in built.cases]
    assert sorted(c.fold for c in shipped.cases) == sorted(list(range(5)) * 4)
    text = (ROOT / "data_manifests" / "brats18_20.csv").read_text()
    assert "/shared/data" in text and "/work/" not in text and ",/" not in text  # relative paths only


# ---------------------------------------------------------------------------------------------- CT normalisation
def _ct_stats(**kw):
    return Preprocessing(normalize="ct", ct_clip=[[-100.0, 200.0]], ct_mean=[50.0], ct_std=[25.0], **kw)


def test_ct_normalisation_clips_then_zscores_every_voxel():
    x = np.linspace(-1000, 1000, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    prepared = _ct_stats(crop_foreground=False).apply([Volume(x, np.diag([0.8, 0.8, 5.0, 1.0]))])
    np.testing.assert_allclose(prepared.image[0], (np.clip(x, -100, 200) - 50) / 25, rtol=1e-6)
    assert prepared.image.min() == pytest.approx(-6.0) and prepared.image.max() == pytest.approx(6.0)


def test_ct_settings_round_trip_and_errors():
    pre = _ct_stats()
    assert Preprocessing.from_dict(pre.to_dict()) == pre and pre.to_dict()["ct_clip"] == [[-100.0, 200.0]]
    loaded = parse_pipeline({"data": {"synthetic": {}}, "preprocessing": pre.to_dict()})
    assert loaded.preprocessing == pre
    with pytest.raises(MedsegError, match="needs ct_clip, ct_mean and ct_std"):
        Preprocessing(normalize="ct", ct_mean=[1.0])
    with pytest.raises(MedsegError, match="only used with normalize: ct"):
        Preprocessing(ct_mean=[1.0])
    with pytest.raises(MedsegError, match="one entry per channel"):
        Preprocessing(normalize="ct", ct_clip=[[0, 1]], ct_mean=[1.0, 2.0], ct_std=[1.0])
    with pytest.raises(MedsegError, match="low < high"):
        Preprocessing(normalize="ct", ct_clip=[[5, 1]], ct_mean=[1.0], ct_std=[1.0])
    with pytest.raises(MedsegError, match="image has 2"):
        pre.apply([Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))] * 2)


# ---------------------------------------------------------------------------------------------- fingerprint
CT_SPACING = (0.8, 0.8, 4.0)


def _ct_dataset(root: Path, n: int = 3, shape=(30, 26, 12), channel: str = "ct") -> Path:
    """CT-like cases: air -1000, a body of 40 HU, an organ (label 1, < 10k voxels) of 50-150 HU; LPS affine."""
    rng = np.random.default_rng(0)
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    cases = []
    for i in range(n):
        img = np.full(shape, -1000.0, np.float32)
        img[3:-3, 3:-3, 1:-1] = 40.0
        lab = np.zeros(shape, np.uint8)
        lab[8:20, 6:16, 3:9] = 1
        img[lab == 1] = rng.uniform(50, 150, int(lab.sum()))
        images = {channel: write_volume(Volume(img, affine), root / f"case{i}_{channel}.nii.gz")}
        cases.append(Case(f"case{i}", images, write_volume(Volume(lab, affine), root / f"case{i}_seg.nii.gz")))
    return write_manifest(Manifest((channel,), tuple(cases), "binary"), root / "manifest.csv")


def test_fingerprint_of_known_cases(tmp_path):
    fp = fingerprint_manifest(_ct_dataset(tmp_path), progress=False)
    case = fp.cases[0]
    assert case.spacing == pytest.approx(CT_SPACING) and case.shape == (30, 26, 12)  # RAS; no zeros to crop
    assert case.class_voxels == {1: 12 * 10 * 6} and case.volume_ml(1) == pytest.approx(720 * 0.8 * 0.8 * 4 / 1000)
    assert fp.class_summary()[1]["frequency"] == 1.0 and fp.anisotropy == pytest.approx(5.0)
    assert fp.modalities == {"ct": "ct"} and case.image_min == (-1000.0,)
    organ = np.concatenate([_organ_values(tmp_path, i) for i in range(3)])  # every organ voxel is sampled (< 10k)
    s = fp.intensity["ct"]
    assert s.samples == organ.size and s.mean == pytest.approx(organ.mean(), rel=1e-6)
    assert (s.percentile_00_5, s.percentile_99_5) == pytest.approx(tuple(np.percentile(organ, [0.5, 99.5])), rel=1e-6)
    again = fingerprint_manifest(tmp_path / "manifest.csv", progress=False)
    assert replace(again, read_seconds=fp.read_seconds) == fp  # seeded, deterministic


def _organ_values(root: Path, i: int) -> np.ndarray:
    from medseg.data.io import read_volume

    img, lab = read_volume(root / f"case{i}_ct.nii.gz").array, read_volume(root / f"case{i}_seg.nii.gz").array
    return img[lab > 0].astype(np.float64)


def test_fingerprint_samples_at_most_the_cap_per_case(tmp_path):
    fp = fingerprint_manifest(_ct_dataset(tmp_path, n=2), samples_per_case=100, progress=False)
    assert fp.intensity["ct"].samples == 200


def test_fingerprint_json_has_no_absolute_paths(tmp_path):
    manifest = _ct_dataset(tmp_path / "data")
    fp = fingerprint_manifest(manifest, progress=False)
    path = fp.save(tmp_path / "plans" / "x.fingerprint.json", manifest)
    text = path.read_text()
    assert str(tmp_path) not in text and json.loads(text)["manifest"] == "../data/manifest.csv"
    assert Fingerprint.from_dict(json.loads(text)) == replace(fp, read_seconds=round(fp.read_seconds, 2))


def test_modality_guess():
    assert guess_modality("ct", [-1024.0, -1000.0])[0] == "ct"
    assert guess_modality("CT_arterial", [-3024.0])[0] == "ct"
    assert guess_modality("ct", [0.0])[0] == "mri"  # named CT, but not Hounsfield units
    assert guess_modality("t1ce", [-1000.0])[0] == "mri"  # 't1ce' is not the word ct
    assert guess_modality("flair", [0.0])[0] == "mri"


def test_modality_given_overrides_the_guess(tmp_path):
    manifest = _ct_dataset(tmp_path, channel="image")
    assert fingerprint_manifest(manifest, progress=False).modalities == {"image": "mri"}
    assert fingerprint_manifest(manifest, modality="ct", progress=False).modalities == {"image": "ct"}
    with pytest.raises(MedsegError, match="--modality"):
        fingerprint_manifest(manifest, modality="pet", progress=False)


# ---------------------------------------------------------------------------------------------- rules
def test_target_spacing_is_the_median():
    spacing, note = P.target_spacing(np.array([[1.0, 1.0, 1.0], [1.2, 0.9, 2.9], [0.7, 1.1, 1.5]]))
    assert spacing == (1.0, 1.0, 1.5) and "median" in note  # not the mean (0.97, 1.0, 1.8)


def test_anisotropic_axis_takes_the_10th_percentile():
    z = np.array([5.0, 5.0, 5.0, 5.0, 3.0, 3.0, 6.0, 5.0, 5.0, 4.0])
    spacings = np.stack([np.full(10, 0.8), np.full(10, 0.8), z], axis=1)
    spacing, note = P.target_spacing(spacings)
    assert spacing == (0.8, 0.8, pytest.approx(float(np.percentile(z, 10)))) and "10th percentile" in note
    spacing, _ = P.target_spacing(np.array([[1.0, 1.0, 2.9], [1.0, 1.0, 3.0]]))  # ratio 2.95: not anisotropic
    assert spacing == (1.0, 1.0, 2.95)


def test_median_shape_at_the_target_spacing():
    shape = P.median_shape(np.array([[1.0, 1.0, 2.0], [0.5, 0.5, 2.0], [1.0, 1.0, 4.0]]),
                           np.array([[100, 80, 30], [200, 160, 30], [160, 80, 15]]), (1.0, 1.0, 2.0))
    assert shape == (100, 80, 30)  # resampled: (100, 80, 30), (100, 80, 30), (160, 80, 30); not the mean


def test_depth_rule_pools_each_axis_to_4_to_8_voxels():
    strides, kernels = pooling((128, 160, 128), (1.0, 1.0, 1.0))
    assert len(strides) == 5 and all(s == (2, 2, 2) for s in strides)
    net = build_network((139, 170, 135), (1.0, 1.0, 1.0), 16, 256)
    assert net.patch == (128, 160, 128) and [p // d for p, d in zip(net.patch, net.divisor)] == [4, 5, 4]
    assert net.channels == (16, 32, 64, 128, 256, 256)
    strides, _ = pooling((40, 12, 9), (1.0, 1.0, 1.0))  # 12 -> 6 stops; 9 -> 4 stops; 40 -> 20 -> 10 -> 5
    assert strides == ((2, 2, 2), (2, 1, 1), (2, 1, 1))


def test_anisotropic_axis_is_pooled_and_convolved_late():
    strides, kernels = pooling((160, 160, 32), (0.8, 0.8, 5.0))
    assert strides[:2] == ((2, 2, 1), (2, 2, 1)) and strides[2] == (2, 2, 2)  # z joins at 3.2 mm in-plane
    assert kernels[:2] == ((3, 3, 1), (3, 3, 1)) and kernels[2] == (3, 3, 3)
    net = build_network((160, 160, 32), (0.8, 0.8, 5.0), 16, 256)
    assert net.model_name == "dynunet" and net.model_kwargs["kernel_size"][0] == [3, 3, 1]
    assert net.model_kwargs["strides"][0] == [1, 1, 1]


def test_deep_supervision_heads_fit_the_network_and_the_rule_keeps_them_for_long_schedules():
    """Room for heads on the decoder levels 1 .. levels - 3 (as many for dynunet as unet has, checked on the built
    models; none for 3 levels); the plan uses them only from SGD_MIN_STEPS steps on (measured not to help below)."""
    import torch
    from medseg.models import create_model
    from medseg.planning.planner import SGD_MIN_STEPS, deep_supervision_rule

    for shape, spacing, heads in (((64, 80, 64), (2.0, 2.0, 2.0), 2), ((160, 160, 32), (0.8, 0.8, 5.0), 3),
                                  ((16, 16, 16), (1.0, 1.0, 1.0), 0)):
        net = build_network(shape, spacing, 4, 16)
        assert net.supervision_heads == heads == max(0, len(net.channels) - 3)
        extra = {"deep_supr_num": heads} if net.model_name == "dynunet" else {}
        model = create_model(net.model_name, 3, 1, 2, deep_supervision=heads > 0, **net.model_kwargs, **extra)
        assert len(model.forward_train(torch.zeros(1, 1, *net.patch)).aux) == heads
        assert deep_supervision_rule(net, SGD_MIN_STEPS)[0] is (heads > 0)
        assert deep_supervision_rule(net, SGD_MIN_STEPS - 1)[0] is False


def test_loader_processes_one_on_a_cpu_and_enough_to_feed_a_gpu(monkeypatch):
    """One loader beside CPU training; on a GPU min(12, CPUs - 2), at least 2: 4 fed an H100 half of what a 3D U-Net
    takes at 128^3 (docs/performance.md, "Feeding a GPU")."""
    import yaml
    from medseg.planning import writer

    fp = make_fp([(1.0, 1.0, 1.0)] * 4, [(160, 160, 128)] * 4)
    gpu = make_plan(fp, Budget(device="cuda", time_budget_min=60, memory_gib=8), fixed_timer(0.05, 0.01))
    cpu = make_plan(fp, Budget(min_steps=0), fixed_timer(0.5, 0.1))
    workers = lambda plan: yaml.safe_load(writer.plan_yaml(plan, "p", "m.csv", "f.json"))["data"]["workers"]
    for cpus, expected in ((32, 12), (16, 12), (8, 6), (2, 2), (None, 2)):
        monkeypatch.setattr(writer.os, "cpu_count", lambda: cpus)
        assert workers(gpu) == expected and workers(cpu) == 1, cpus


def test_cases_over_half_the_memory_are_cached_on_disk_and_leave_the_budget_to_the_step(monkeypatch):
    """A dataset whose prepared cases fit half the memory is cached in memory and counted in a CPU budget; a larger
    one (BraTS' 285 cases at 1 mm: 15 GiB) is written as .npy files and memory-mapped, and the step keeps the
    budget: the plan is written, not refused. A GPU plan measures against this machine's memory."""
    import yaml
    from medseg.planning import writer

    few, many = (make_fp([(1.0, 1.0, 1.0)] * n, [(140, 170, 140)] * n, channels=BRATS_CHANNELS) for n in (20, 285))
    assert P.prepared_bytes(many, (1.0, 1.0, 1.0)) / 2**30 == pytest.approx(15.0, abs=0.1)
    small, large = (make_plan(fp, Budget(min_steps=0), fixed_timer(0.5, 0.1)) for fp in (few, many))
    cache = lambda plan: yaml.safe_load(writer.plan_yaml(plan, "p", "m.csv", "f.json"))["data"]["cache"]
    assert (small.cache, cache(small), large.cache, cache(large)) == ("memory", "memory", "disk", "disk")
    assert "over half of the 8 GiB budget" in large.notes["cache"]
    room = lambda fp: P.available_memory(fp, (1.0, 1.0, 1.0), Budget())[0]
    assert room(few) == pytest.approx(P.Budget().memory_bytes - P.prepared_bytes(few, (1, 1, 1)) - 2**30)
    assert room(many) == P.Budget().memory_bytes - 2**30  # mapped cases are the page cache's, not the step's
    assert P.cache_rule(few, (2.0, 2.0, 2.0), Budget(memory_gib=1.5))[0] == "memory"  # 1/8 of the voxels at 2 mm
    monkeypatch.setattr(P, "host_memory_bytes", lambda: 64 * 2**30)
    assert P.cache_rule(many, (1.0, 1.0, 1.0), Budget(device="cuda", memory_gib=80))[0] == "memory"
    monkeypatch.setattr(P, "host_memory_bytes", lambda: 16 * 2**30)
    assert P.cache_rule(many, (1.0, 1.0, 1.0), Budget(device="cuda", memory_gib=80))[0] == "disk"


def test_a_long_schedule_writes_deep_supervision_with_the_dynunet_heads():
    """A GPU plan of 10 hours passes SGD_MIN_STEPS: the written file turns deep supervision on and gives dynunet
    (anisotropic spacing) its heads; the model built from the file has them. A short CPU plan leaves it off."""
    import torch
    import yaml
    from medseg.models import create_model
    from medseg.planning.writer import plan_yaml

    fp = make_fp([(0.8, 0.8, 2.0)] * 4, [(160, 160, 64)] * 4)
    long = make_plan(fp, Budget(device="cuda", time_budget_min=600, memory_gib=8), fixed_timer(0.05, 0.01))
    short = make_plan(fp, Budget(min_steps=0), fixed_timer(0.5, 0.1))
    assert long.schedule.epochs * long.schedule.iterations >= P.SGD_MIN_STEPS and long.deep_supervision
    assert not short.deep_supervision and short.notes["deep_supervision"].startswith("off")
    net = long.design.network
    written = yaml.safe_load(plan_yaml(long, "long", "m.csv", "f.json"))
    assert written["loss"]["deep_supervision"] is True and net.model_name == "dynunet"
    assert written["model"]["kwargs"]["deep_supr_num"] == net.supervision_heads > 0
    model = create_model("dynunet", 3, 1, 2, deep_supervision=True, **written["model"]["kwargs"])
    small = tuple(2 * d for d in net.divisor)
    assert len(model.forward_train(torch.zeros(1, 1, *small)).aux) == net.supervision_heads
    assert yaml.safe_load(plan_yaml(short, "short", "m.csv", "f.json"))["loss"]["deep_supervision"] is False


def test_patch_shrinks_to_fit_memory_and_stays_divisible():
    start, spacing = (139, 170, 135), (1.0, 1.0, 1.0)
    full = build_network(start, spacing, 16, 256)
    budget = 0.4 * training_bytes(full, 2, 4, 3, False)
    net = fit_network(start, spacing, (16, 256), budget, (4, 3), False)
    assert training_bytes(net, 2, 4, 3, False) <= budget < training_bytes(full, 2, 4, 3, False)
    assert all(p % d == 0 for p, d in zip(net.patch, net.divisor))
    assert net.patch[1] <= max(net.patch[0], net.patch[2]) + net.divisor[1]  # the longest axis went first


def test_shrinking_takes_the_axis_longest_in_mm():
    spacing = (0.5, 0.5, 2.0)  # 64 x 0.5 = 32 mm in-plane, 32 x 2 = 64 mm along z
    full = build_network((64, 64, 32), spacing, 8, 64)
    net = fit_network((64, 64, 32), spacing, (8, 64), training_bytes(full, 2, 1, 2, False) - 1, (1, 2), False)
    assert net.patch[2] < 32 and net.patch[:2] == (64, 64)


def test_memory_too_small_is_an_error():
    with pytest.raises(MedsegError, match="--memory"):
        fit_network((64, 64, 64), (1.0, 1.0, 1.0), (16, 256), 1e5, (4, 3), False)


def test_batch_is_2_on_cpu_and_grows_with_gpu_memory_up_to_5_percent():
    net = build_network((64, 64, 64), (1.0, 1.0, 1.0), 32, 320)
    assert P.batch_size(net, 1e12, 1, 2, True, 1e9, "cpu") == 2
    per_sample = training_bytes(net, 1, 1, 2, True) - training_bytes(net, 0, 1, 2, True)
    room = training_bytes(net, 0, 1, 2, True) + 7.5 * per_sample
    assert P.batch_size(net, room, 1, 2, True, 1e12, "cuda") == 7
    assert P.batch_size(net, 1e15, 1, 2, True, 64**3 * 100, "cuda") == 5  # 5% of 100 patches' voxels


def test_2d_when_3d_patches_would_be_thin_and_dims_overrides():
    fp = make_fp([(0.8, 0.8, 5.0)] * 4, [(200, 180, 20)] * 4)
    layout, note = P.choose_layout(fp, (0.8, 0.8, 5.0), Budget(), 1, 2)
    assert layout == P.Layout((0, 1, 2), 2) and "under 1/4" in note
    layout, _ = P.choose_layout(fp, (0.8, 0.8, 5.0), Budget(dims="3"), 1, 2)
    assert layout.spatial_dims == 3
    deep = make_fp([(0.8, 0.8, 5.0)] * 4, [(200, 180, 60)] * 4)
    assert P.choose_layout(deep, (0.8, 0.8, 5.0), Budget(), 1, 2)[0].spatial_dims == 3


def test_2d_slices_the_thin_axis_whichever_it_is():
    fp = make_fp([(4.0, 0.8, 0.8)] * 3, [(20, 200, 180)] * 3)  # sagittal slabs: thin along R-L
    layout, _ = P.choose_layout(fp, (4.0, 0.8, 0.8), Budget(), 1, 2)
    assert layout.order == (1, 2, 0) and layout.orientation == "ASR"
    p = make_plan(fp, Budget(), fixed_timer(0.01))
    assert p.design.spacing == (0.8, 0.8, 4.0) and p.design.network.spatial_dims == 2
    assert p.design.median_shape == (200, 180, 20)


def test_one_slice_images_are_planned_2d():
    fp = make_fp([(0.5, 0.5, 1.0)] * 3, [(256, 200, 1)] * 3)
    layout, note = P.choose_layout(fp, (0.5, 0.5, 1.0), Budget(), 1, 2)
    assert layout.spatial_dims == 2 and "one voxel thick" in note
    with pytest.raises(MedsegError, match="--dims 3"):
        P.choose_layout(fp, (0.5, 0.5, 1.0), Budget(dims="3"), 1, 2)


def test_one_slice_nifti_files_plan_2d(tmp_path):
    cases = []
    for i in range(3):
        lab = np.zeros((48, 40, 1), np.uint8)
        lab[10:30, 8:20] = 1
        affine = np.diag([0.5, 0.6, 1.0, 1.0])
        img = write_volume(Volume(np.full((48, 40, 1), 7.0 + i, np.float32), affine), tmp_path / f"{i}_img.nii.gz")
        cases.append(Case(f"s{i}", {"img": img}, write_volume(Volume(lab, affine), tmp_path / f"{i}_seg.nii.gz")))
    manifest = write_manifest(Manifest(("img",), tuple(cases), "binary"), tmp_path / "m.csv")
    p = plan(manifest, tmp_path / "flat.yaml", timer=fixed_timer(0.05), progress=False)
    assert p.design.network.spatial_dims == 2 and p.design.median_shape == (48, 40, 1) and p.design.network.patch == (48, 40)
    assert load_pipeline(tmp_path / "flat.yaml").model.spatial_dims == 2


def test_ct_and_mri_normalisation():
    ct = make_fp([(1.0,) * 3] * 2, [(40,) * 3] * 2, channels=("ct",), modalities={"ct": "ct"})
    norm, _ = P.normalization(ct)
    assert norm == {"normalize": "ct", "ct_clip": [[40.0, 180.0]], "ct_mean": [100.0], "ct_std": [20.0]}
    assert P.normalization(make_fp([(1.0,) * 3] * 2, [(40,) * 3] * 2))[0] == {"normalize": "zscore_nonzero"}
    mixed = make_fp([(1.0,) * 3] * 2, [(40,) * 3] * 2, channels=("ct", "pet"), modalities={"ct": "ct", "pet": "mri"})
    assert P.normalization(mixed)[0] == {"normalize": "zscore_nonzero"}


def test_schedule_fills_the_budget_with_a_fixed_step_time():
    budget = Budget(time_budget_min=20, device="cuda")  # the measured step is the training step
    s = P.make_schedule(StepTime(0.5, 0.1), windows=10, val_cases=2, budget=budget, startup_seconds=30)
    assert (s.epochs, s.iterations, s.val_interval) == (10, 210, 1)
    used = 30 + s.epochs * s.iterations * 0.5 + math.ceil(s.epochs / s.val_interval) * s.validation_seconds
    assert used <= 20 * 60 and s.epochs >= P.MIN_EPOCHS
    assert used > 20 * 60 - s.iterations * 0.5 - s.validation_seconds  # not another epoch's room left
    cpu = P.make_schedule(StepTime(0.5, 0.1), windows=10, val_cases=2, budget=Budget(time_budget_min=20), startup_seconds=30)
    step = 0.5 * P.CPU_DATA_FACTOR  # on a CPU the data path shares the cores: the schedule counts the longer step
    used = 30 + cpu.epochs * cpu.iterations * step + math.ceil(cpu.epochs / cpu.val_interval) * cpu.validation_seconds
    assert P.CPU_DATA_FACTOR > 1 and used <= 20 * 60 < used + cpu.iterations * step
    assert cpu.epochs * cpu.iterations < s.epochs * s.iterations
    long = P.make_schedule(StepTime(0.3, 0.05), 20, 4, Budget(time_budget_min=600, device="cuda"), 60)
    assert long.iterations == P.ITERATIONS and long.epochs == 454
    assert math.ceil(long.epochs / long.val_interval) * long.validation_seconds <= 0.1 * (600 * 60 - 60)
    costly = P.make_schedule(StepTime(0.5, 0.5), 25, 4, budget, 30)  # one validation pass: 50 s
    assert costly.validations == 2 and costly.validations * 50 <= 0.1 * (20 * 60 - 30)
    with pytest.raises(MedsegError, match="--time-budget"):
        P.make_schedule(StepTime(5.0, 1.0), 100, 4, Budget(time_budget_min=1), 30)


def test_short_budgets_coarsen_the_spacing():
    fp, timer = make_fp([(1.0, 1.0, 1.0)] * 5, [(140, 170, 140)] * 5), flops_timer(0.002)
    exact = make_plan(fp, Budget(min_steps=0), timer)
    assert exact.coarsen_factor == 1.0 and exact.design.spacing == (1.0, 1.0, 1.0)
    assert exact.schedule.epochs * exact.schedule.iterations < 1000
    slow = make_plan(fp, Budget(min_steps=1000), timer)
    factor = slow.coarsen_factor
    assert 1 < factor < 2 and slow.design.spacing == (factor,) * 3
    assert slow.schedule.epochs * slow.schedule.iterations >= 1000
    finer = P.COARSEN_FACTORS[P.COARSEN_FACTORS.index(factor) - 1]  # the first factor that suffices is taken
    design = P.design_at(fp, (finer,) * 3, P.Layout((0, 1, 2), 3), Budget(), 1, 2)
    schedule = P.make_schedule(timer(design.network, 2), P.windows_per_case(design, 0.25), 1, Budget(), 0.0)
    assert schedule.epochs * schedule.iterations < 1000


def test_coarsening_leaves_a_coarse_axis_alone():
    assert P.coarsen((0.8, 0.8, 5.0), 2.0, (0, 1, 2)) == (1.6, 1.6, 5.0)
    assert P.coarsen((0.8, 5.0, 0.8), 1.5, (0, 2)) == (1.2, 5.0, 1.2)


def test_plan_of_a_known_dataset_follows_every_rule():
    fp = make_fp([(1.0, 1.0, 1.0)] * 10, [(139, 170, 135)] * 10, folds=[i % 5 for i in range(10)])
    p = make_plan(fp, Budget(min_steps=0), fixed_timer(2.0, 0.5))
    net = p.design.network
    assert p.design.spacing == (1.0, 1.0, 1.0) and p.design.median_shape == (139, 170, 135)
    assert net.model_name == "unet" and net.spatial_dims == 3 and all(p_ % 32 == 0 for p_ in net.patch)
    assert p.design.memory_bytes <= p.design.available_bytes and p.design.batch == 2
    assert p.normalization == {"normalize": "zscore_nonzero"} and p.val_cases == 2
    s = p.schedule
    assert s.epochs * s.iterations * 2.0 + s.validations * s.validation_seconds <= 20 * 60


def test_tta_is_planned_while_its_passes_over_a_median_case_fit_the_limit():
    fp = make_fp([(1.0, 1.0, 1.0)] * 5, [(139, 170, 135)] * 5)
    design = make_plan(fp, Budget(min_steps=0), fixed_timer(2.0, 0.5)).design
    windows = P.windows_per_case(design, 0.25)
    limit_window = P.TTA_MAX_SECONDS / (8 * windows)  # the forward time at which 8 mirrored passes reach the limit
    fast = make_plan(fp, Budget(min_steps=0), fixed_timer(2.0, 0.9 * limit_window))
    slow = make_plan(fp, Budget(min_steps=0), fixed_timer(2.0, 1.1 * limit_window))
    assert fast.tta and "8 passes" in fast.notes["tta"]
    assert not slow.tta and slow.notes["tta"].startswith("off")


def test_cascade_splits_the_epochs_and_refines_with_the_same_network_at_the_data_spacing():
    from medseg.planning.cascade import plan_cascade

    fp = make_fp([(1.0, 1.0, 1.0)] * 5, [(140, 170, 140)] * 5, folds=[0, 1, 2, 3, 4])
    coarse = make_plan(fp, Budget(min_steps=1000), flops_timer(0.002))
    assert coarse.coarsen_factor > 1
    stage1, refiner = plan_cascade(coarse, fp, "../runs/x")
    s, s1, s2 = coarse.schedule, stage1.schedule, refiner.schedule
    assert s1.epochs + s2.epochs == s.epochs and s1.epochs == round(s.epochs * 2 / 3) and s2.epochs >= 1
    assert s1.iterations == s2.iterations == s.iterations  # the same step: the same iterations per epoch
    assert stage1.design == coarse.design and stage1.cascade is None
    # the localiser's recipe: half the patches on foreground, only mirroring and brightness/contrast augmentation
    assert stage1.foreground_fraction == 0.5 and coarse.foreground_fraction == 0.33
    assert stage1.augmentation == {k: 0.0 for k in ("rotation_p", "scale_p", "noise_p", "blur_p", "lowres_p", "gamma_p")}
    assert refiner.augmentation is None and coarse.augmentation is None
    assert refiner.design.spacing == coarse.target_spacing == (1.0, 1.0, 1.0)
    assert refiner.design.network == coarse.design.network and refiner.design.median_shape == (140, 170, 140)
    assert refiner.foreground_fraction == 1.0 and refiner.cascade == {"localiser": "../runs/x", "margin_mm": 6.0}
    assert refiner.init_from == "../runs/x" and stage1.init_from is None  # the refiner starts from the first stage
    assert s2.val_interval == s2.epochs and s2.validations == 1
    # the refiner's validation and TTA are costed on the fine grid's windows
    fine_windows = P.windows_per_case(refiner.design, coarse.overlap)
    assert s2.validation_seconds == pytest.approx(coarse.val_cases * fine_windows * coarse.timing.forward_seconds)
    assert refiner.tta == P.tta_rule(refiner.design, coarse.timing, coarse.overlap)[0]
    budget = coarse.budget.time_budget_min
    assert stage1.budget.time_budget_min + refiner.budget.time_budget_min == pytest.approx(budget)
    # each stage caches its own grid's cases: 140 cases of 1 mm fit half of 8 GiB at the coarse grid, not at 1 mm
    many = make_fp([(1.0, 1.0, 1.0)] * 140, [(140, 170, 140)] * 140, BRATS_CHANNELS, folds=[i % 5 for i in range(140)])
    stage1, refiner = plan_cascade(make_plan(many, Budget(min_steps=1000), flops_timer(0.002)), many, "../runs/x")
    assert (stage1.cache, refiner.cache) == ("memory", "disk") and "over half" in refiner.notes["cache"]
    with pytest.raises(MedsegError, match="nothing for a second stage"):
        plan_cascade(make_plan(fp, Budget(min_steps=0), flops_timer(0.002)), fp, "../runs/x")


def test_plan_cascade_writes_both_stages_and_the_refiner_finds_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = _ct_dataset(tmp_path / "data", n=4, shape=(60, 52, 24))
    out = tmp_path / "pipelines" / "ct.yaml"
    p = plan(manifest, out, timer=fixed_timer(2.0), min_steps=10_000, progress=False, cascade=True)
    first, refiner = load_pipeline(out), load_pipeline(tmp_path / "pipelines" / "ct_refiner.yaml")
    assert p.coarsen_factor > 1 and first.preprocessing.spacing == p.design.spacing and first.cascade.localiser is None
    assert refiner.name == "ct_refiner" and refiner.preprocessing.spacing == p.target_spacing
    assert refiner.sampling.patch_size == first.sampling.patch_size and refiner.model.kwargs == first.model.kwargs
    assert refiner.sampling.foreground_fraction == 1.0 and refiner.cascade.average == ()
    assert refiner.training.epochs + first.training.epochs >= 2 and refiner.training.val_interval == refiner.training.epochs
    # the refiner names the run folder the first stage is trained into (runs/ct from the working folder)
    assert refiner.cascade.localiser == "../runs/ct" and refiner.resolve(refiner.cascade.localiser) == (tmp_path / "runs" / "ct").resolve()
    assert refiner.training.init_from == "../runs/ct" and first.training.init_from is None  # warm start from stage 1
    assert "stage 1 of 2" in out.read_text()
    # the localiser trains with mirroring and brightness/contrast only; the refiner with nnU-Net's defaults
    off = ("rotation_p", "scale_p", "noise_p", "blur_p", "lowres_p", "gamma_p")
    assert all(getattr(first.augmentation, k) == 0 for k in off) and first.sampling.foreground_fraction == 0.5
    assert first.augmentation.mirror_p == refiner.augmentation.mirror_p == 0.5
    assert first.augmentation.brightness_p == first.augmentation.contrast_p == 0.15
    assert all(getattr(refiner.augmentation, k) > 0 for k in off)


# ---------------------------------------------------------------------------------------------- written pipeline
def test_written_pipeline_loads_and_equals_the_plan(tmp_path):
    manifest = _ct_dataset(tmp_path / "data", n=4, shape=(50, 43, 21))  # the patch is rounded below the median shape
    p = plan(manifest, tmp_path / "pipelines" / "ct.yaml", timer=flops_timer(), progress=False)
    text = (tmp_path / "pipelines" / "ct.yaml").read_text()
    assert "# " in text.splitlines()[0] and "augmentation:" in text
    loaded = load_pipeline(tmp_path / "pipelines" / "ct.yaml")
    net, d = p.design.network, p.design
    assert loaded.name == "ct" and Path(loaded.data.manifest) == Path("../data/manifest.csv")
    assert loaded.resolve(loaded.data.manifest) == manifest.resolve()
    assert loaded.preprocessing.spacing == d.spacing and loaded.preprocessing.orientation == p.layout.orientation
    assert loaded.preprocessing.normalize == "ct" and loaded.preprocessing.ct_mean == tuple(p.normalization["ct_mean"])
    assert loaded.preprocessing.ct_clip == tuple(tuple(c) for c in p.normalization["ct_clip"])
    assert loaded.model.name == net.model_name and loaded.model.kwargs == net.model_kwargs
    assert loaded.model.spatial_dims == net.spatial_dims and loaded.sampling.patch_size == net.patch
    assert loaded.sampling.batch_size == d.batch and loaded.roi_size == net.patch
    assert (loaded.training.epochs, loaded.training.iterations_per_epoch) == (p.schedule.epochs, p.schedule.iterations)
    assert loaded.training.val_interval == p.schedule.val_interval and loaded.optimizer.name == p.optimizer["name"]
    assert loaded.loss.batch_dice is True and loaded.inference.tta == p.tta
    assert loaded.loss.deep_supervision is p.deep_supervision is False  # a short schedule (deep_supervision_rule)
    from medseg.planning.planner import MIN_STEPS

    assert p.budget.min_steps == MIN_STEPS and "--min-steps" not in text  # the default, not written in the command
    from medseg.data.augment import Augmentation

    assert loaded.augmentation == Augmentation()
    fp_json = json.loads((tmp_path / "pipelines" / "ct.fingerprint.json").read_text())
    assert fp_json["manifest"] == "../data/manifest.csv" and str(tmp_path) not in json.dumps(fp_json)


def test_cli_plan_measures_the_step_time(tmp_path, capsys):
    manifest = _ct_dataset(tmp_path / "data", n=2, shape=(24, 20, 16))
    out = tmp_path / "p.yaml"
    assert main(["plan", str(manifest), "-o", str(out), "--time-budget", "5", "--no-progress"]) == 0
    assert "epochs x" in capsys.readouterr().out and (tmp_path / "p.fingerprint.json").is_file()
    loaded = load_pipeline(out)
    assert loaded.training.device == "cpu" and "measured" in out.read_text()
    # --cascade: the plan coarsens (too few steps for --min-steps) and the refiner is written beside it
    assert main(["plan", str(manifest), "-o", str(tmp_path / "c.yaml"), "--time-budget", "5", "--min-steps", "1000000",
                 "--cascade", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "c_refiner.yaml: the refiner" in said and "--output runs/c" in said
    assert load_pipeline(tmp_path / "c_refiner.yaml").cascade.localiser is not None
    assert main(["plan", str(manifest), "-o", str(tmp_path / "d.yaml"), "--time-budget", "5", "--min-steps", "0",
                 "--cascade", "--no-progress"]) == 1
    assert "nothing for a second stage" in capsys.readouterr().err


def test_cli_plan_bad_input_is_one_line(tmp_path, capsys):
    manifest = _ct_dataset(tmp_path / "data", n=2)
    assert main(["plan", str(manifest), "-o", str(tmp_path / "p.txt")]) == 1
    assert "give a .yaml name" in capsys.readouterr().err
    assert main(["plan", str(manifest), "-o", str(tmp_path / "p.yaml"), "--modality", "ct,mri"]) == 1
    assert "one per channel" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real data
def test_spleen_ct_plan(shared_data, tmp_path):
    folder = shared_data / "spleen_ct"
    case = Case("spleen2", {"ct": folder / "spleen2_ct.nii.gz"}, folder / "spleen2_seg.nii.gz")
    manifest = write_manifest(Manifest(("ct",), (case,), "binary"), tmp_path / "spleen.csv")
    p = plan(manifest, tmp_path / "spleen.yaml", timer=flops_timer(), progress=False)
    assert p.normalization["normalize"] == "ct" and -200 < p.normalization["ct_clip"][0][0] < p.normalization["ct_clip"][0][1] < 400
    assert p.target_spacing == pytest.approx((0.7949, 0.7949, 5.0), abs=1e-3)
    assert p.design.network.spatial_dims == 2 and p.layout.orientation == "RAS"  # 26 slices: 2D across S
    three = plan(manifest, tmp_path / "spleen3d.yaml", dims=3, timer=flops_timer(), progress=False)
    net = three.design.network
    assert net.model_name == "dynunet" and net.kernels[0] == (3, 3, 1) and net.strides[0] == (2, 2, 1)
    assert load_pipeline(tmp_path / "spleen3d.yaml").model.kwargs == net.model_kwargs


def test_nrrd_brain_tumor_plan(shared_data, tmp_path):
    folder = shared_data / "nrrd_brain_tumor"
    cases = tuple(Case(f"brain{i}", {"t1": folder / f"brain{i}_image.nrrd"}, folder / f"brain{i}_label.nrrd") for i in (1, 2))
    manifest = write_manifest(Manifest(("t1",), cases, "binary"), tmp_path / "brain.csv")
    p = plan(manifest, tmp_path / "brain.yaml", timer=flops_timer(), progress=False)
    assert p.target_spacing[:2] == pytest.approx((0.78125, 0.78125), abs=1e-3) and p.target_spacing[2] == pytest.approx(6.5)
    assert p.design.network.spatial_dims == 2 and p.layout.orientation == "RAS"  # anisotropic: 2D across S
    assert p.normalization == {"normalize": "zscore_nonzero"}
    load_pipeline(tmp_path / "brain.yaml")


def test_brats_20_case_plan(shared_data, tmp_path):
    manifest = ROOT / "data_manifests" / "brats18_20.csv"
    p = plan(manifest, tmp_path / "brats.yaml", timer=flops_timer(), min_steps=0, progress=False)
    assert p.cases == 20 and p.val_cases == 4 and p.target == "regions" and p.out_channels == 3
    assert p.target_spacing == (1.0, 1.0, 1.0) and p.design.network.spatial_dims == 3
    assert p.normalization == {"normalize": "zscore_nonzero"} and p.design.network.model_name == "unet"
    assert all(n % d == 0 for n, d in zip(p.design.network.patch, p.design.network.divisor))
    fp = json.loads((tmp_path / "brats.fingerprint.json").read_text())
    assert fp["modalities"] == {ch: "mri" for ch in BRATS_CHANNELS} and set(fp["classes"]) == {"1", "2", "4"}
    text = (tmp_path / "brats.fingerprint.json").read_text()
    assert '"/' not in text  # no absolute path


def test_shipped_brats_plan_loads():
    path = ROOT / "pipelines" / "brats_planned.yaml"
    if not path.exists():
        pytest.skip("pipelines/brats_planned.yaml not written")
    p = load_pipeline(path)
    assert p.data.manifest == "../data_manifests/brats18_20.csv"
    fp = (ROOT / "pipelines" / "brats_planned.fingerprint.json").read_text()
    assert "/work" not in fp and '"/' not in fp


def test_shipped_brats_cascade_is_the_planners_two_stages():
    first = load_pipeline(ROOT / "pipelines" / "brats_cascade.yaml")
    refiner = load_pipeline(ROOT / "pipelines" / "brats_cascade_refiner.yaml")
    assert first.data.manifest == refiner.data.manifest == "../data_manifests/brats18_20.csv"
    assert first.preprocessing.spacing == (2.0, 2.0, 2.0) and refiner.preprocessing.spacing == (1.0, 1.0, 1.0)
    assert first.model == refiner.model and first.sampling.patch_size == refiner.sampling.patch_size
    assert first.training.iterations_per_epoch == refiner.training.iterations_per_epoch
    assert (first.training.epochs, refiner.training.epochs) == (7, 3) and refiner.training.val_interval == 3
    assert refiner.sampling.foreground_fraction == 1.0 and first.cascade.localiser is None
    assert first.sampling.foreground_fraction == 0.5 and first.augmentation.rotation_p == 0
    assert refiner.resolve(refiner.cascade.localiser) == (ROOT / "runs" / "brats_cascade").resolve()
    assert refiner.training.init_from == refiner.cascade.localiser  # warm start from the first stage


@pytest.mark.slow
def test_memory_estimate_against_a_measured_step():
    import subprocess
    import sys

    cfg = {"patch": [64, 64, 64], "batch": 2, "bf16": False, "base": 16}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_memory.py"), "--child", json.dumps(cfg)],
                         capture_output=True, text=True, check=True)
    grown = json.loads(out.stdout.strip().splitlines()[-1])["grown"]
    est = training_bytes(build_network((64, 64, 64), (1.0,) * 3, 16, 256), 2, 4, 3, False)
    assert grown <= est <= 2.0 * grown


def test_a_step_measured_under_load_says_so(monkeypatch):
    import torch

    from medseg.planning import measure
    from medseg.planning.network import build_network
    from medseg.runtime import resolve_precision

    # (wall s, busy CPU s of the machine, CPU s of this process): 3 busy core-seconds in 2 s, 1 of them ours
    assert measure.other_cores((0.0, 100.0, 5.0), (2.0, 103.0, 6.0)) == pytest.approx(1.0)
    assert measure.other_cores((0.0, 100.0, 5.0), (2.0, 101.0, 6.0)) == 0.0  # only our own work
    assert measure.other_cores(None, (2.0, 103.0, 6.0)) is None
    snap = measure.cpu_snapshot()
    if snap is not None:  # Linux: real readings move forward
        later = measure.cpu_snapshot()
        assert later[0] > snap[0] and later[1] >= snap[1] and later[2] >= snap[2]
    net = build_network((16, 16, 16), (1.0, 1.0, 1.0), 4, 16)
    timer = measure.step_timer(1, 2, "labels", torch.device("cpu"), resolve_precision("off", torch.device("cpu")),
                               warmup=0, steps=1)
    readings = iter([(0.0, 0.0, 0.0), (1.0, 2.0, 0.5)])  # 1.5 cores of others during the measurement
    monkeypatch.setattr(measure, "cpu_snapshot", lambda: next(readings))
    assert "WARNING: other processes used 1.5 CPU core(s)" in timer(net, 2).note
    readings = iter([(0.0, 0.0, 0.0), (1.0, 0.6, 0.5)])  # 0.1: a quiet machine
    assert "WARNING" not in timer(net, 2).note


def test_step_timer_measures_under_the_allocator_setting_of_training(monkeypatch):
    """The plan's step time is training's: the timer tunes the allocator as ``medseg train`` does (without it a
    large CPU step measured 2x slow, docs/performance.md), also when ``medseg.plan`` is called from Python."""
    import torch

    import medseg.runtime
    from medseg.planning import measure
    from medseg.planning.network import build_network
    from medseg.runtime import resolve_precision

    calls = []
    monkeypatch.setattr(medseg.runtime, "tune_allocator", lambda: calls.append("tuned") or True)
    timer = measure.step_timer(1, 2, "labels", torch.device("cpu"), resolve_precision("off", torch.device("cpu")),
                               warmup=0, steps=1)
    assert calls == []  # nothing before a measurement
    timer(build_network((16, 16, 16), (1.0, 1.0, 1.0), 4, 16), 2)
    assert calls == ["tuned"]


@pytest.mark.parametrize("name", ["polyp_endotect", "isbi2012_em"])
def test_real_2d_image_sets_plan_2d_with_rgb_scaling(shared_data, tmp_path, name):
    """Photographs and 8-bit microscopy: a 2D network, values divided by 255 (no per-image z-score), whole images."""
    from medseg.data.layouts import build_manifest
    from medseg.data.manifest import Manifest

    full = build_manifest("isbi-em" if name == "isbi2012_em" else "auto", shared_data / name)
    manifest = write_manifest(Manifest(full.channels, full.cases[:6], full.label_scheme), tmp_path / f"{name}.csv")
    p = plan(manifest, tmp_path / f"{name}.yaml", timer=flops_timer(), progress=False)
    assert p.design.network.spatial_dims == 2 and p.normalization == {"normalize": "rgb"}
    pipeline = load_pipeline(tmp_path / f"{name}.yaml")
    assert pipeline.preprocessing.normalize == "rgb" and pipeline.preprocessing.crop_foreground is False
    assert pipeline.model.spatial_dims == 2 and len(pipeline.sampling.patch_size) == 2


def test_8bit_2d_images_are_scaled_not_zscored():
    flat = make_fp([(1.0, 1.0, 1.0)] * 2, [(64, 48, 1)] * 2, channels=("R", "G", "B"))
    eight_bit = dataclasses.replace(flat, intensity={ch: IntensityStats(100.0, 20.0, 5.0, 250.0, 0.0, 255.0, 1000) for ch in flat.channels})
    assert P.normalization(eight_bit)[0] == {"normalize": "rgb"}
    assert P.normalization(flat)[0] == {"normalize": "zscore_nonzero"}  # values above 255: not 8-bit
    volume = dataclasses.replace(eight_bit, cases=make_fp([(1.0,) * 3] * 2, [(40,) * 3] * 2, channels=("R", "G", "B")).cases)
    assert P.normalization(volume)[0] == {"normalize": "zscore_nonzero"}  # 3D: MRI rules
    fractions = dataclasses.replace(eight_bit, intensity={ch: IntensityStats(0.4, 0.2, 0.01, 0.99, 0.0, 1.0, 1000, False)
                                                          for ch in flat.channels})
    assert P.normalization(fractions)[0] == {"normalize": "zscore_nonzero"}  # floats in 0..1 (a 2D NIfTI): not 8-bit
    samples = intensity_stats(np.array([0.0, 12.0, 255.0])), intensity_stats(np.array([0.0, 0.5, 1.0]))
    assert samples[0].integer is True and samples[1].integer is False
