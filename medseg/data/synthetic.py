"""A synthetic BraTS-like dataset, generated on the fly (no download).

Each case has four channels with distinct contrasts (FLAIR, T1, T1ce, T2), a head-like ellipsoid with a
darker ventricle-like core, and a lesion made of nested irregular regions ET ⊂ TC ⊂ WT (labels 1 necrotic
core, 2 edema, 4 enhancing ring, as BraTS 2012-2021), plus Rician-like noise and a smooth bias field.
Volumes are written as NIfTI with a non-identity, non-RAS (LPS, slightly oblique, anisotropic) affine, and
a manifest lists them — the same shape of data that ``medseg manifest --layout brats2018`` produces.

Example:
    >>> from medseg.data.synthetic import SyntheticSpec, make_case
    >>> images, label, affine = make_case(SyntheticSpec(shape=(40, 36, 32)), np.random.default_rng(0))
    >>> images.shape, sorted(np.unique(label).tolist())
    ((4, 40, 36, 32), [0, 1, 2, 4])
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.data.io import write_volume
from medseg.data.layouts import BRATS_CHANNELS
from medseg.data.manifest import Case, Manifest, write_manifest
from medseg.data.volume import Volume

# Mean intensity per tissue and channel: background, brain, ventricle, edema, necrosis, enhancing.
_CONTRAST = {
    "flair": (0.0, 300.0, 120.0, 620.0, 400.0, 450.0),
    "t1": (0.0, 500.0, 200.0, 380.0, 220.0, 420.0),
    "t1ce": (0.0, 480.0, 190.0, 400.0, 200.0, 900.0),
    "t2": (0.0, 350.0, 800.0, 560.0, 750.0, 520.0),  # edema below FLAIR's relative brightness
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Settings of the generator. A different size on every axis catches axis mix-ups."""

    shape: tuple[int, int, int] = (64, 56, 48)
    spacing: tuple[float, float, float] = (1.2, 1.0, 1.4)
    noise: float = 0.04
    bias: float = 0.25
    oblique_degrees: float = 8.0
    empty_fraction: float = 0.0  # share of cases without a lesion (label all background)


def _affine(spec: SyntheticSpec) -> np.ndarray:
    """LPS orientation (x, y flipped against RAS), a small rotation about z, anisotropic spacing."""
    t = np.deg2rad(spec.oblique_degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    lin = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag(spec.spacing)
    affine = np.eye(4)
    affine[:3, :3] = lin
    center = (np.asarray(spec.shape) - 1) / 2
    affine[:3, 3] = -lin @ center + np.array([2.5, -7.0, 11.0])
    return affine


def _smooth_noise(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (np.abs(field).max() + 1e-8)


def make_case(spec: SyntheticSpec, rng: np.random.Generator, with_lesion: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: images ``(4, *shape)`` float32, label ``(*shape)`` uint8 (0/1/2/4), affine ``(4, 4)``."""
    shape = np.asarray(spec.shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    center = (shape - 1) / 2
    radii = shape * np.array([0.40, 0.42, 0.40]) * rng.uniform(0.92, 1.0, 3)
    wobble = 0.06 * _smooth_noise(spec.shape, rng, 6)
    r_head = np.sqrt((((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)) + wobble
    tissue = np.zeros(spec.shape, np.uint8)
    tissue[r_head < 1.0] = 1
    tissue[r_head < 0.22] = 2  # ventricle-like core
    label = np.zeros(spec.shape, np.uint8)
    if with_lesion:
        # a lesion centre inside the brain, off the ventricle
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        c = center + direction * radii * rng.uniform(0.35, 0.55)
        r_wt = rng.uniform(0.16, 0.24) * shape.min()
        d = np.sqrt((((grid - c[:, None, None, None])) ** 2).sum(0)) / r_wt + 0.25 * _smooth_noise(spec.shape, rng, 3)
        inside = r_head < 0.97
        wt, tc, ncr = (d < 1.0) & inside, (d < 0.55) & inside, (d < 0.32) & inside
        label[wt] = 2
        label[tc] = 4  # enhancing ring ...
        label[ncr] = 1  # ... around a necrotic core
        tissue[wt] = 3
        tissue[tc] = 5
        tissue[ncr] = 4
    bias = 1.0 + spec.bias * _smooth_noise(spec.shape, rng, 12)
    images = np.empty((4, *spec.shape), np.float32)
    for k, channel in enumerate(BRATS_CHANNELS):
        means = np.asarray(_CONTRAST[channel], np.float32)
        img = means[tissue] * rng.uniform(0.9, 1.1)
        texture = 1.0 + 0.05 * _smooth_noise(spec.shape, rng, 1.5)
        img = img * texture * bias
        noise = spec.noise * means.max() * rng.standard_normal((2, *spec.shape)).astype(np.float32)
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        img[tissue == 0] = 0.0  # skull-stripped: background is exactly 0, as in BraTS
        images[k] = img
    return images, label, _affine(spec)


def generate_dataset(out_dir: str | Path, n_cases: int = 12, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0,
                     progress: bool = False) -> Path:
    """Write ``n_cases`` synthetic cases as ``out_dir/<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz`` and a manifest.

    Returns the manifest path ``out_dir/manifest.csv`` (label scheme ``brats``, five folds assigned).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_empty = int(round(spec.empty_fraction * n_cases))
    cases = []
    iterator = range(n_cases)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="synthetic data", unit="case")
    for i in iterator:
        case_id = f"Synth_{i:03d}"
        images, label, affine = make_case(spec, rng, with_lesion=i >= n_empty)
        folder = out_dir / case_id
        paths = {}
        for k, channel in enumerate(BRATS_CHANNELS):
            paths[channel] = write_volume(Volume(np.round(images[k]).astype(np.int16), affine), folder / f"{case_id}_{channel}.nii.gz")
        seg = write_volume(Volume(label, affine), folder / f"{case_id}_seg.nii.gz")
        cases.append(Case(case_id, paths, seg, fold=i % 5))
    manifest = Manifest(BRATS_CHANNELS, tuple(cases), "brats")
    return write_manifest(manifest, out_dir / "manifest.csv")


def generate_images_2d(out_dir: str | Path, n_images: int = 8, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((61, 47), (50, 58), (44, 44)),
                       mask_format: str = "png255") -> Path:
    """A small folder of 2D colour images in the ``images-masks`` layout: ``images/imgNN.jpg|png`` (RGB, sizes
    cycling through ``sizes``, odd ones included) with a reddish disc on a textured greenish background, and
    ``masks/imgNN_mask.png`` marking the disc. ``mask_format``: ``png255`` (0/255), ``png01`` (0/1) or ``bmp1``
    (1-bit BMP, as PH2 dermoscopy masks). Returns ``out_dir``.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(n_images):
        w, h = sizes[n % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        r = rng.uniform(0.15, 0.3) * min(w, h)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 2) * 25
        rgb = np.stack([np.where(disc, 190, 70), np.where(disc, 80, 140), np.where(disc, 60, 90)], -1).astype(float)
        rgb = np.clip(rgb + texture[..., None] + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
        ext = ".jpg" if n % 2 == 0 else ".png"
        Image.fromarray(rgb, "RGB").save(out / "images" / f"img{n:02d}{ext}", **({"quality": 95} if ext == ".jpg" else {}))
        if mask_format == "bmp1":
            Image.fromarray(disc).convert("1").save(out / "masks" / f"img{n:02d}_mask.bmp")
        else:
            Image.fromarray((disc * (255 if mask_format == "png255" else 1)).astype(np.uint8), "L").save(out / "masks" / f"img{n:02d}_mask.png")
    return out


def generate_instances_2d(out_dir: str | Path, n_images: int = 6, seed: int = 0, size: tuple[int, int] = (72, 56),
                          objects: tuple[int, int] = (3, 7), radius: tuple[float, float] = (4.0, 8.0)) -> Path:
    """A small folder in the ``instance-masks`` layout, like fluorescence nuclei: ``images/cellNN.png`` (grey, bright
    discs on a dark noisy background, ``size`` = width x height) and ``masks/cellNN/<k>.png`` (one 0/255 mask per
    disc). Discs may touch (some pairs are placed side by side) but never overlap. Returns ``out_dir``.

    Example:
        >>> import tempfile, os
        >>> root = generate_instances_2d(tempfile.mkdtemp(), n_images=1)
        >>> sorted(os.listdir(root))
        ['images', 'masks']
    """
    from PIL import Image

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for n in range(n_images):
        owner = np.zeros((h, w), np.int32)
        count = int(rng.integers(objects[0], objects[1] + 1))
        prev = None
        for k in range(1, count + 1):
            for _ in range(50):  # a free spot: next to the previous disc (touching) or anywhere
                r = rng.uniform(*radius)
                if prev is not None and rng.random() < 0.4:
                    cy, cx = prev[0], prev[1] + prev[2] + r + 0.5
                else:
                    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                if disc.sum() > 8 and not (owner[disc] > 0).any() and r <= cx <= w - r:
                    owner[disc] = k
                    prev = (cy, cx, r)
                    break
        image = np.where(owner > 0, 170.0, 25.0) + ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 1.5) * 20
        image = np.clip(ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 5, (h, w)), 0, 255).astype(np.uint8)
        (out / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(out / "images" / f"cell{n:02d}.png")
        folder = out / "masks" / f"cell{n:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in np.unique(owner[owner > 0]):
            Image.fromarray(((owner == k) * 255).astype(np.uint8), "L").save(folder / f"{int(k)}.png")
    return out
