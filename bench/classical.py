"""Classical segmentation on real scans and images, scored by the same evaluation as the networks.

Every method runs through :func:`medseg.classical.api.segment` — the function behind ``medseg segment`` — on the
image read with :func:`medseg.classical.io.load_input`; labels are written on the input's grid and scored by
:func:`medseg.evaluation.evaluate` (what ``medseg evaluate`` runs) against the expert labels. Seeds, boxes and
circles come from the ground truth, as a user would give them: object scribbles = the label eroded, background
scribbles = outside the label dilated, on every k-th slice; a box = the label's bounding box plus a margin; a
circle = around that box. Times are per image / volume, for the method alone (reading and scoring excluded), on
whatever the machine is doing at the time.

    python bench/classical.py                                      # 3 BraTS cases, 3 skin, 3 polyp images, no CRF row
    python bench/classical.py --brats-cases 10 --skin-images 10 --polyp-images 10
    python bench/classical.py --crf-model runs/polyp_resunetpp --crf-manifest runs/heldout/polyp_endotect_fold0.csv
    python bench/classical.py --only mni skin --markdown /tmp/classical.md

Data (relative to the repository root; a missing set is skipped with a message): the MNI ICBM152 2009a template in
the installed nilearn package, ../shared/data/{brats18, spleen_ct, skin_ph2, polyp_endotect}.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("../shared/data")  # relative to the repository root (the script changes into it)
SECTIONS = ("mni", "brats", "spleen", "skin", "polyp", "crf")


class Table:
    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, data: str, method: str, user_input: str, n: int, dice: str, seconds: list[float]) -> None:
        t = f"{statistics.mean(seconds):.1f}" if seconds else "-"
        row = (data, method, user_input, str(n), dice, t)
        self.rows.append(row)
        print(" | ".join(row), flush=True)

    def markdown(self) -> str:
        head = ("data", "method", "user input", "n", "Dice", "s / image")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows]) + "\n"


def skip(what: str, why: str) -> None:
    print(f"skipped {what}: {why}", flush=True)


def run(method: str, inp, seeds=None, **kw) -> tuple[np.ndarray, float]:
    from medseg.classical.api import segment

    start = time.perf_counter()
    labels, _ = segment(method, inp, seeds, **kw)
    return labels, time.perf_counter() - start


def dice_of(pred_dir: Path, manifest, scheme=None, targets=("foreground",)) -> list[float]:
    """Mean Dice (one per target) of the predictions in ``pred_dir`` from medseg.evaluate."""
    from medseg.evaluation import evaluate

    res = evaluate(pred_dir, manifest, scheme)
    s = res.summary[(res.summary["metric"] == "dice") & (res.summary["kind"] != "case")].set_index("target")
    return [float(s.loc[t, "mean"]) for t in targets], [float(s.loc[t, "std"]) for t in targets]


def fmt(means, stds, names=None) -> str:
    if names:
        return ", ".join(f"{n} {m:.3f}" for n, m in zip(names, means))
    return f"{means[0]:.3f} ± {stds[0]:.3f}" if stds[0] == stds[0] else f"{means[0]:.3f}"


def scribbles(truth: np.ndarray, within: np.ndarray | None, every: int, erode: int = 3, dilate: int = 10) -> np.ndarray:
    """Seeds a user would draw: the object eroded (1) and the outside of the dilated object (2), on every
    ``every``-th slice of the last axis."""
    seeds = np.zeros(truth.shape, np.int32)
    inner = ndimage.binary_erosion(truth, iterations=erode)
    outer = ~ndimage.binary_dilation(truth, iterations=dilate)
    if within is not None:
        outer &= within
    seeds[inner] = 1
    seeds[outer] = 2
    keep = np.zeros(truth.shape[-1], bool)
    keep[::every] = True
    seeds[..., ~keep] = 0
    return seeds


def box_of(truth: np.ndarray, margin: int) -> list[int]:
    idx = np.nonzero(truth)
    lo = [max(int(i.min()) - margin, 0) for i in idx]
    hi = [min(int(i.max()) + 1 + margin, n) for i, n in zip(idx, truth.shape)]
    return lo + hi


# ----------------------------------------------------------------------------- sections
def mni(table: Table, work: Path) -> None:
    from medseg.classical.io import load_input, write_labels
    from medseg.data.io import read_volume, write_volume
    from medseg.data.manifest import Case, Manifest
    from medseg.data.io import ImageRef

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        return skip("MNI template", "nilearn is not installed (pip install nilearn)")
    folder = Path(spec.origin).parent / "datasets" / "data"
    t1 = folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not t1.exists():
        return skip("MNI template", f"{t1} is missing from the nilearn package")
    gm = read_volume(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").array / 255.0
    wm = read_volume(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").array / 255.0
    inp = load_input([t1], case_id="mni152")
    brain = inp.image[..., 0] > 0
    ref = np.zeros(brain.shape, np.uint8)
    ref[brain] = 1  # CSF: brain voxels that are neither GM nor WM
    ref[gm > 0.5] = 2
    ref[wm > 0.5] = 3
    ref_path = write_volume(inp.grid.with_array(ref), work / "mni_ref.nii.gz", dtype=np.uint8)
    manifest = Manifest(("t1",), (Case("mni152", {"t1": ImageRef(t1)}, ImageRef(ref_path)),))
    scheme = {"name": "tissue", "labels": {"CSF": 1, "GM": 2, "WM": 3}}
    for method in ("kmeans", "gmm"):
        labels, sec = run(method, inp, k=3, mask="auto")
        write_labels(labels, inp, work / f"mni_{method}" / "mni152.nii.gz")
        means, stds = dice_of(work / f"mni_{method}", manifest, scheme, ("CSF", "GM", "WM"))
        table.add("MNI ICBM152 T1 (197×233×189)", f"{method}, k = 3, intensity, brain mask", "none", 1,
                  fmt(means, stds, ("CSF", "GM", "WM")), [sec])


def brats(table: Table, work: Path, n: int) -> None:
    from medseg.classical.io import Seeds, load_input, write_labels
    from medseg.data.io import read_volume
    from medseg.data.layouts import build_manifest

    root = DATA / "brats18"
    if not root.is_dir():
        return skip("BraTS", f"{root} is missing")
    manifest = build_manifest("brats2018", root)
    manifest = replace(manifest, cases=manifest.cases[:n])
    times = {"kmeans": [], "gmm": [], "graphcut": []}
    for case in manifest.cases:
        inp = load_input([case.images["flair"]], case_id=case.id)
        wt = read_volume(case.label).array > 0
        brain = inp.image[..., 0] > 0
        for method, kw in (("kmeans", {"k": 4}), ("gmm", {"k": 4})):
            labels, sec = run(method, inp, select="brightest", **kw)
            write_labels(labels, inp, work / f"brats_{method}" / f"{case.id}.nii.gz")
            times[method].append(sec)
        labels, sec = run("graphcut", inp, Seeds(labels=scribbles(wt, brain, every=10)))
        write_labels(labels, inp, work / "brats_graphcut" / f"{case.id}.nii.gz")
        times["graphcut"].append(sec)
    for method, what, user in (("kmeans", "k-means, k = 4, brightest cluster", "none"),
                               ("gmm", "GMM, k = 4, brightest component", "none"),
                               ("graphcut", "seeded graph cut", "scribbles on every 10th axial slice")):
        means, stds = dice_of(work / f"brats_{method}", manifest, "brats", ("WT",))
        table.add("BraTS 2018 FLAIR, whole tumour", what, user, len(manifest), fmt(means, stds), times[method])


def spleen(table: Table, work: Path) -> None:
    from medseg.classical.io import Seeds, load_input, write_labels
    from medseg.data.io import ImageRef, read_volume
    from medseg.data.manifest import Case, Manifest

    image, label = DATA / "spleen_ct" / "spleen2_ct.nii.gz", DATA / "spleen_ct" / "spleen2_seg.nii.gz"
    if not image.exists() or not label.exists():
        return skip("spleen CT", f"{image} or {label} is missing")
    inp = load_input([image], case_id="spleen2")
    truth = read_volume(label).array > 0
    manifest = Manifest(("ct",), (Case("spleen2", {"ct": ImageRef(image)}, ImageRef(label)),), "binary")
    for every in (1, 3):
        labels, sec = run("graphcut", inp, Seeds(labels=scribbles(truth, None, every=every, erode=2, dilate=5)), mask="none")
        write_labels(labels, inp, work / f"spleen_every{every}" / "spleen2.nii.gz")
        means, stds = dice_of(work / f"spleen_every{every}", manifest)
        table.add("MSD spleen CT (164×166×26)", "seeded graph cut", f"scribbles on {'every' if every == 1 else f'every {every}rd'} axial slice",
                  1, fmt(means, stds), [sec])


def images_2d(table: Table, work: Path, name: str, n: int, methods) -> None:
    from medseg.classical.io import Seeds, load_input, write_labels
    from medseg.data.io import read_label
    from medseg.data.labels import get_scheme
    from medseg.data.layouts import build_manifest

    root = DATA / name
    if not root.is_dir():
        return skip(name, f"{root} is missing")
    manifest = build_manifest("images-masks", root)
    manifest = replace(manifest, cases=manifest.cases[:n])
    scheme = get_scheme(manifest.label_scheme)
    times = {m[0]: [] for m in methods}
    for case in manifest.cases:
        inp = load_input([case.images["R"].path], case_id=case.id)
        truth = read_label(case.label, scheme).array[..., 0] == 1
        for key, method, _, _, options in methods:
            seeds, kw = options(truth)
            labels, sec = run(method, inp, seeds, **kw)
            write_labels(labels, inp, work / f"{name}_{key}" / f"{case.id}.png")
            times[key].append(sec)
    for key, method, what, user, _ in methods:
        means, stds = dice_of(work / f"{name}_{key}", manifest)
        table.add(f"{name} ({'dermoscopy' if 'skin' in name else 'colonoscopy'})", what, user, len(manifest), fmt(means, stds), times[key])


def circle_around(truth: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = box_of(truth, 0)
    r = 0.5 * max(x1 - x0, y1 - y0) * 1.1
    return [(x0 + x1) / 2, (y0 + y1) / 2, float(r)]


def skin(table: Table, work: Path, n: int) -> None:
    from medseg.classical.io import Seeds

    methods = [
        ("kmeans", "kmeans", "k-means, k = 2, darkest cluster, largest component", "none",
         lambda t: (None, {"k": 2, "select": "darkest", "largest_component": True})),
        ("snake_greedy", "snake", "snake, greedy (Williams & Shah)", "a circle around the lesion",
         lambda t: (Seeds(circle=circle_around(t)), {"solver": "greedy"})),
        ("snake_dp", "snake", "snake, dynamic programming (Amini)", "a circle around the lesion",
         lambda t: (Seeds(circle=circle_around(t)), {"solver": "dp"})),
        ("grabcut", "grabcut", "GrabCut, 5 iterations", "box: bounding box + 10 px",
         lambda t: (Seeds(box=box_of(t, 10)), {})),
    ]
    images_2d(table, work, "skin_ph2", n, methods)


def polyp(table: Table, work: Path, n: int) -> None:
    from medseg.classical.io import Seeds

    methods = [("grabcut", "grabcut", "GrabCut, 5 iterations", "box: bounding box + 10 px", lambda t: (Seeds(box=box_of(t, 10)), {}))]
    images_2d(table, work, "polyp_endotect", n, methods)


def crf(table: Table, work: Path, model: str | None, manifest_path: str | None, n: int) -> None:
    from medseg.classical.io import load_input, read_probabilities, write_labels
    from medseg.data.manifest import read_manifest
    from medseg.inference import predict

    if not model or not manifest_path:
        return skip("CRF row", "give --crf-model RUN (e.g. runs/polyp_resunetpp) and --crf-manifest of images it was not trained on")
    if not Path(model).exists() or not Path(manifest_path).exists():
        return skip("CRF row", f"{model} or {manifest_path} is missing")
    from medseg.data.manifest import write_manifest

    manifest = read_manifest(manifest_path)
    manifest = replace(manifest, cases=manifest.cases[:n])
    subset = write_manifest(manifest, work / "crf_cases.csv")
    net = work / "crf_net"
    predict(model, subset, net, probabilities=True)
    times = []
    for case in manifest.cases:
        first = next(iter(case.images.values()))
        inp = load_input([first.path], case_id=case.id)
        probs = read_probabilities(net / f"{case.id}_prob.nii.gz", inp)
        labels, sec = run("crf", inp, probabilities=probs)
        write_labels(labels, inp, work / "crf_refined" / f"{case.id}.png")
        times.append(sec)
    before = dice_of(net, manifest)
    after = dice_of(work / "crf_refined", manifest)
    table.add(f"{Path(manifest_path).stem} ({Path(model).name})", "network alone", "none", len(manifest), fmt(*before), [])
    table.add(f"{Path(manifest_path).stem} ({Path(model).name})", "network + dense CRF (defaults)", "none", len(manifest), fmt(*after), times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--brats-cases", type=int, default=3)
    parser.add_argument("--skin-images", type=int, default=3)
    parser.add_argument("--polyp-images", type=int, default=3)
    parser.add_argument("--crf-model", default=None, help="run folder of a trained 2D network, e.g. runs/polyp_resunetpp")
    parser.add_argument("--crf-manifest", default=None, help="manifest of images the network was not trained on")
    parser.add_argument("--crf-images", type=int, default=8)
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--work", default=None, help="folder for the label maps (default: a temporary folder)")
    args = parser.parse_args()
    import os

    os.chdir(ROOT)
    warnings.filterwarnings("ignore")
    table = Table()
    print("data | method | user input | n | Dice | s / image", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "mni" in args.only:
            mni(table, work)
        if "brats" in args.only:
            brats(table, work, args.brats_cases)
        if "spleen" in args.only:
            spleen(table, work)
        if "skin" in args.only:
            skin(table, work, args.skin_images)
        if "polyp" in args.only:
            polyp(table, work, args.polyp_images)
        if "crf" in args.only:
            crf(table, work, args.crf_model, args.crf_manifest, args.crf_images)
    if args.markdown:
        Path(args.markdown).write_text(table.markdown())
        print(f"wrote {args.markdown}", file=sys.stderr)
    else:
        print()
        print(table.markdown())


if __name__ == "__main__":
    main()
