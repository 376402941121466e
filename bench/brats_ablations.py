"""The BraTS ablations of docs/results.md that are not a plain ``medseg`` command.

``tta``: predict a cross-validation run's out-of-fold cases again with mirroring TTA (nothing else changed), apply
the run's chosen postprocessing, and print the mean Dice per region raw and postprocessed::

    python bench/brats_ablations.py tta runs/brats_cv --manifest data_manifests/brats18_20.csv --output runs/tta_check

``paired``: predict the cases of one fold with several runs (each with its own prediction defaults) and score them
on the same cases, so runs trained on the same other folds compare on cases none of them saw::

    python bench/brats_ablations.py paired --fold 0 --manifest data_manifests/brats18_20.csv --output runs/compare \\
        planned=runs/brats_cv2/fold_0 old=runs/baseline16 old_final=runs/baseline16/checkpoints/last.pt

``ceiling``: the Dice of a perfect model at a pipeline's spacing — each label taken to the training grid as training
prepares it, its regions brought back to the scan's grid as ``medseg predict`` does (linear, threshold 0.5), scored
against the label itself — with the package's label resampling, with nearest neighbour, and with each region's share
of a training voxel as the target (soft targets, ``data.soft_targets: true``)::

    python bench/brats_ablations.py ceiling --pipeline pipelines/brats_planned.yaml --manifest data_manifests/brats18_20.csv

``compare``: two cross-validation runs over the same cases, paired per case from their reports (``RUN/cv/report``,
out-of-fold and postprocessed): mean Dice per region, the cases each run wins, and the two-sided Wilcoxon
signed-rank p-value of the differences::

    python bench/brats_ablations.py compare runs/brats_cv3 runs/old_cv

``contrast``: why a region fails where it does. For each case of a cross-validation run, its out-of-fold Dice and
volumes for one region (``RUN/cv/report``, postprocessed) beside each channel's mean intensity, z-scored over the
channel's non-zero voxels as training normalises it, inside the expert's region, inside the rest of the expert's
tumour core (for ET: necrosis), and inside what the run predicted outside the expert's region; sorted by Dice::

    python bench/brats_ablations.py contrast runs/warm_mix --region ET
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.data import read_manifest, write_manifest
from medseg.data.io import read_mask, write_volume
from medseg.evaluation import evaluate
from medseg.inference.loading import load_model
from medseg.inference.postprocess import PostprocessSettings, postprocess
from medseg.inference.batch import predict

REGIONS = ("WT", "TC", "ET")


def region_means(result) -> str:
    """``WT 0.864 TC 0.760 ET 0.627 mean 0.750 | HD95 9.5 8.8 30.3`` from an evaluation result."""
    s = result.summary
    dice = s[(s.metric == "dice") & (s.kind == "region")].set_index("target")["mean"]
    hd95 = s[(s.metric == "hd95") & (s.kind == "region")].set_index("target")["mean"]
    return (" ".join(f"{t} {dice[t]:.3f}" for t in REGIONS) + f" mean {dice[list(REGIONS)].mean():.3f} | HD95 "
            + " ".join(f"{hd95[t]:.1f}" for t in REGIONS))


def tta(run: Path, manifest_path: Path, output: Path) -> None:
    manifest = read_manifest(manifest_path)
    folds = sorted({c.fold for c in manifest.cases if c.fold is not None})
    raw, post_dir = output / "raw", output / "postprocessed"
    start = time.perf_counter()
    for k in folds:
        cases = write_manifest(replace(manifest.select(folds=[k]), path=None), output / f"fold_{k}.csv")
        predict(run / f"fold_{k}", cases, raw, tta=True, largest_component=(), et_min_voxels=0)
    print(f"{len(manifest.cases)} cases predicted with TTA in {time.perf_counter() - start:.0f} s", flush=True)
    scheme = load_model(run / f"fold_{folds[0]}").scheme
    post = PostprocessSettings.from_dict(json.loads((run / "postprocessing.json").read_text())["postprocessing"])
    for path in sorted(raw.glob("*.nii.gz")):
        vol = read_mask(path)
        write_volume(vol.with_array(postprocess(np.asarray(vol.array), scheme, post)), post_dir / path.name, dtype=np.uint8)
    for name, folder in (("raw", raw), ("postprocessed", post_dir)):
        print(f"{name}: {region_means(evaluate(folder, manifest, scheme))}", flush=True)


def paired(runs: list[str], fold: int, manifest_path: Path, output: Path) -> None:
    cases = write_manifest(replace(read_manifest(manifest_path).select(folds=[fold]), path=None), output / f"fold_{fold}.csv")
    for item in runs:
        name, _, model = item.partition("=")
        if not model:
            raise SystemExit(f"{item}: give NAME=RUN_OR_CHECKPOINT")
        predict(model, cases, output / name)
        result = evaluate(output / name, cases)
        print(f"{name}: {region_means(result)}", flush=True)
        table = result.cases[result.cases.kind == "region"].pivot_table(index="id", columns="target", values="dice")
        print(table.round(3).to_string(), flush=True)


def compare(run_a: Path, run_b: Path) -> None:
    import pandas as pd
    from scipy.stats import wilcoxon

    def dice(run: Path) -> pd.DataFrame:
        cases = pd.read_csv(run / "cv" / "report" / "cases.csv")
        cases = cases[(cases.kind == "region") & cases.target.isin(REGIONS)]
        return cases.pivot(index="id", columns="target", values="dice")[list(REGIONS)]

    a, b = dice(run_a), dice(run_b)
    if set(a.index) != set(b.index):
        raise SystemExit(f"the runs scored different cases: {sorted(set(a.index) ^ set(b.index))}")
    b = b.loc[a.index]
    a["mean"], b["mean"] = a.mean(axis=1), b.mean(axis=1)
    print(f"{len(a)} cases; A = {run_a}, B = {run_b}")
    for col in a.columns:
        diff = a[col] - b[col]
        p = wilcoxon(a[col], b[col]).pvalue if (diff != 0).any() else 1.0
        print(f"{col:>4}: A {a[col].mean():.3f}  B {b[col].mean():.3f}  A-B {diff.mean():+.3f}  "
              f"A better in {(diff > 0).sum()}, B in {(diff < 0).sum()}  Wilcoxon p = {p:.3f}  "
              f"worst A {a[col].min():.3f} B {b[col].min():.3f}")


def ceiling(pipeline_path: Path, manifest_path: Path) -> None:
    from unittest import mock

    import torch
    import torch.nn.functional as F

    from medseg.data.dataset import load_case
    from medseg.data.labels import get_scheme
    from medseg.training.config import load_pipeline

    def nearest(label, shape):
        t = torch.from_numpy(np.asarray(label, np.float32))[None, None]
        return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(label.dtype)

    pipeline, manifest = load_pipeline(pipeline_path), read_manifest(manifest_path)
    pre = pipeline.preprocessing
    rows = {"package": [], "nearest": [], "soft": []}
    scheme = get_scheme(pipeline.data.label_scheme or manifest.label_scheme)
    for case in manifest.cases:
        decoded = scheme.decode(read_mask(case.label).array, str(case.label))
        truth = scheme.to_regions(decoded).astype(bool)
        for name in rows:
            with mock.patch("medseg.data.preprocess.resample_label", nearest) if name == "nearest" else nullcontext():
                data = load_case(case, pre, scheme, soft_targets=name == "soft")
            if name == "soft":  # each region's share of a training voxel (data.soft_targets), not a label per voxel
                prepared = data.soft.astype(np.float32)
            else:
                prepared = scheme.to_regions(data.label).astype(np.float32)
            back = pre.invert(prepared, data.geometry) > 0.5
            rows[name].append([2 * (b & t).sum() / max(1, b.sum() + t.sum()) for b, t in zip(back, truth)])
        print(case.id, " ".join(f"{name} " + " ".join(f"{d:.3f}" for d in rows[name][-1]) for name in rows), flush=True)
    names = scheme.region_names
    for name, values in rows.items():
        mean = np.mean(values, axis=0)
        print(f"{name}: " + " ".join(f"{r} {d:.3f}" for r, d in zip(names, mean)), flush=True)


def contrast(run: Path, manifest_path: Path, region: str) -> None:
    import pandas as pd

    from medseg.data.io import read_volume
    from medseg.data.labels import get_scheme

    manifest = read_manifest(manifest_path)
    scheme = get_scheme(manifest.label_scheme)
    if region not in scheme.region_names:
        raise SystemExit(f"{region}: not a region of the scheme {scheme.name} ({', '.join(scheme.region_names)})")
    report = pd.read_csv(run / "cv" / "report" / "cases.csv")
    report = report[(report.kind == "region") & (report.target == region)].drop_duplicates("id").set_index("id")
    index = scheme.region_names.index(region)
    core = scheme.region_names[index - 1] if index else None  # the region the scheme nests this one in (ET: TC)
    rows = []
    for case in manifest.cases:
        if case.id not in report.index:
            raise SystemExit(f"{case.id}: not in {run / 'cv' / 'report' / 'cases.csv'}; give the run's own manifest")
        truth = scheme.to_regions(scheme.decode(read_mask(case.label).array, str(case.label))).astype(bool)
        predicted_path = Path(report.loc[case.id, "prediction"])
        predicted = scheme.to_regions(scheme.decode(read_mask(predicted_path).array, str(predicted_path),
                                                    prediction=True)).astype(bool)
        masks = {"ref": truth[index], "false+": predicted[index] & ~truth[index]}
        if core is not None:
            masks[f"{core}-{region}"] = truth[index - 1] & ~truth[index]
        row = {"id": case.id, "dice": report.loc[case.id, "dice"], "ref_ml": report.loc[case.id, "ref_ml"],
               "pred_ml": report.loc[case.id, "pred_ml"]}
        for channel, ref in case.images.items():
            image = np.asarray(read_volume(ref).array, np.float32)
            nonzero = image[image != 0]
            z = (image - nonzero.mean()) / max(float(nonzero.std()), 1e-8)
            for name, mask in masks.items():
                row[f"{channel} {name}"] = float(z[mask].mean()) if mask.any() else float("nan")
        rows.append(row)
        print(case.id, flush=True)
    table = pd.DataFrame(rows).set_index("id").sort_values("dice")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(f"{region}: out-of-fold Dice of {run} and mean z-scored intensity per channel inside the expert's "
              f"region (ref), {f'the rest of {core} ({core}-{region}), ' if core else ''}and the false positives")
        print(table.round(2).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tta", help="out-of-fold predictions of a CV run again, with mirroring TTA")
    t.add_argument("run", type=Path)
    p = sub.add_parser("paired", help="several runs scored on the cases of one fold")
    p.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER_OR_CHECKPOINT")
    p.add_argument("--fold", type=int, default=0)
    k = sub.add_parser("compare", help="two CV runs over the same cases, paired per case")
    k.add_argument("runs", nargs=2, type=Path, metavar="RUN")
    c = sub.add_parser("ceiling", help="Dice of a perfect model at a pipeline's spacing (label resampling there and back)")
    c.add_argument("--pipeline", type=Path, default=Path("pipelines/brats_planned.yaml"))
    c.add_argument("--manifest", type=Path, default=Path("data_manifests/brats18_20.csv"))
    r = sub.add_parser("contrast", help="a region's out-of-fold Dice per case beside each channel's intensity there")
    r.add_argument("run", type=Path)
    r.add_argument("--region", default="ET")
    r.add_argument("--manifest", type=Path, default=Path("data_manifests/brats18_20.csv"))
    for q in (t, p):
        q.add_argument("--manifest", type=Path, default=Path("data_manifests/brats18_20.csv"))
        q.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.what == "ceiling":
        ceiling(args.pipeline, args.manifest)
    elif args.what == "compare":
        compare(*args.runs)
    elif args.what == "contrast":
        contrast(args.run, args.manifest, args.region)
    elif args.what == "tta":
        tta(args.run, args.manifest, args.output)
    else:
        paired(args.runs, args.fold, args.manifest, args.output)


if __name__ == "__main__":
    main()
