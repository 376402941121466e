"""``medseg predict``: segment scans with a trained model; labels written in each scan's own geometry."""
from __future__ import annotations

import argparse
import os
import sys

from medseg.inference.windows import BLENDS, STITCH_MODES  # torch-free, like the whole command-line start-up
from medseg.runtime import PRECISIONS

EPILOG = """examples:
  medseg predict --model runs/unet3d --input Brats18_X/Brats18_X_{flair,t1,t1ce,t2}.nii.gz --output preds
  medseg predict --model runs/unet3d --input ../shared/data/brats18/Brats18_2013_11_1 --output preds   (case folder)
  medseg predict --model runs/unet3d --input cases.csv --output preds --shard 0/2                      (half the cases)
  medseg predict --model runs/cord/checkpoints/best.pt --input dicom_series_folder/ --output preds --probabilities
  torchrun --nproc_per_node 4 -m medseg predict --model runs/unet3d --input cases.csv --output preds
Writes <OUTPUT>/<case_id>.nii.gz (uint8 labels of the model's scheme, same shape/affine/orientation as the first
channel) and with --probabilities <case_id>_prob.nii.gz (float32, channels last). For a 2D image (PNG, JPEG, BMP,
TIFF) the labels are <case_id>.png of the input's width and height (16-bit when labels exceed 255; <case_id>.tif with
one page per page for a multi-page TIFF), and with
--overlay a colour overlay <case_id>_overlay.png. Cases whose output exists (a label map of the scan's shape) are
skipped, so a killed run is continued by running the same command again; its temporary files are removed then.
Inputs are checked as 'medseg validate' checks them (one grid, 3D, invertible affine, finite values) before any
compute; --nan-policy zero sets NaN/infinite voxels to 0 instead, with a warning.
  medseg predict --model runs/polyp --input ../shared/data/polyp_endotect/images/X.jpg --output preds --overlay
  medseg predict --model runs/nuclei_unet --input ../shared/data/nuclei_dsb2018/images --output preds --instances watershed
  medseg predict --model runs/nuclei_maskrcnn --input ../shared/data/nuclei_dsb2018/images --output preds --instances
With --instances, <case_id>_instances.png/.nii.gz (0 background, one id per object, same grid; PNG 8-bit up to 255
objects, else 16-bit; NIfTI uint16, uint32 beyond 65,535) and <case_id>_instances.json (method, target, and score,
size and centre of mass per object) are written beside the labels. For an instance model the label map is its
objects painted with their classes."""


def register(sub) -> None:
    p = sub.add_parser("predict", help="segment scans with a trained model (labels in the scan's own geometry)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="RUN_OR_CKPT", help="run folder of 'medseg train' or a checkpoint .pt")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="the scan's channel files in the model's order, a case or dataset folder, a manifest, or a DICOM folder")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the predictions")
    p.add_argument("--id", dest="case_id", default=None, help="output name for a single scan (default: from the first file name)")
    p.add_argument("--probabilities", action="store_true", help="also write <id>_prob.nii.gz")
    p.add_argument("--overlay", action="store_true", help="2D images: also write <id>_overlay.png (labels in colour on the image)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    p.add_argument("--nan-policy", choices=("error", "zero"), default="error",
                   help="NaN/infinite input voxels: error (default), or zero = set them to 0 with a warning")
    p.add_argument("--shard", default=None, metavar="I/N", help="predict only shard I of N (default: torchrun's RANK/WORLD_SIZE)")
    g = p.add_argument_group("sliding window (default: the checkpoint's inference settings)")
    g.add_argument("--roi", type=int, nargs="+", default=None, metavar="N", help="window size per axis")
    g.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1)")
    g.add_argument("--blend", choices=BLENDS, default=None)
    g.add_argument("--sw-batch-size", type=int, default=None, metavar="N", help="windows per forward pass")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="mirroring test-time augmentation")
    g.add_argument("--amp", choices=PRECISIONS, default=None,
                   help="mixed precision: auto = bf16/fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16; off = float32 (default auto)")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--stitch", choices=STITCH_MODES, default=None, help="where window outputs are accumulated")
    g.add_argument("--no-skip-empty", dest="skip_empty", action="store_false", default=None,
                   help="evaluate windows without foreground too (slower; same labels inside the foreground)")
    k = p.add_argument_group("cascade (default: the localiser the refiner's pipeline names; docs/training.md)")
    k.add_argument("--localiser", default=None, metavar="RUN",
                   help="first-stage model: keep the prediction near its foreground (a CV folder: fold K for fold K's model)")
    k.add_argument("--localiser-margin", dest="localiser_margin_mm", type=float, default=None, metavar="MM",
                   help="distance from the localiser's foreground within which the prediction is kept (default 6)")
    k.add_argument("--localiser-average", dest="localiser_average", nargs="+", default=None, metavar="NAME",
                   help="regions (or classes) whose probabilities are the mean of both stages, or 'none' (default: what "
                        "cross-validation chose for a fold ensemble, else the pipeline's cascade.average)")
    q = p.add_argument_group("postprocessing (default: the checkpoint's, else off)")
    q.add_argument("--threshold", type=float, default=None, help="region probability threshold (default 0.5)")
    q.add_argument("--min-component-size", type=int, default=None, metavar="VOXELS",
                   help="remove foreground components smaller than this")
    q.add_argument("--et-min-voxels", type=int, default=None, metavar="VOXELS",
                   help="relabel enhancing tumour as necrotic core when fewer voxels than this are ET (BraTS rule, e.g. 500)")
    q.add_argument("--crf", action="store_true",
                   help="refine the probabilities with a dense CRF on the scan before labelling (pip install pydensecrf2; docs/classical.md)")
    o = p.add_argument_group("objects (instance segmentation; docs/instances.md)")
    o.add_argument("--instances", nargs="?", const="auto", default=None, choices=("auto", "components", "watershed", "model"),
                   help="also write <id>_instances.png/.nii.gz (one id per object) and <id>_instances.json: connected "
                        "components, a watershed that splits touching objects, or an instance model's own objects "
                        "(auto: the model's for maskrcnn/yolact, else components)")
    o.add_argument("--instance-target", default=None, metavar="NAME",
                   help="objects of one class or region only (e.g. ET, WT); default: all foreground")
    o.add_argument("--min-object-size", type=int, default=0, metavar="VOXELS", help="drop objects smaller than this")
    o.add_argument("--min-object-ml", type=float, default=0.0, metavar="ML", help="drop objects smaller than this volume (mL)")
    o.add_argument("--min-distance", type=int, default=5, metavar="VOXELS",
                   help="watershed: minimum distance between object centres (default 5)")
    o.add_argument("--score-threshold", type=float, default=0.5,
                   help="instance models: keep objects scoring at least this (default 0.5)")
    p.add_argument("--model-module", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a module that registers models first (the checkpoint records the module it was trained "
                        "with; give this when that file moved)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_shard(text: str | None, env: dict | None = None) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; without text, torchrun's ``RANK``/``WORLD_SIZE`` (or a single shard)."""
    from medseg.errors import MedsegError

    if text is None:
        env = os.environ if env is None else env
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise MedsegError(f"--shard {text!r}: write it as I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise MedsegError(f"--shard {text}: I must be within 0..N-1 and N >= 1, e.g. 0/4")
    return index, count


def run(args) -> int:
    from medseg.runtime import tune_allocator

    tune_allocator()  # large activations stay mapped between forward passes
    from medseg.inference.batch import predict

    shard = parse_shard(args.shard)
    if getattr(args, "model_module", None):
        from medseg.models import load_model_module

        for module in args.model_module:
            load_model_module(module)
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    options = {"roi_size": args.roi, "overlap": args.overlap, "blend": args.blend, "sw_batch_size": args.sw_batch_size,
               "tta": args.tta, "amp": args.amp, "device": device, "stitch": args.stitch, "skip_empty": args.skip_empty,
               "threshold": args.threshold, "min_component_size": args.min_component_size, "et_min_voxels": args.et_min_voxels,
               "localiser": args.localiser, "localiser_margin_mm": args.localiser_margin_mm,
               "localiser_average": None if args.localiser_average is None else
               [n for n in args.localiser_average if n.lower() != "none"]}
    instances = None
    if args.instances is not None:
        from medseg.inference.instances import InstanceSettings

        instances = InstanceSettings(args.instances, args.instance_target, args.min_object_size, args.min_object_ml,
                                     args.min_distance, args.score_threshold)
    written = predict(args.model, args.input, args.output, case_id=args.case_id, probabilities=args.probabilities,
                      instances=instances, announce=True,
                      overwrite=args.overwrite, shard=shard, overlay=args.overlay, nan_policy=args.nan_policy, crf=args.crf,
                      progress=not args.no_progress and sys.stderr.isatty(),
                      **{k: v for k, v in options.items() if v is not None})
    from medseg.evaluation.evaluate import is_side_file

    labels = [p for p in written if not is_side_file(p.name)]
    print(f"{args.output}: {len(labels)} prediction(s) written" + (f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""))
    return 0
