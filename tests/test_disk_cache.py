"""``data.cache: disk``: prepared cases written once as ``.npy`` files and memory-mapped, so a dataset larger than
the memory trains; patches, validation and training are those of the in-memory cache."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

from medseg.data import dataset, read_manifest
from medseg.data.dataset import CaseCache
from medseg.data.labels import get_scheme
from medseg.data.preprocess import Preprocessing
from medseg.training.config import parse_pipeline
from medseg.training.setup import PatchDataset

PRE = Preprocessing(orientation="RAS", spacing=(1.5, 1.5, 1.5), crop_foreground=True, normalize="zscore_nonzero")


def test_disk_cache_maps_the_cases_and_gives_the_same_patches(synthetic_dataset, tmp_path, monkeypatch):
    manifest, scheme = read_manifest(synthetic_dataset), get_scheme("brats")
    memory = CaseCache(manifest.cases, PRE, scheme, workers=1)
    disk = CaseCache(manifest.cases, PRE, scheme, cache_dir=tmp_path / "cache", workers=1)
    assert len(list((tmp_path / "cache").iterdir())) == len(manifest.cases)  # one folder per case, no leftovers
    for case in manifest.cases:
        a, b = memory[case.id], disk[case.id]
        assert isinstance(b.image, np.memmap) and isinstance(b.label, np.memmap)  # not read into memory
        assert all(isinstance(c.base, np.memmap) or isinstance(c, np.memmap) for c in b.class_coords.values())
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.class_coords.keys() == b.class_coords.keys() and len(a.class_coords) == 3  # NCR, ED, ET
        for v in a.class_coords:
            np.testing.assert_array_equal(a.class_coords[v], b.class_coords[v])
        np.testing.assert_array_equal(a.geometry.affine, b.geometry.affine)
        assert a.geometry.bbox == b.geometry.bbox and a.geometry.original_shape == b.geometry.original_shape

    p = parse_pipeline({"data": {"manifest": str(synthetic_dataset)}, "sampling": {"patch_size": [24, 24, 16]},
                        "augmentation": {"elastic": True}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only mapped array handed to torch would warn
        for i in range(12):
            x, y = PatchDataset(list(memory.values()), p, scheme, 12)[i]
            u, v = PatchDataset(list(disk.values()), p, scheme, 12)[i]
            assert torch.equal(x, u) and torch.equal(y, v)

    # a second run maps what the first wrote and prepares nothing; a killed writer's temporary folder is ignored
    (tmp_path / "cache" / ".x_0123.part").mkdir()
    monkeypatch.setattr(dataset, "load_case", lambda *a, **k: pytest.fail("a cached case was prepared again"))
    again = CaseCache(manifest.cases, PRE, scheme, cache_dir=tmp_path / "cache", workers=2)
    np.testing.assert_array_equal(again[manifest.cases[0].id].image, memory[manifest.cases[0].id].image)


def test_a_case_folder_without_its_last_file_is_prepared_again(synthetic_dataset, tmp_path):
    manifest, scheme = read_manifest(synthetic_dataset), get_scheme("brats")
    case = manifest.cases[0]
    first = np.array(CaseCache([case], PRE, scheme, cache_dir=tmp_path / "cache", workers=1)[case.id].image)
    (folder,) = (tmp_path / "cache").iterdir()
    np.save(folder / "image.npy", np.zeros((1, 2, 2, 2), np.float32))  # damaged ...
    (folder / "geometry.npz").unlink()  # ... and incomplete: the geometry is written last
    again = CaseCache([case], PRE, scheme, cache_dir=tmp_path / "cache", workers=1)[case.id]
    np.testing.assert_array_equal(again.image, first)
    assert [f.name for f in (tmp_path / "cache").iterdir()] == [folder.name]


def test_training_and_validation_on_the_disk_cache(tmp_path):
    from medseg.training.config import load_pipeline
    from medseg.training.trainer import train

    data = {"name": "disk", "data": {"synthetic": {"cases": 3, "shape": [32, 32, 24], "seed": 1}, "workers": 1,
                                     "cache": "disk"},
            "model": {"name": "unet", "spatial_dims": 3, "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
            "sampling": {"patch_size": [16, 16, 16], "batch_size": 2},
            "training": {"epochs": 1, "iterations_per_epoch": 2, "threads": 1}}
    path = tmp_path / "disk.yaml"
    path.write_text(yaml.safe_dump(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_pipeline(path), run_dir=tmp_path / "run", progress=False)
    assert not [w for w in caught if "not writable" in str(w.message) or "read-only" in str(w.message)]
    assert len([f for f in (tmp_path / "run" / "cache").iterdir() if (f / "image.npy").exists()]) == 3
    assert "dice_mean" in (tmp_path / "run" / "metrics.csv").read_text()  # validation ran on a mapped case
