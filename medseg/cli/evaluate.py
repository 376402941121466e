"""``medseg evaluate``: metrics of predictions against ground truth, as CSV, JSON and an HTML report."""
from __future__ import annotations

import argparse
import sys

from medseg.data.labels import list_schemes

EPILOG = """examples:
  medseg evaluate --predictions preds/ --manifest cases.csv --output report/
  medseg evaluate --predictions preds/ --manifest cases.csv --output report/ --prediction-scheme brats2023
  medseg evaluate --predictions preds.csv --manifest cases.csv --output report/ --scheme brats --workers 2
PREDICTIONS is the folder 'medseg predict' wrote (<id>.nii.gz, <id>.png for 2D images, or <id>/ subfolders) or
a manifest whose label column lists the predictions; cases are matched by id. A case without a prediction is
reported as missing; no prediction for any case is an error. Reference masks are read through the label scheme
(0/255 masks, 1-bit BMPs, trimaps: value 3 ignored). Writes REPORT_DIR/cases.csv, summary.csv, summary.json,
confusion.csv and report.html. Definitions: docs/evaluation.md.
  medseg evaluate --predictions preds/ --manifest cases.csv --output report/ --objects     (objects, lesion-wise)
--objects adds per-object scores: objects of the reference (its instance ids, or connected components) matched
one-to-one to predicted objects (<id>_instances.* from 'medseg predict --instances', or connected components);
detection precision/recall/F1, PQ, AJI, COCO-style AP and, for volumes, BraTS 2023 lesion-wise Dice and HD95."""


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, surface Dice... of predictions against ground truth",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, metavar="DIR_OR_MANIFEST")
    p.add_argument("--manifest", required=True, metavar="MANIFEST", help="ground-truth manifest (its label column)")
    p.add_argument("--output", "-o", required=True, metavar="REPORT_DIR")
    p.add_argument("--scheme", choices=list_schemes(), default=None,
                   help="label scheme of the ground truth (default: the manifest's label_scheme)")
    p.add_argument("--prediction-scheme", choices=list_schemes(), default=None,
                   help="label convention of the predictions when it differs, e.g. brats2023 (ET=3) against brats (ET=4)")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM", help="surface Dice tolerance in mm (default 1)")
    p.add_argument("--empty", choices=("brats", "nan"), default="brats",
                   help="both masks empty: 'brats' = Dice 1, distance 0 (default); 'nan' = undefined, left out of means")
    p.add_argument("--resample", action="store_true",
                   help="resample predictions that are not on the ground truth's grid (nearest neighbour) instead of stopping")
    p.add_argument("--workers", type=int, default=1, help="cases evaluated in parallel processes (default 1)")
    p.add_argument("--no-overlays", action="store_true", help="leave the overlay images out of report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
    o = p.add_argument_group("objects (--objects: detection, PQ, AJI, AP, BraTS 2023 lesion-wise Dice/HD95)")
    o.add_argument("--objects", action="store_true",
                   help="also score objects: objects.csv, object_metrics.csv, object_summary.csv and an Objects section")
    o.add_argument("--match-iou", type=float, default=0.5, metavar="IOU", help="objects match one-to-one at this IoU (default 0.5)")
    o.add_argument("--lesion-wise", action=argparse.BooleanOptionalAction, default=None,
                   help="BraTS 2023 lesion-wise Dice/HD95 (default: for volumes, not for 2D images)")
    o.add_argument("--lesion-dilation", type=int, default=3, metavar="N", help="lesion-wise: dilation iterations (default 3)")
    o.add_argument("--lesion-min-volume", type=float, default=50.0, metavar="MM3",
                   help="lesion-wise: reference lesions up to this volume are left out (default 50 mm^3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from medseg.errors import MedsegError
    from medseg.evaluation import MetricSettings, evaluate, write_report

    from medseg.atomic import check_output_dir

    if args.workers < 1:
        raise MedsegError(f"--workers {args.workers}: give at least 1")
    check_output_dir(args.output, "--output")  # before any case is evaluated
    objects = None
    if args.objects:
        from medseg.evaluation.detection import ObjectSettings

        objects = ObjectSettings(args.match_iou, args.lesion_wise, args.lesion_dilation, args.lesion_min_volume)
    result = evaluate(args.predictions, args.manifest, args.scheme, prediction_scheme=args.prediction_scheme,
                      settings=MetricSettings(tolerance_mm=args.tolerance, empty=args.empty), resample=args.resample,
                      workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(), objects=objects)
    html = write_report(result, args.output, overlays=not args.no_overlays)
    if result.unmatched:
        print(f"warning: {len(result.unmatched)} prediction(s) have no ground truth and were ignored: "
              f"{', '.join(result.unmatched[:5])}{' ...' if len(result.unmatched) > 5 else ''}", file=sys.stderr)
    status = result.cases.drop_duplicates("id")["status"]
    missing = result.cases.loc[result.cases["status"] == "missing", "id"].drop_duplicates().tolist()
    if missing:
        print(f"warning: {len(missing)} case(s) have no prediction (reported as missing): {', '.join(missing[:5])}", file=sys.stderr)
    dice = result.summary[(result.summary["metric"] == "dice") & (result.summary["kind"] != "case")]
    kind = "region" if (dice["kind"] == "region").any() else "class"
    for row in dice[dice["kind"] == kind].itertuples():
        print(f"{row.target:>12s}  Dice {row.mean:.4f} ± {row.std:.4f}  (n={row.count})")
    if result.objects is not None:
        objects = result.objects
        means = objects.summary.set_index(["target", "metric"])["mean"]
        for target in objects.cases["target"].drop_duplicates():
            shown = [(m, means.get((target, m))) for m in ("f1", "pq", "aji", "ap50", "map", "lesion_dice", "lesion_hd95")]
            print(f"{target:>12s}  " + "  ".join(f"{m} {v:.4f}" for m, v in shown if v is not None and v == v))
    print(f"{int((status == 'ok').sum())} of {status.size} cases evaluated; report: {html}")
    return 0
