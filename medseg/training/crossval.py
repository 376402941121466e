"""Cross-validation: one model per fold, out-of-fold predictions, postprocessing chosen on them, one report.

``medseg train PIPELINE --folds all --output RUN`` trains ``RUN/fold_0`` ... ``RUN/fold_{K-1}`` (fold k validates on
the cases of fold k and trains on the others), then:

1. predicts every case with the model that did not train on it (``RUN/cv/predictions``, the scans' own grids);
2. chooses the postprocessing on these out-of-fold predictions, as nnU-Net does: a region (or class) is reduced to
   its largest connected component only where that raises its mean Dice, and for BraTS-style schemes enhancing
   tumour smaller than N voxels is relabelled necrosis with N chosen from a grid (0 = off). The choice and the Dice
   before/after go to ``RUN/postprocessing.json``; ``medseg predict --model RUN`` applies it to the fold ensemble;
3. writes ``RUN/cv/report`` (``medseg evaluate`` over all out-of-fold cases, postprocessed: one report for all folds).

For a cascade's refiner (:mod:`medseg.inference.cascade`) step 1 runs both stages once per case and writes one
label map per mix: each subset of the regions averaged with the localiser, the others from the refiner alone (8 for
BraTS' WT/TC/ET). Each mix is scored after the postprocessing step 2 chooses for it, the best mean Dice over the
regions is averaged from then on (``localiser_average`` in ``RUN/postprocessing.json``) with the postprocessing
chosen for it. The regions nest, so they are chosen together: a region taken from another mix's label map would
already be cut by that map's own outer regions.

The postprocessing is chosen and scored on the same out-of-fold cases, so its gain is slightly optimistic (it is two
or three discrete choices, not a fit).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.atomic import atomic_path, write_text_atomic
from medseg.data.io import read_label, read_mask, write_volume
from medseg.data.labels import LabelScheme
from medseg.data.manifest import Manifest, read_manifest, write_manifest
from medseg.errors import MedsegError
from medseg.evaluation.metrics import MetricSettings, compute_metrics
from medseg.inference.postprocess import PostprocessSettings, postprocess
from medseg.training import setup
from medseg.training.config import Pipeline

ET_GRID = (0, 25, 50, 100, 200, 300, 500, 750, 1000)  # voxels; BraTS-style small-ET relabelling thresholds tried


def fold_pipeline(p: Pipeline, fold: int) -> Pipeline:
    """The pipeline of one fold: fold ``fold`` validates, the others train."""
    return replace(p, data=replace(p.data, val_fold=int(fold), val_split=None))


def cv_manifest(p: Pipeline, run_dir: Path, progress: bool) -> tuple[Pipeline, Manifest]:
    """The pipeline bound to one manifest for every fold (synthetic data is generated once, in ``RUN/data``)."""
    path = setup.resolve_manifest(p, run_dir, True, progress)
    if p.data.manifest is None:
        p = replace(p, data=replace(p.data, manifest=str(path.resolve()), synthetic=None))
    if p.data.cache == "disk" and not p.data.cache_dir:  # one disk cache for every fold: each case prepared once
        p = replace(p, data=replace(p.data, cache_dir=str((run_dir / "cache").resolve())))
    return p, setup.with_folds(read_manifest(path), p)


def parse_folds(text: str, available: Sequence[int]) -> list[int]:
    """``"all"`` or a comma-separated list of fold numbers, checked against the manifest's folds."""
    if text == "all":
        return list(available)
    try:
        folds = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise MedsegError(f"--folds {text!r}: give 'all' or fold numbers such as 0,1,2") from None
    missing = [f for f in folds if f not in available]
    if missing:
        raise MedsegError(f"--folds {text}: fold(s) {missing} are not in the manifest, whose folds are {list(available)}")
    return folds


def train_folds(p: Pipeline, run_dir: str | Path, folds: str = "all", resume: bool = False, progress: bool = True,
                nan_policy: str = "error") -> dict:
    """Train the folds (``"all"`` or ``"0,2"``) into ``run_dir/fold_K``; with all folds done, summarise (module doc)."""
    from medseg.atomic import check_output_dir
    from medseg.training.trainer import train

    run_dir = check_output_dir(Path(run_dir), "--output")
    if p.data.synthetic is not None and not (run_dir / "data" / "manifest.csv").exists():
        setup.probe_model(p)  # a pipeline error before any data is generated
    p, manifest = cv_manifest(p, run_dir, progress)
    available = sorted({c.fold for c in manifest.cases if c.fold is not None})
    results = {}
    for k in parse_folds(folds, available):
        print(f"fold {k} ({sum(c.fold == k for c in manifest.cases)} validation cases) -> {run_dir / f'fold_{k}'}", flush=True)
        fold_dir = run_dir / f"fold_{k}"
        results[k] = train(fold_pipeline(p, k), run_dir=fold_dir, resume=resume and (fold_dir / "checkpoints" / "last.pt").exists(),
                           progress=progress, nan_policy=nan_policy)
    done = [k for k in available if (run_dir / f"fold_{k}" / "checkpoints" / "last.pt").exists()]
    summary = summarize_cv(run_dir, manifest, available, progress) if done == available else None
    return {"run_dir": str(run_dir), "folds": results, "summary": summary}


def out_of_fold_predictions(run_dir: Path, manifest: Manifest, folds: Sequence[int], progress: bool,
                            folder: str = "predictions", **options) -> Path:
    """Predict the cases of each fold with that fold's model into ``run_dir/cv/<folder>`` (no postprocessing;
    ``options`` as :func:`medseg.inference.batch.predict` takes them)."""
    from medseg.inference.batch import predict

    out = run_dir / "cv" / folder
    for k in folds:
        predict(run_dir / f"fold_{k}", _fold_manifest(run_dir, manifest, k), out, progress=progress,
                **_no_postprocessing(), **options)
    return out


def cascade_predictions(run_dir: Path, manifest: Manifest, folds: Sequence[int], scheme: LabelScheme,
                        progress: bool) -> tuple[Path, dict, dict]:
    """A cascade's out-of-fold predictions with the regions averaged with the localiser chosen on them
    (:mod:`medseg.inference.cascade`): every case predicted once by both stages and written once per mix (each
    subset of the regions averaged, the others from the refiner alone, :func:`~medseg.inference.cascade.stage_mixes`);
    each mix scored after the postprocessing chosen for it, the best mean over the regions kept
    (:func:`~medseg.inference.cascade.choose_mix`). Returns the folder of the chosen mix's predictions (copied to
    ``RUN/cv/predictions``), the mix choice and the chosen mix's postprocessing choice
    (:func:`choose_postprocessing`)."""
    import shutil

    from medseg.inference.cascade import choose_mix, stage_mixes

    names = list(scheme.regions) or [n for n in scheme.labels if scheme.labels[n] != 0]
    folders = _cascade_variants(run_dir, manifest, folds, stage_mixes(names, bool(scheme.regions)), progress)
    # each mix scored after the postprocessing the CV would choose for it: what predict would give
    post = {mix: choose_postprocessing(_load_pairs(folder, manifest, scheme), scheme) for mix, folder in folders.items()}
    choice = choose_mix({mix: c["dice_after"] for mix, c in post.items()})
    chosen = tuple(choice["average"])
    out = run_dir / "cv" / "predictions"
    for path in prediction_paths(folders[chosen], manifest).values():
        with atomic_path(out / path.name) as tmp:
            shutil.copyfile(path, tmp)
    return out, choice, post[chosen]


def _cascade_variants(run_dir: Path, manifest: Manifest, folds: Sequence[int], mixes: Sequence[tuple[str, ...]],
                      progress: bool) -> dict[tuple[str, ...], Path]:
    """Each fold's cases predicted by that fold's refiner and localiser in one pass, written once per mix into
    ``RUN/cv/averaged_<regions>`` (``averaged_none``: the refiner alone); no postprocessing. A case whose label maps
    all exist is not predicted again."""
    from medseg.inference.inputs import resolve_inputs
    from medseg.inference.batch import predict_cases
    from medseg.inference.predictor import Predictor

    every = list(dict.fromkeys(n for mix in mixes for n in mix))
    tags = [_mix_tag(mix, every, i) for i, mix in enumerate(mixes)]
    tags = [tag if tags.count(tag) == 1 else f"mix{i}" for i, tag in enumerate(tags)]  # names that clean alike
    folders = {mix: run_dir / "cv" / f"averaged_{tag}" for mix, tag in zip(mixes, tags)}
    for k in folds:
        predictor = Predictor.from_checkpoint(run_dir / f"fold_{k}", localiser_average=every, **_no_postprocessing())
        cases = resolve_inputs([_fold_manifest(run_dir, manifest, k)], predictor.loaded.channels)
        predict_cases(predictor, cases, list(folders.values()), lambda images: predictor.cascade_variants(images, mixes),
                      progress=progress, desc=f"fold {k}, {len(mixes)} stage mixes")
    return folders


def _mix_tag(mix: Sequence[str], every: Sequence[str], index: int) -> str:
    """A folder-safe name of a mix: ``none``, ``all`` (every name of a scheme beyond three), the names joined
    (``WT_TC``), or ``mix<index>`` when that would be long."""
    import re

    if not mix:
        return "none"
    if len(every) > 3 and list(mix) == list(every):
        return "all"
    tag = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(n)) for n in mix)
    return tag if len(tag) <= 48 else f"mix{index}"


def _fold_manifest(run_dir: Path, manifest: Manifest, fold: int) -> Path:
    """``RUN/cv/fold_K.csv``: the cases of one fold, as the input of its model's predictions."""
    cases = replace(manifest, cases=tuple(c for c in manifest.cases if c.fold == fold))
    return write_manifest(replace(cases, path=None), run_dir / "cv" / f"fold_{fold}.csv")


def _no_postprocessing() -> dict:
    return {f.name: f.default for f in dataclasses.fields(PostprocessSettings) if f.name != "threshold"}


def prediction_paths(folder: Path, manifest: Manifest) -> dict[str, Path]:
    """The prediction of each case of ``manifest`` in ``folder``, found as ``medseg evaluate`` finds them
    (:func:`medseg.evaluation.evaluate.match_predictions`: ``<id>.nii.gz``, ``<id>.png``, ``<id>.tif``, ...).

    Raises:
        MedsegError: naming the cases whose prediction is missing.
    """
    from medseg.evaluation.evaluate import match_predictions

    found, _ = match_predictions(folder, [c.id for c in manifest.cases])
    missing = [case_id for case_id, ref in found.items() if ref is None]
    if missing:
        raise MedsegError(f"{folder}: no out-of-fold prediction for {len(missing)} case(s) ({', '.join(missing[:5])}); "
                          "train the missing folds, then run the summary again")
    return {case_id: ref.path for case_id, ref in found.items()}


def _load_pairs(pred_dir: Path, manifest: Manifest, scheme: LabelScheme | None = None) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """(id, prediction, reference, spacing) per labelled case, cropped to the union of both foregrounds."""
    from medseg.evaluation.surface import bounding_box

    pairs = []
    labelled = replace(manifest, cases=tuple(c for c in manifest.cases if c.label is not None))
    paths = prediction_paths(pred_dir, labelled)
    for case in labelled.cases:
        ref = read_label(case.label, scheme)
        pred = np.asarray(read_mask(paths[case.id]).array)
        box = bounding_box((pred != 0) | (np.asarray(ref.array) != 0), margin=1) or tuple(slice(0, 1) for _ in pred.shape)
        pairs.append((case.id, pred[box], np.asarray(ref.array)[box], tuple(ref.spacing)))
    return pairs


def mean_dice(pairs, scheme: LabelScheme, post: PostprocessSettings) -> dict[str, float]:
    """Mean Dice per region (or class) over ``pairs`` after ``post``."""
    which, kind = ("regions", "region") if scheme.regions else ("classes", "class")
    rows = []
    for _, pred, ref, spacing in pairs:
        table = compute_metrics(postprocess(pred, scheme, post), ref, spacing, scheme, MetricSettings(distances=False, targets=(which,)))
        rows.append(dict(zip(table.loc[table["kind"] == kind, "target"], table.loc[table["kind"] == kind, "dice"])))
    return {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}


def choose_postprocessing(pairs, scheme: LabelScheme, base: PostprocessSettings = PostprocessSettings()) -> dict:
    """The postprocessing that raises out-of-fold Dice (module doc), with the Dice before and after each choice."""
    post = base
    before = mean_dice(pairs, scheme, post)
    current = dict(before)
    trials = []
    for name in (scheme.regions or [n for n in scheme.labels if scheme.labels[n] != 0]):
        trial = replace(post, largest_component=(*post.largest_component, name))
        dice = mean_dice(pairs, scheme, trial)
        keep = dice[name] > current[name] and np.mean(list(dice.values())) >= np.mean(list(current.values()))
        trials.append({"largest_component": name, "dice": dice, "kept": bool(keep)})
        if keep:
            post, current = trial, dice
    if "ET" in scheme.labels and "NCR" in scheme.labels:
        target = "ET" if "ET" in current else next(iter(current))
        best_n, best = 0, current
        for n in ET_GRID[1:]:
            dice = mean_dice(pairs, scheme, replace(post, et_min_voxels=n))
            trials.append({"et_min_voxels": n, "dice": dice})
            if dice[target] > best[target]:
                best_n, best = n, dice
        if best_n:
            post, current = replace(post, et_min_voxels=best_n), best
    return {"postprocessing": {"largest_component": list(post.largest_component), "et_min_voxels": int(post.et_min_voxels)},
            "dice_before": before, "dice_after": current, "cases": len(pairs), "trials": trials}


def summarize_cv(run_dir: Path, manifest: Manifest, folds: Sequence[int], progress: bool = False) -> dict:
    """Out-of-fold predictions -> chosen postprocessing (``RUN/postprocessing.json``) -> ``RUN/cv/report``."""
    from medseg.evaluation import evaluate, write_report
    from medseg.inference.loading import load_model

    first = load_model(run_dir / f"fold_{folds[0]}")
    scheme = first.scheme
    if first.inference.get("localiser"):  # a cascade's refiner: which regions to average with the localiser first
        raw, cascade, choice = cascade_predictions(run_dir, manifest, folds, scheme, progress)
        choice["postprocessing"]["localiser_average"] = cascade["average"]
        choice["cascade"] = cascade
    else:
        raw, cascade = out_of_fold_predictions(run_dir, manifest, folds, progress), None
        choice = choose_postprocessing(_load_pairs(raw, manifest, scheme), scheme)
    write_text_atomic(run_dir / "postprocessing.json", json.dumps(choice, indent=2) + "\n")
    post = PostprocessSettings.from_dict(choice["postprocessing"])
    final = run_dir / "cv" / "postprocessed"
    for path in prediction_paths(raw, manifest).values():
        vol = read_mask(path)
        write_volume(vol.with_array(postprocess(np.asarray(vol.array), scheme, post)), final / path.name,
                     dtype=None if path.suffix in (".png", ".tif") else np.uint8)
    result = evaluate(final, manifest, scheme, progress=progress)
    write_report(result, run_dir / "cv" / "report")
    summary = result.summary
    if cascade is not None:
        print("stage mixes (regions averaged with the localiser: mean out-of-fold Dice, each after its postprocessing):")
        for mix in cascade["mixes"]:
            dice = "  ".join(f"{name} {value:.3f}" for name, value in mix["dice"].items())
            chosen = "  <- chosen" if mix["average"] == cascade["average"] else ""
            print(f"  {'+'.join(mix['average']) or 'none':<12} {dice}{chosen}")
    print(f"cross-validation ({choice['cases']} cases, {len(folds)} folds), postprocessing {choice['postprocessing']}:")
    print(summary[summary["metric"].isin(["dice", "hd95"]) & (summary["kind"] == ("region" if scheme.regions else "class"))]
          [["target", "metric", "mean", "std", "count"]].to_string(index=False))
    return choice
