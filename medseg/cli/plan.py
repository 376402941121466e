"""``medseg plan``: plan a pipeline (spacing, patch, network, batch, schedule) from a manifest and a budget."""
from __future__ import annotations

import argparse
import os

EPILOG = """examples:
  medseg plan data_manifests/brats18_20.csv -o pipelines/brats_planned.yaml --device cpu --time-budget 20
  medseg plan cases.csv -o pipelines/gpu.yaml --device cuda --time-budget 600      memory: the GPU's
  medseg plan spleen.csv -o pipelines/spleen.yaml --modality ct --dims 3
  medseg plan cases.csv -o pipelines/small.yaml --memory 4 --min-steps 500
  medseg plan data_manifests/brats18_20.csv -o pipelines/brats_cascade.yaml --cascade   + brats_cascade_refiner.yaml

Writes the pipeline (every planned value commented with where it came from) and, beside it,
NAME.fingerprint.json (per-case spacing, shape, classes; per-channel foreground intensities; modalities).
The step time is measured on the device (a few seconds). Then: medseg train pipelines/NAME.yaml
Rules and their sources: docs/planning.md."""


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan a pipeline from a manifest and a memory/time budget", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", metavar="MANIFEST", help="manifest of the training cases (CSV or JSON)")
    p.add_argument("-o", "--output", required=True, metavar="PIPELINE.yaml", help="pipeline file to write")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where training will run (default: cpu)")
    p.add_argument("--memory", type=float, default=None, metavar="GiB",
                   help="memory for training (default: 8 on cpu, the GPU's memory on cuda)")
    p.add_argument("--time-budget", type=float, default=20.0, metavar="MIN", help="minutes of training (default: 20)")
    p.add_argument("--dims", default="auto", choices=["auto", "2", "3"], help="2D or 3D model (default: auto)")
    p.add_argument("--modality", default=None, metavar="ct|mri[,...]",
                   help="modality of every channel, or one per channel (default: guessed from names and intensities)")
    p.add_argument("--min-steps", type=int, default=None, metavar="N",
                   help="coarsen the spacing when fewer training steps fit the budget (default: the planner's "
                        "MIN_STEPS, docs/planning.md; 0: never)")
    p.add_argument("--name", default=None, help="pipeline name (default: the output file's stem)")
    p.add_argument("--cascade", action="store_true",
                   help="when the grid had to be coarsened: a two-stage cascade, the budget split between a first "
                        "stage (the output file) and a refiner at the data's spacing (NAME_refiner.yaml beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from medseg.planning import plan  # its step timer tunes the allocator as training does
    command = f"medseg plan {args.manifest} -o {args.output} --device {args.device} --time-budget {args.time_budget:g}"
    for flag, value in (("--memory", args.memory), ("--dims", None if args.dims == "auto" else args.dims),
                        ("--modality", args.modality), ("--min-steps", args.min_steps)):
        command += f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}" if value is not None else ""
    command += " --cascade" if args.cascade else ""
    p = plan(args.manifest, args.output, device=args.device, memory_gib=args.memory, time_budget_min=args.time_budget,
             dims=args.dims, modality=args.modality, min_steps=args.min_steps, name=args.name,
             progress=False if args.no_progress else None, command=command, cascade=args.cascade)
    d, s, net = p.design, p.schedule, p.design.network
    print(f"{args.output}: {net.spatial_dims}D {net.model_name} {list(net.channels)}, spacing {list(d.spacing)} mm, "
          f"patch {list(net.patch)} x batch {d.batch}, {s.epochs} epochs x {s.iterations} iterations "
          f"({p.timing.step_seconds:.2f} s per step), normalize {p.normalization['normalize']}")
    if args.cascade:
        from medseg.planning.api import refiner_path
        from medseg.training.config import load_pipeline

        r = load_pipeline(refiner_path(args.output))
        print(f"{refiner_path(args.output)}: the refiner at {list(r.preprocessing.spacing)} mm, {r.training.epochs} epochs "
              f"x {r.training.iterations_per_epoch} iterations, localised by {r.cascade.localiser}. Train the first "
              f"stage into that folder: medseg train {args.output} --folds all --output "
              f"{os.path.relpath(r.resolve(r.cascade.localiser))}")
    elif p.coarsen_factor != 1.0:
        print(f"the grid is x{p.coarsen_factor:g} coarser than the data's: --cascade plans a refiner at the data's spacing "
              "(docs/training.md, Cascade)")
    return 0
