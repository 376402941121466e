"""``medseg manifest``: build a manifest from a dataset folder in a known layout."""
from __future__ import annotations

import argparse

from medseg.data.layouts import LAYOUTS, build_manifest
from medseg.data.manifest import assign_folds, check_fold_count, write_manifest

EPILOG = """examples:
  medseg manifest --layout brats2018 ../shared/data/brats18 -o data_manifests/brats18.csv
  medseg manifest --layout brats2018 ../shared/data/brats18 ../shared/data/brats18_extra -o data_manifests/brats18_20.csv --folds 5
  medseg manifest --layout auto /data/Task01_BrainTumour -o msd.json --folds 5
  medseg manifest --layout nnunet /data/nnUNet_raw/Dataset001_BrainTumour -o d001.csv
  medseg manifest --layout images-masks ../shared/data/skin_ph2 -o data_manifests/skin_ph2.csv --folds 5

layouts:
  brats2018  ID/ID_{flair,t1,t1ce,t2,seg}.nii.gz (BraTS 2018-2020; labels 1,2,4)
  brats2021  BraTS2021_xxxxx/BraTS2021_xxxxx_{flair,t1,t1ce,t2,seg}.nii.gz (labels 1,2,4)
  brats2023  BraTS-GLI-xxxxx-xxx/...-{t2f,t1n,t1c,t2w,seg}.nii.gz (labels 1,2,3)
  msd        imagesTr/BRATS_xxx.nii.gz (4D) + labelsTr/ (labels 1 edema, 2 non-enhancing, 3 enhancing)
  nnunet     imagesTr/case_0000.nii.gz ... + labelsTr/ + dataset.json
  images-masks    images/NAME.jpg + masks/NAME.png (2D; also NAME_mask, NAME_lesion, NAME_segmentation ...)
  instance-masks  images/NAME.png + masks/NAME/*.png (one mask per object, merged)
  isbi-em         images/N.png + labels/N.png (ISBI 2012 EM: 0 membrane, 255 cell interior)
  auto       detect one of the above
2D layouts infer the label scheme from the mask values (0/255 -> binary, 1/2/3 trimaps -> trimap, lossy
0/255 -> binary_lossy, ...) and say so; --label-scheme chooses it.
Several folders of one dataset in one layout give one manifest: case ids must be unique across the folders
and the folders must have the same channels. Paths in the manifest are written relative to the manifest file."""


def register(sub) -> None:
    p = sub.add_parser("manifest", help="build a manifest (CSV/JSON) from one or more dataset folders", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="DIR", help="the dataset's root folder (several: one manifest over all of them)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="dataset layout (default: auto)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="manifest to write (.csv or .json)")
    p.add_argument("--folds", type=int, default=0, metavar="K", help="assign K cross-validation folds (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--label-scheme", metavar="NAME", help="label scheme of the masks (brats, binary, binary_lossy, foreground, "
                   "em_membrane, trimap, labels...; default: the layout's, or inferred from 2D mask values)")
    p.set_defaults(func=run)


def run(args) -> int:
    from medseg.errors import MedsegError

    if args.folds and args.folds < 2:
        raise MedsegError(f"--folds {args.folds}: give 2 or more folds (5 is usual), or leave --folds out for none")
    notes: list[str] = []
    manifest = build_manifest(args.layout, *args.folders, label_scheme=args.label_scheme, notes=notes)
    for note in notes:
        print(note)
    if args.folds:
        manifest = assign_folds(manifest, check_fold_count(args.folds, len(manifest.cases)), args.seed)
    path = write_manifest(manifest, args.output)
    labelled = sum(1 for c in manifest.cases if c.label)
    print(f"{path}: {len(manifest)} cases, channels {', '.join(manifest.channels)}, {labelled} with labels, scheme {manifest.label_scheme}")
    return 0
