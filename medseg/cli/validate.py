"""``medseg validate``: check a manifest before training on it."""
from __future__ import annotations

import argparse
import sys

from medseg.data.validate import validate_manifest

EPILOG = """examples:
  medseg validate data_manifests/brats18.csv
  medseg validate cases.json --scheme brats2023
  medseg validate cases.csv --nan-policy zero        NaN/infinite voxels are warnings (train/predict set them to 0)
Checks: every file exists and reads; channels and label share one grid; every affine is invertible; values are
finite; label values belong to the scheme. Prints one line per problem and exits 1 if there is any."""


def register(sub) -> None:
    p = sub.add_parser("validate", help="check that every case of a manifest is readable and consistent", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--scheme", default=None, help="label scheme (default: the manifest's label_scheme)")
    p.add_argument("--atol", type=float, default=1e-3, help="affine tolerance in mm between channels (default 1e-3)")
    p.add_argument("--workers", type=int, default=2, help="files read in parallel (default 2)")
    p.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                   help="NaN/infinite image voxels: error (default), or zero = a warning (train/predict --nan-policy zero set them to 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    warnings: list[str] = []
    problems = validate_manifest(args.manifest, args.scheme, atol=args.atol, workers=args.workers, progress=sys.stderr.isatty(),
                                 nan_policy=args.nan_policy, warnings=warnings)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        print(f"{args.manifest}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.manifest}: valid")
    return 0
