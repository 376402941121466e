"""``medseg train``: run the experiment of a pipeline file."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  medseg train pipelines/demo.yaml                          synthetic data, a few minutes on a CPU
  medseg train pipelines/brats_unet3d.yaml --output runs/unet3d
  medseg train pipelines/brats_unet3d.yaml --output runs/unet3d --resume           continue after a crash
  medseg train pipelines/brats_unet3d.yaml --output runs/unet3d --resume --extend-epochs 300
  medseg train pipelines/demo.yaml --set training.epochs=5 --set sampling.batch_size=4
  torchrun --nproc_per_node 2 -m medseg train pipelines/brats_unet3d.yaml     multi-process (DDP)
  medseg train pipelines/brats_planned.yaml --folds all --output runs/cv    5-fold cross-validation + CV report
  medseg train pipelines/brats_planned.yaml --fold 2 --output runs/cv       one fold (runs/cv/fold_2)
  medseg train my_pipeline.yaml --model-module my_models.py     a model of your own (registered in my_models.py)
  medseg train my_pipeline.yaml --set model.name=monai:DynUNet   a MONAI network by name (docs/models.md)
The run folder holds pipeline.yaml (as the run started), history.jsonl (each start and resume, with the changes a
resume made: epochs, device, workers... — changes to what the run trains are refused), checkpoints/{best,last}.pt,
metrics.csv, tensorboard/ events, and train.lock while a training writes there. With --folds
all, RUN_DIR holds fold_K/ runs, cv/ (out-of-fold predictions and their report) and postprocessing.json (chosen on
the out-of-fold predictions); 'medseg predict --model RUN_DIR' then averages the folds' models."""


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a pipeline file (resumable)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    p.add_argument("--output", default=None, metavar="RUN_DIR", help="run folder (default: the pipeline's output_dir or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--extend-epochs", type=int, default=None, metavar="N",
                   help="with --resume: train a finished (or running) run up to N epochs in total")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline key, e.g. training.epochs=10 (repeatable)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, default=None, metavar="K", help="train fold K of the manifest into RUN_DIR/fold_K")
    folds.add_argument("--folds", default=None, metavar="all|K,K", help="train these folds (all: every fold, then the CV report)")
    p.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                   help="NaN/infinite image voxels: error (default), or zero = set them to 0 with a warning")
    p.add_argument("--model-module", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a module that registers models (@medseg.models.register) before reading the pipeline; "
                        "the checkpoint records it for 'medseg predict' (repeatable; or model.module in the pipeline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from medseg.runtime import tune_allocator

    tune_allocator()  # large activations stay mapped between forward passes
    from medseg.errors import MedsegError
    from medseg.training.config import load_pipeline
    from medseg.training.trainer import train

    if args.extend_epochs is not None and not args.resume:
        raise MedsegError("--extend-epochs continues an existing run: add --resume")
    if args.model_module:
        from medseg.models import load_model_module

        for module in args.model_module:
            load_model_module(module)
    pipeline = load_pipeline(args.pipeline, args.overrides)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.fold is not None or args.folds is not None:
        from pathlib import Path

        from medseg.training.crossval import train_folds

        if args.extend_epochs is not None:
            raise MedsegError("--extend-epochs works on one run: give the fold's folder (RUN_DIR/fold_K) without --fold/--folds")
        run_dir = Path(args.output or pipeline.output_dir or Path("runs") / pipeline.name)
        cv = train_folds(pipeline, run_dir, str(args.fold) if args.fold is not None else args.folds, args.resume, progress,
                         nan_policy=args.nan_policy)
        print(f"{run_dir}: folds {sorted(cv['folds'])} trained" + ("; cross-validation report in cv/report" if cv["summary"] else ""))
        return 0
    result = train(pipeline, run_dir=args.output, resume=args.resume, extend_epochs=args.extend_epochs, progress=progress,
                   nan_policy=args.nan_policy)
    if result["history"] and result["best_metric"] >= 0:
        print(f"{result['run_dir']}: {result['epochs']} epochs; best mean Dice {result['best_metric']:.4f} at epoch {result['best_epoch']}")
    elif result["history"]:
        print(f"{result['run_dir']}: {result['epochs']} epochs; no validation cases, so best.pt is the last epoch")
    return 0
