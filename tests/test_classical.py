"""Classical segmentation (medseg.classical, medseg segment): synthetic images with a known answer, bad input,
files on their exact grid scored by medseg evaluate, and two real-data checks (skipped without ../shared/data)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from medseg.errors import MedsegError

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("maxflow")


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def disc(shape=(64, 64), centre=(30, 34), r=16) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) < r ** 2


@pytest.fixture(scope="module")
def blobs():
    """Two Gaussian blobs of intensity: background N(0, 0.15), a disc N(1, 0.15)."""
    truth = disc()
    rng = np.random.default_rng(0)
    image = (truth + rng.normal(0, 0.15, truth.shape)).astype(np.float32)[..., None]
    return image, truth


# ----------------------------------------------------------------------------- clustering
@pytest.mark.parametrize("method", ["kmeans", "gmm", "meanshift"])
def test_clusterers_find_two_blobs(blobs, method):
    from medseg import classical

    image, truth = blobs
    kw = {"bandwidth": 0.8} if method == "meanshift" else {"k": 2}
    labels = getattr(classical, method)(image, **kw)
    labels = labels[0] if isinstance(labels, tuple) else labels
    assert labels.shape == truth.shape
    assert labels.max() >= 2 and dice(labels == labels.max(), truth) > 0.98  # clusters numbered dark to bright


def test_gmm_posteriors_and_mask_3d():
    from medseg.classical import gmm, kmeans

    truth = disc((24, 20, 16), (12, 10, 8), 6)
    rng = np.random.default_rng(1)
    image = (2.0 * truth + 1.0 + rng.normal(0, 0.2, truth.shape)).astype(np.float32)[..., None]
    image[:3] = 0  # a zero background outside the "head"
    mask = image[..., 0] != 0
    labels, probs = gmm(image, k=2, mask=mask, return_probabilities=True)
    assert probs.shape == (3, 24, 20, 16) and np.allclose(probs.sum(0), 1, atol=1e-4) and (probs[1:, ~mask] == 0).all()
    assert (probs.argmax(0) == labels).all()  # channel c is P(label c), as medseg predict writes probabilities
    assert (labels[~mask] == 0).all() and dice(labels == 2, truth) > 0.97
    assert dice(kmeans(image, k=2, mask=mask) == 2, truth) > 0.97


def test_position_features_split_equal_intensities():
    from medseg.classical import kmeans

    image = np.ones((30, 20, 1), np.float32)
    labels = kmeans(image, k=2, features="position")
    assert len(np.unique(labels[:10])) == 1 and len(np.unique(labels[-10:])) == 1 and labels[0, 0] != labels[-1, 0]


# ----------------------------------------------------------------------------- graphs
def test_graph_cut_finds_bimodal_object():
    from medseg.classical import graph_cut

    truth = disc()
    rng = np.random.default_rng(2)
    image = (truth + rng.normal(0, 0.45, truth.shape)).astype(np.float32)[..., None]  # a threshold is noisy here
    seeds = np.zeros(truth.shape, np.int32)
    seeds[28:33, 32:37] = 1
    seeds[:3, :] = 2
    cut = graph_cut(image, seeds)
    assert dice(cut, truth) > 0.95 > dice(image[..., 0] > 0.5, truth)


def test_grabcut_random_walker_watershed_chan_vese_2d():
    from medseg.classical import chan_vese, grabcut, random_walker, watershed

    truth = disc()
    rng = np.random.default_rng(3)
    colour = np.stack([truth * 0.8 + 0.1, 0.5 - truth * 0.3, np.full(truth.shape, 0.4)], -1)
    image = (colour + rng.normal(0, 0.05, colour.shape)).astype(np.float32)
    assert dice(grabcut(image, [8, 12, 52, 56]), truth) > 0.95
    seeds = np.zeros(truth.shape, np.int32)
    seeds[30, 34], seeds[2, 2], seeds[60, 60] = 1, 2, 2
    labels, probs = random_walker(image, seeds, return_probabilities=True)
    assert dice(labels, truth) > 0.95 and probs.shape == (2, 64, 64) and (probs.argmax(0) == labels).all()
    assert dice(watershed(image, seeds), truth) > 0.9
    assert dice(chan_vese(image[..., :1]), truth) > 0.95


def test_superpixels_and_ncut():
    from medseg.classical import felzenszwalb, normalized_cut, slic

    truth = disc()
    image = np.stack([truth * 1.0, 1 - truth * 1.0, np.zeros(truth.shape)], -1).astype(np.float32)
    sp = slic(image, n_segments=50)
    assert sp.min() == 1 and len(np.unique(sp)) > 10
    assert felzenszwalb(image, scale=50).min() == 1
    nc = normalized_cut(image, n_segments=60)
    assert 2 <= len(np.unique(nc)) < 20
    vol = np.repeat(image[..., :1][:, :, None, :], 6, axis=2)
    assert slic(vol, n_segments=20, spacing=(1, 1, 2)).shape == (64, 64, 6)


def test_select_seeds_turns_superpixels_into_an_object():
    from medseg.classical import select_regions, slic

    truth = disc()
    image = truth.astype(np.float32)[..., None]
    seeds = np.zeros(truth.shape, np.int32)
    seeds[24:37, 28:41] = 1
    seeds[:4, :] = seeds[-4:, :] = seeds[:, :4] = seeds[:, -4:] = 2
    mask = select_regions(slic(image, n_segments=80), "seeds", image, seeds)
    assert dice(mask, truth) > 0.9


# ----------------------------------------------------------------------------- contours
def test_snake_greedy_and_dp_reach_the_same_contour():
    from medseg.classical.contours import fill_contour, snake_contour

    truth = disc((100, 100), (48, 50), 20)
    image = truth.astype(np.float32)[..., None]
    contours = {s: snake_contour(image, circle=(48, 50, 32), solver=s, sigma=2.0) for s in ("greedy", "dp")}
    for c in contours.values():
        r = np.sqrt(((c - [48, 50]) ** 2).sum(1))
        assert abs(r.mean() - 20) < 1.5 and dice(fill_contour(c, truth.shape), truth) > 0.95

    def dense(c):  # the closed polygon sampled every 0.1 pixel
        nxt = np.roll(c, -1, axis=0)
        return np.concatenate([c + t * (nxt - c) for t in np.linspace(0, 1, 10, endpoint=False)])

    a, b = dense(contours["greedy"].astype(float)), dense(contours["dp"].astype(float))
    dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    assert max(dist.min(1).mean(), dist.min(0).mean()) <= 1.0  # within a pixel


def test_chan_vese_3d():
    from medseg.classical import chan_vese

    truth = disc((30, 30, 20), (15, 15, 10), 7)
    image = (truth + np.random.default_rng(4).normal(0, 0.2, truth.shape)).astype(np.float32)[..., None]
    init = np.zeros(truth.shape, np.uint8)
    init[5:25, 5:25, 3:17] = 1
    assert dice(chan_vese(image, init=init, iterations=40), truth) > 0.9


# ----------------------------------------------------------------------------- CRF
def test_dense_crf_cleans_noisy_probabilities_2d_3d_and_regions():
    pytest.importorskip("pydensecrf")
    from medseg.classical import dense_crf
    from medseg.data.volume import Volume
    from medseg.inference.postprocess import crf_refine

    truth = disc()
    rng = np.random.default_rng(5)
    image = truth.astype(np.float32)[..., None] * 200
    p = np.clip(truth * 0.5 + 0.25 + rng.normal(0, 0.2, truth.shape), 0.01, 0.99).astype(np.float32)
    q = dense_crf(image, np.stack([1 - p, p]))
    assert np.allclose(q.sum(0), 1, atol=1e-3)
    assert dice(q.argmax(0), truth) > dice(p > 0.5, truth) and dice(q.argmax(0), truth) > 0.97
    vol = np.repeat(image[:, :, None], 4, axis=2)
    p3 = np.repeat(p[:, :, None], 4, axis=2)
    q3 = dense_crf(vol, p3[None], spacing=(1, 1, 3))  # one sigmoid region
    assert q3.shape == (1, 64, 64, 4) and dice(q3[0] > 0.5, np.repeat(truth[:, :, None], 4, 2)) > 0.95
    refined = crf_refine(np.stack([1 - p, p])[..., None], [Volume(image, np.eye(4))], "labels")  # medseg predict --crf
    assert refined.shape == (2, 64, 64, 1)


# ----------------------------------------------------------------------------- files, CLI, evaluate
def _png(tmp_path, array, name="img.png"):
    from medseg.data.io import write_volume
    from medseg.data.volume import Volume

    return write_volume(Volume(array[:, :, None].astype(np.uint8), np.eye(4)), tmp_path / name)


def test_cli_2d_png_and_3d_nifti_on_their_grid_scored_by_evaluate(tmp_path, capsys):
    from medseg.cli import main
    from medseg.data.io import read_volume, write_volume
    from medseg.data.volume import Volume
    from medseg.evaluation import evaluate

    truth = disc((50, 40), (25, 20), 10)
    img = _png(tmp_path, truth * 180 + 30, "case1.png")
    lab = _png(tmp_path, truth * 1, "case1_mask.png")
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps({"foreground": [[25, 20]], "background": [[1, 1], [48, 38]], "radius": 1}))
    for method, extra in (("kmeans", ["--k", "2", "--select", "brightest"]), ("graphcut", ["--seeds", str(seeds)]),
                          ("grabcut", ["--box", "10", "5", "41", "36"]), ("snake", ["--circle", "25", "20", "16", "--smooth", "1.5"])):
        assert main(["segment", method, "--input", str(img), "--output", str(tmp_path / method)] + extra) == 0
        out = read_volume(tmp_path / method / "case1.png")
        assert out.array.shape == (50, 40, 1) and dice(out.array[..., 0], truth) > 0.9, method
    manifest = tmp_path / "gt.csv"
    manifest.write_text(f"id,image,label,label_scheme\ncase1,{img.name},{lab.name},binary\n")
    report = evaluate(tmp_path / "graphcut", manifest)
    row = report.summary.query("metric == 'dice' and kind != 'case'")
    assert float(row["mean"].iloc[0]) > 0.95

    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    ball = disc((30, 28, 12), (15, 14, 6), 6)
    scan = write_volume(Volume((ball * 100 + 20).astype(np.float32), affine), tmp_path / "scan.nii.gz")
    assert main(["segment", "gmm", "--input", str(scan), "--k", "2", "--mask", "none", "--probabilities",
                 "--output", str(tmp_path / "vol" / "gmm.nii.gz")]) == 0
    out = read_volume(tmp_path / "vol" / "gmm.nii.gz")
    assert out.shape == (30, 28, 12) and np.allclose(out.affine, affine) and dice(out.array == 2, ball) > 0.99
    prob = tmp_path / "vol" / "gmm_prob.nii.gz"
    assert read_volume(prob).array.shape == (30, 28, 12, 3)
    pytest.importorskip("pydensecrf")
    assert main(["segment", "crf", "--input", str(scan), "--prob", str(prob), "--output", str(tmp_path / "crf.nii.gz")]) == 0
    assert dice(read_volume(tmp_path / "crf.nii.gz").array == 2, ball) > 0.99
    assert "gmm" in capsys.readouterr().out


@pytest.mark.parametrize("seeds, args, message", [
    ({"foreground": [[70, 5]], "background": [[1, 1]]}, [], "lies outside the image of size 50x40"),
    ({"foreground": [], "background": []}, [], "seed set is empty"),
    (None, ["--box", "10", "5", "10", "30"], "zero area"),
    (None, [], "needs seeds"),
])
def test_bad_user_input_is_one_clear_line_and_exit_1(tmp_path, capsys, seeds, args, message):
    from medseg.cli import main

    img = _png(tmp_path, disc((50, 40), (25, 20), 10) * 200)
    method = "grabcut" if "--box" in args else "graphcut"
    if seeds is not None:
        (tmp_path / "s.json").write_text(json.dumps(seeds))
        args = args + ["--seeds", str(tmp_path / "s.json")]
    assert main(["segment", method, "--input", str(img), "--output", str(tmp_path / "out")] + args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_api_errors_and_missing_library(monkeypatch):
    from medseg.classical import graph_cut, grabcut, snake

    image = np.zeros((20, 20, 1), np.float32)
    with pytest.raises(MedsegError, match="seed set is empty"):
        graph_cut(image, np.zeros((20, 20), np.int32))
    with pytest.raises(MedsegError, match="no background"):
        graph_cut(image, np.pad(np.ones((2, 2), np.int32), 9))
    with pytest.raises(MedsegError, match="not on the image grid"):
        graph_cut(image, np.ones((10, 10), np.int32))
    with pytest.raises(MedsegError, match="outside the image"):
        grabcut(image, [5, 5, 30, 10])
    with pytest.raises(MedsegError, match="2D images only"):
        snake(np.zeros((8, 8, 8, 1), np.float32), circle=(4, 4, 2))
    monkeypatch.setitem(sys.modules, "maxflow", None)
    with pytest.raises(MedsegError, match="pip install PyMaxflow"):
        graph_cut(image, np.pad(np.array([[1, 2]], np.int32), ((0, 19), (0, 18))))


# ----------------------------------------------------------------------------- real data
def test_real_skin_lesion_by_kmeans(shared_data):
    from medseg.classical.api import segment
    from medseg.classical.io import load_input
    from medseg.data.io import read_mask

    inp = load_input([shared_data / "skin_ph2" / "images" / "IMD002.bmp"])
    labels, _ = segment("kmeans", inp, k=2, select="darkest", largest_component=True)
    truth = read_mask(shared_data / "skin_ph2" / "masks" / "IMD002_lesion.bmp").array[..., 0]
    assert labels.shape == inp.shape == truth.shape and dice(labels, truth) > 0.85


def test_real_spleen_ct_by_graph_cut(shared_data):
    from scipy import ndimage

    from medseg.classical.api import segment
    from medseg.classical.io import Seeds, load_input
    from medseg.data.io import read_volume

    folder = shared_data / "spleen_ct"
    image = next(p for p in sorted(folder.glob("*.nii.gz")) if "label" not in p.name and "seg" not in p.name)
    label = next(p for p in sorted(folder.rglob("*.nii.gz")) if p != image and ("label" in p.name or "seg" in p.name))
    inp = load_input([image])
    truth = read_volume(label).array > 0
    seeds = np.zeros(truth.shape, np.int32)
    seeds[ndimage.binary_erosion(truth, iterations=3)] = 1
    seeds[~ndimage.binary_dilation(truth, iterations=8)] = 2
    labels, _ = segment("graphcut", inp, Seeds(labels=seeds), mask="none")
    assert labels.shape == truth.shape and dice(labels, truth) > 0.85
