"""The data of a training run from a pipeline: manifest, label scheme, split, prepared cases, patch dataset."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medseg.data.dataset import CaseCache, CaseData
from medseg.data.labels import LabelScheme, get_scheme
from medseg.data.manifest import Manifest, assign_folds, read_manifest
from medseg.data.augment import augment_patch
from medseg.data.sampling import choose_centre
from medseg.errors import MedsegError
from medseg.training.config import Pipeline


def resolve_manifest(p: Pipeline, run_dir: Path, is_main: bool = True, progress: bool = True) -> Path:
    """The pipeline's manifest; for ``data.synthetic`` the dataset is generated into ``run_dir/data`` once."""
    if p.data.manifest is not None:
        return p.resolve(p.data.manifest)
    path = run_dir / "data" / "manifest.csv"
    if is_main and not path.exists():
        from medseg.data.synthetic import SyntheticSpec, generate_dataset

        s = p.data.synthetic
        generate_dataset(run_dir / "data", n_cases=s.cases, spec=SyntheticSpec(shape=tuple(s.shape)), seed=s.seed, progress=progress)
    return path


def _validates(case, p: Pipeline) -> bool:
    if p.data.val_split is not None:
        return case.split == p.data.val_split
    return p.data.val_fold is not None and case.fold == p.data.val_fold


def with_folds(manifest: Manifest, p: Pipeline) -> Manifest:
    """The manifest's folds, or 5 folds assigned with the pipeline's seed when it has none."""
    if all(c.fold is None for c in manifest.cases):
        return assign_folds(manifest, 5, p.seed)
    return manifest


def split_cases(manifest: Manifest, p: Pipeline) -> tuple[Manifest, Manifest]:
    """(train, validation) cases by ``data.val_split`` or ``data.val_fold`` (folds assigned if absent)."""
    m = manifest
    if p.data.val_split is None and p.data.val_fold is not None:
        m = with_folds(m, p)
    val = replace(m, cases=tuple(c for c in m.cases if _validates(c, p)))
    train = replace(m, cases=tuple(c for c in m.cases if not _validates(c, p)
                                   and (p.data.train_split is None or c.split == p.data.train_split)))
    if not train.cases:
        raise MedsegError(f"{manifest.path}: no training cases after the split (val_fold={p.data.val_fold}, val_split={p.data.val_split}); check the folds/splits of the manifest")
    if any(c.label is None for c in train.cases):
        missing = [c.id for c in train.cases if c.label is None][:3]
        raise MedsegError(f"{manifest.path}: training cases without a label: {missing}; every training case needs a label")
    return train, val


def label_scheme(p: Pipeline, manifest: Manifest) -> LabelScheme:
    spec = p.data.label_scheme or manifest.label_scheme
    if spec is None:
        raise MedsegError("data.label_scheme: the manifest names no label scheme; set data.label_scheme (brats, brats2023, msd, binary, labels)")
    scheme = get_scheme(spec)
    if scheme.is_generic:
        raise MedsegError("data.label_scheme: training needs the label values; use a named scheme or a dict with labels")
    if p.data.target == "regions" and not scheme.regions:
        raise MedsegError(f"data.target: regions needs a scheme with regions, and '{scheme.name}' has none; use target: labels")
    if p.data.soft_targets and p.data.target != "regions":
        raise MedsegError(f"data.soft_targets: true needs data.target: regions (sigmoid shares), not {p.data.target}; "
                          "set soft_targets: false")
    if p.data.target == "regions" and scheme.has_ignore:
        raise MedsegError(f"data.target: scheme '{scheme.name}' ignores values {list(scheme.ignore)}, which only labels targets "
                          "support; use target: labels")
    return scheme


def out_channels(scheme: LabelScheme, target: str) -> int:
    """Regions, or classes including background (an instance model's object classes + background)."""
    return len(scheme.regions) if target == "regions" else len(scheme.values)


def make_target(label: np.ndarray, scheme: LabelScheme, target: str) -> np.ndarray:
    """Label values -> regions ``(R, *spatial)`` float32 or class indices ``(1, *spatial)`` int64; for
    ``instances`` the instance map itself ``(1, *spatial)`` int64 (0 background, one id per object)."""
    if target == "regions":
        return scheme.to_regions(label).astype(np.float32)
    if target == "instances":
        return label.astype(np.int64)[None]
    return scheme.to_indices(label)[None]


def check_patch_size(p: Pipeline, cases: dict[str, CaseData]) -> None:
    """An impossible patch (larger than every volume on some axis) is an error naming the key."""
    patch = tuple(p.sampling.patch_size)
    spatial = [c.shape[: len(patch)] for c in cases.values()]
    for axis, size in enumerate(patch):
        largest = max(s[axis] for s in spatial)
        if size > largest:
            raise MedsegError(
                f"sampling.patch_size: {list(patch)} is larger than every volume along axis {axis} "
                f"(largest prepared size {largest}); choose at most {largest} there or resample with preprocessing.spacing"
            )


class PatchDataset(torch.utils.data.Dataset):
    """``length`` random patches per epoch; sample ``i`` of epoch ``e`` is a pure function of (seed, e, i).

    So an epoch gives the same patches whatever the number of worker processes, and a resumed epoch
    repeats exactly the epoch that was interrupted. With several ranks, rank ``r`` takes samples r, r+W, ...
    """

    def __init__(self, cases: list[CaseData], p: Pipeline, scheme: LabelScheme, length: int, rank: int = 0, world: int = 1):
        self.cases, self.p, self.scheme = cases, p, scheme
        self.length, self.rank, self.world = length, rank, world
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def case_of(self, i: int) -> str:
        """The id of the case sample ``i`` of the current epoch is drawn from (as :meth:`__getitem__` draws it)."""
        rng = np.random.default_rng([self.p.seed, self.epoch, i * self.world + self.rank])
        return self.cases[int(rng.integers(len(self.cases)))].id

    def __getitem__(self, i: int):
        p = self.p
        rng = np.random.default_rng([p.seed, self.epoch, i * self.world + self.rank])
        case = self.cases[int(rng.integers(len(self.cases)))]
        centre = choose_centre(p.sampling.sampler, case.shape, case.class_coords, rng, p.sampling.foreground_fraction)
        soft = case.soft is not None  # data.soft_targets: the regions' shares, resampled linearly, are the target
        image, label = case.image, (case.soft if soft else case.label)
        if p.model.spatial_dims == 2:  # an axial slice through the centre: a 3D patch of depth 1
            image, label, centre = image[..., centre[2]], label[..., centre[2]], centre[:2]
        # cropped with a margin (a view), augmented, centre-cropped to the patch size; labels still label values
        image, label = augment_patch(image, label, centre, p.sampling.patch_size, p.augmentation, rng)
        return torch.from_numpy(image), torch.from_numpy(label if soft else make_target(label, self.scheme, p.data.target))


def load_cases(p: Pipeline, manifest: Manifest, scheme: LabelScheme, run_dir: Path, progress: bool,
               nan_policy: str = "error") -> CaseCache:
    pre = p.preprocessing
    cache_dir = None
    if p.data.cache == "disk":
        cache_dir = p.resolve(p.data.cache_dir) if p.data.cache_dir else run_dir / "cache"
    # instance maps keep their object ids: they are not decoded by the scheme (which says what the objects are)
    return CaseCache(manifest.cases, pre, None if p.data.target == "instances" else scheme, cache_dir=cache_dir,
                     workers=p.data.workers or 1, progress=progress, nan_policy=nan_policy, soft_targets=p.data.soft_targets)


def probe_model(p: Pipeline) -> None:
    """Build the network of a pipeline on synthetic data's channels and check its patch and window sizes, so that a
    pipeline error (model arguments, sizes the network cannot take, a loss or scheme that does not fit) is reported
    before the synthetic data is generated. The network is thrown away."""
    from medseg.data.synthetic import BRATS_CHANNELS
    from medseg.losses import create_loss
    from medseg.training.steps import ModelStep

    spec = p.data.label_scheme or "brats"
    scheme = label_scheme(p, Manifest(BRATS_CHANNELS, (), spec))
    p.augmentation.check(p.model.spatial_dims, len(BRATS_CHANNELS))
    step = ModelStep.build(p, len(BRATS_CHANNELS), out_channels(scheme, p.data.target), torch.device("cpu"))
    step.check_size(tuple(p.sampling.patch_size), "sampling.patch_size")
    step.check_size(p.roi_size, "inference.roi_size")
    if p.data.target != "instances":
        create_loss(p.loss.name, p.data.target, p.loss.batch_dice)
    del step
