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
The run folder holds pipeline.yaml, checkpoints/{best,last}.pt, metrics.csv and tensorboard/ events."""


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
    pipeline = load_pipeline(args.pipeline, args.overrides)
    result = train(pipeline, run_dir=args.output, resume=args.resume, extend_epochs=args.extend_epochs,
                   progress=not args.no_progress and sys.stderr.isatty())
    if result["history"] and result["best_metric"] >= 0:
        print(f"{result['run_dir']}: {result['epochs']} epochs; best mean Dice {result['best_metric']:.4f} at epoch {result['best_epoch']}")
    elif result["history"]:
        print(f"{result['run_dir']}: {result['epochs']} epochs; no validation cases, so best.pt is the last epoch")
    return 0
