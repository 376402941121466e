"""``medseg demo``: the whole path on synthetic BraTS-like data, on a CPU, with no download.

synthetic data (NIfTI + manifest) -> validate -> train a small 3D U-Net -> predict the validation cases in
their own geometry -> Dice report. The experiment is ``pipelines/demo.yaml`` (shipped in the package).
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

EPILOG = """examples:
  medseg demo                          writes everything under ./medseg_demo
  medseg demo --output /tmp/demo --epochs 4
Steps: synthetic BraTS-like data -> validate -> train (pipelines/demo.yaml) -> predict -> Dice report.
The run folder can be reused: medseg predict --model medseg_demo/run --input ... --output ..."""


def register(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train -> predict -> Dice report (minutes, CPU)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="medseg_demo", metavar="DIR", help="where to write (default ./medseg_demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo pipeline's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def demo_pipeline_path() -> Path:
    return Path(str(resources.files("medseg").joinpath("resources/demo.yaml")))


def run(args) -> int:
    from medseg.runtime import tune_allocator

    tune_allocator()  # large activations stay mapped between forward passes
    from medseg.data.validate import check_manifest
    from medseg.errors import MedsegError
    from medseg.training import setup
    from medseg.training.config import load_pipeline
    from medseg.training.trainer import train

    from medseg.atomic import check_output_dir

    out = check_output_dir(Path(args.output), "--output")
    progress = not args.no_progress and sys.stderr.isatty()
    overrides = [f"training.epochs={args.epochs}"] if args.epochs else []
    pipeline = load_pipeline(demo_pipeline_path(), overrides)
    run_dir = out / "run"
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise MedsegError(f"{out}: a demo has already run there; remove the folder or give another --output")
    print(f"[1/5] synthetic BraTS-like data -> {run_dir / 'data'}", flush=True)
    manifest = setup.resolve_manifest(pipeline, run_dir, progress=progress)
    print(f"[2/5] validate {manifest}", flush=True)
    check_manifest(manifest)
    print(f"[3/5] train {pipeline.model.name} ({pipeline.training.epochs} epochs) -> {run_dir}", flush=True)
    result = train(pipeline, run_dir=run_dir, progress=progress)
    last = result["history"][-1]
    print(f"      validation Dice WT {last.get('dice_WT', float('nan')):.3f}  TC {last.get('dice_TC', float('nan')):.3f}  "
          f"ET {last.get('dice_ET', float('nan')):.3f}", flush=True)
    validation = _validation_manifest(pipeline, manifest, out)
    predictions = out / "predictions"
    print(f"[4/5] predict the {len(validation.cases)} validation cases in their own geometry -> {predictions}", flush=True)
    from medseg.inference import predict

    predict(run_dir, validation.path, predictions, progress=progress)
    report_dir = out / "report"
    print(f"[5/5] Dice report -> {report_dir}", flush=True)
    from medseg.evaluation import evaluate, write_report

    evaluation = evaluate(predictions, validation, progress=progress)
    write_report(evaluation, report_dir)
    summary = evaluation.summary
    dice = summary[(summary["metric"] == "dice") & (summary["kind"] == "region")].set_index("target")
    print("      " + "  ".join(f"{region} Dice {dice.loc[region, 'mean']:.3f}" for region in dice.index), flush=True)
    print(f"done: open {report_dir / 'report.html'}; predict new scans with: medseg predict --model {run_dir} --input SCAN_FILES... --output DIR")
    return 0


def _validation_manifest(pipeline, manifest_path: Path, out: Path):
    """The validation cases of the demo run, written as a manifest of their own."""
    from dataclasses import replace

    from medseg.data.manifest import read_manifest, write_manifest
    from medseg.training.setup import split_cases

    _, validation = split_cases(read_manifest(manifest_path), pipeline)
    path = write_manifest(replace(validation, path=None), out / "validation.csv")
    return read_manifest(path)
