"""The ``medseg`` command: a thin layer over the public functions of the package.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from medseg import __version__
from medseg.errors import MedsegError

# Sub-command modules, in the order ``medseg --help`` lists them.
COMMANDS = ("demo", "manifest", "validate", "plan", "models", "train", "predict", "evaluate", "segment")

EPILOG = """examples:
  medseg demo --output medseg_demo                 synthetic data -> train -> predict -> Dice report
  medseg manifest --layout brats2018 DATA_DIR -o cases.csv
  medseg validate cases.csv
  medseg plan cases.csv -o pipelines/planned.yaml --device cpu --time-budget 20
  medseg models
  medseg train pipelines/brats_unet3d.yaml --output runs/unet3d [--resume]
  medseg predict --model runs/unet3d --input P01_flair.nii.gz P01_t1.nii.gz P01_t1ce.nii.gz P01_t2.nii.gz --output preds
  medseg evaluate --predictions preds --manifest cases.csv --output report
  medseg segment grabcut --input photo.jpg --box 150 100 600 480 --output preds    (classical methods, no training)
run 'medseg COMMAND --help' for the options and examples of each command."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical volumetric segmentation: manifests, training, inference in the scan's geometry, Dice reports.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"medseg.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedsegError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
