"""``medseg segment METHOD``: classical segmentation (no training) of a 2D image or a 3D scan; labels on its grid."""
from __future__ import annotations

import argparse
import time

from medseg.classical import METHODS

EPILOG = """methods (2D = images, 3D = volumes):
  kmeans, gmm, meanshift         clustering in --features intensity|position|channels|channels+position   2D, 3D
  graphcut                       seeded min-cut/max-flow (--seeds: 1 object, 2 background)                 2D, 3D
  grabcut                        iterated colour GMMs + graph cut from --box                               2D, 3D
  random-walker                  random walker from --seeds (any number of labels)                         2D, 3D
  ncut                           normalized cuts over a SLIC superpixel graph                              2D, 3D
  slic, felzenszwalb, watershed  superpixels / oversegmentation (watershed: markers from --seeds)          2D(+3D)
  snake                          discrete snake, --solver greedy|dp, from --circle, --box or --seeds        2D
  chan-vese                      morphological Chan-Vese from --box/--circle/--seeds (else checkerboard)   2D, 3D
  crf                            dense CRF refinement of --prob <id>_prob.nii.gz (medseg predict)          2D, 3D

examples:
  medseg segment kmeans --input ../shared/data/brats18/Brats18_2013_11_1 --channels flair --k 4 --select brightest --largest-component --output preds/kmeans
  medseg segment gmm --input T1.nii.gz --k 3 --probabilities --output preds/gmm          (1 CSF, 2 GM, 3 WM; mask auto)
  medseg segment graphcut --input CT.nii.gz --seeds clicks.nii.gz --output preds/cut
  medseg segment grabcut --input ../shared/data/skin_ph2/images/IMD002.bmp --box 150 100 600 480 --output preds/grabcut
  medseg segment snake --solver dp --input IMD002.bmp --circle 380 290 220 --output preds/snake
  medseg segment slic --input photo.jpg --n-segments 300 --seeds clicks.json --select seeds --output preds/slic
  medseg segment crf --input photo.jpg --prob preds/net/photo_prob.nii.gz --output preds/crf
Seeds: a label image on the image's grid (0 unlabelled, 1 object, 2 background) or a JSON
{"foreground": [[x, y], ...], "background": [[x, y], ...], "radius": 3, "box": [x0, y0, x1, y1], "circle": [cx, cy, r]}
in voxel indices from 0 (x = column, y = row); boxes are half-open. Writes OUTPUT (a .png / .nii.gz file) or
OUTPUT/<id>.png (2D images) / OUTPUT/<id>.nii.gz (volumes), on the input's exact grid, ready for medseg evaluate;
--probabilities also writes <id>_prob.nii.gz (gmm, random-walker, crf). Region maps (clusters numbered dark to
bright, superpixels) become an object with --select. Needs: pip install 'medseg[classical]'. Docs: docs/classical.md."""


def register(sub) -> None:
    p = sub.add_parser("segment", help="classical segmentation without training: clustering, graph cuts, snakes, superpixels, CRF",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=tuple(METHODS), metavar="METHOD", help=", ".join(METHODS))
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="an image file (a colour photo gives R, G, B), the channel files of one scan, or a case folder")
    p.add_argument("--output", required=True, metavar="LABELS", help="a label file (.png, .nii.gz) or a folder for <id>.png / <id>.nii.gz")
    p.add_argument("--channels", nargs="+", default=None, metavar="NAME", help="channels of a case folder to use, e.g. flair")
    p.add_argument("--id", dest="case_id", default=None, help="output name (default: from the input)")
    p.add_argument("--mask", default="auto", metavar="auto|none|FILE",
                   help="voxels to segment: auto = the non-zero voxels of a 3D scan with a zero background (default)")
    p.add_argument("--probabilities", action="store_true", help="also write <id>_prob.nii.gz (gmm, random-walker, crf)")
    u = p.add_argument_group("user input")
    u.add_argument("--seeds", default=None, metavar="FILE", help="label image (1 object, 2 background) or JSON of points/box/circle")
    u.add_argument("--box", type=int, nargs="+", default=None, metavar="N", help="X0 Y0 X1 Y1 (3D: X0 Y0 Z0 X1 Y1 Z1), half-open")
    u.add_argument("--circle", type=float, nargs="+", default=None, metavar="N", help="CX CY R: the snake's initial circle")
    u.add_argument("--prob", default=None, metavar="FILE", help="crf: probability map to refine (<id>_prob.nii.gz)")
    r = p.add_argument_group("regions to object")
    r.add_argument("--select", default=None, metavar="HOW", help="brightest, darkest, seeds (regions under object seeds) or ids, e.g. 3,4")
    r.add_argument("--largest-component", action="store_true", help="keep the largest connected component")
    c = p.add_argument_group("clustering")
    c.add_argument("--k", type=int, default=None, help="clusters (kmeans, gmm; default 3)")
    c.add_argument("--features", default=None, help="intensity (default), position, channels, channels+position")
    c.add_argument("--position-weight", type=float, default=None, help="weight of position against intensity (default 1)")
    c.add_argument("--bandwidth", type=float, default=None, help="meanshift bandwidth in standardised units (default: estimated)")
    g = p.add_argument_group("graphs and superpixels")
    g.add_argument("--sigma", type=float, default=None, help="graphcut affinity scale ([0,1] intensities; default: RMS difference); ncut weight scale (0.01)")
    g.add_argument("--lambda", dest="lam", type=float, default=None, help="graphcut weight of the seed-histogram term against the boundary term (default 0.2)")
    g.add_argument("--smoothness", type=float, default=None, help="grabcut pairwise weight gamma (default 50)")
    g.add_argument("--rw-beta", type=float, default=None, help="random-walker beta (default 130)")
    g.add_argument("--n-segments", type=int, default=None, help="slic/ncut superpixels (default 400)")
    g.add_argument("--compactness", type=float, default=None, help="slic/ncut compactness; watershed compactness")
    g.add_argument("--scale", type=float, default=None, help="felzenszwalb scale (default 100)")
    g.add_argument("--min-size", type=int, default=None, help="felzenszwalb minimum region (default 50)")
    g.add_argument("--h", type=float, default=None, help="watershed without seeds: minima depth, fraction of the gradient range (default 0.02)")
    g.add_argument("--threshold", type=float, default=None, help="ncut stopping value (default 0.001)")
    s = p.add_argument_group("contours")
    s.add_argument("--solver", choices=("greedy", "dp"), default=None, help="snake minimiser (default greedy)")
    s.add_argument("--alpha", type=float, default=None, help="snake elasticity (default 0.5)")
    s.add_argument("--beta", type=float, default=None, help="snake curvature (default 0.2)")
    s.add_argument("--gamma", type=float, default=None, help="snake edge weight (default 1)")
    s.add_argument("--kappa", type=float, default=None, help="snake pressure: > 0 shrinks, < 0 inflates (default 0.05)")
    s.add_argument("--smooth", type=float, default=None, help="Gaussian sigma (pixels) of the edge map: snake (3), watershed (1), felzenszwalb (0.8)")
    s.add_argument("--step", type=float, default=None, help="snake point spacing in pixels (default 5)")
    s.add_argument("--band", type=int, default=None, help="snake dp: candidates per side of the normal (default 3)")
    s.add_argument("--iterations", type=int, default=None, help="grabcut (5), chan-vese (100), snake (max), crf (5)")
    f = p.add_argument_group("crf")
    f.add_argument("--crf-sxy", type=float, default=None, help="appearance kernel width in mm (default 80)")
    f.add_argument("--crf-srgb", type=float, default=None, help="appearance kernel intensity width, 0..255 units (default 13)")
    f.add_argument("--crf-weight", type=float, default=None, help="appearance kernel weight (default 10)")
    f.add_argument("--crf-smooth-sxy", type=float, default=None, help="smoothness kernel width in mm (default 3)")
    f.add_argument("--crf-smooth-weight", type=float, default=None, help="smoothness kernel weight (default 3)")
    p.set_defaults(func=run)


def params_from_args(args) -> dict:
    """The method options of the parsed arguments (None: the method's default)."""
    m = args.method
    sigma = args.smooth if m in ("snake", "watershed", "felzenszwalb") else args.sigma
    return {"k": args.k, "features": args.features, "position_weight": args.position_weight, "bandwidth": args.bandwidth,
            "sigma": sigma, "lam": args.lam, "gamma": args.smoothness if m == "grabcut" else args.gamma,
            "beta": args.rw_beta if m == "random-walker" else args.beta, "n_segments": args.n_segments,
            "compactness": args.compactness, "scale": args.scale, "min_size": args.min_size, "h": args.h,
            "threshold": args.threshold, "solver": args.solver, "alpha": args.alpha, "kappa": args.kappa, "step": args.step,
            "band": args.band, "iterations": args.iterations if m != "snake" else None,
            "max_iterations": args.iterations if m == "snake" else None, "appearance_sxy": args.crf_sxy,
            "appearance_srgb": args.crf_srgb, "appearance_weight": args.crf_weight, "smooth_sxy": args.crf_smooth_sxy,
            "smooth_weight": args.crf_smooth_weight}


def run(args) -> int:
    from medseg.classical.api import PROBABILISTIC, segment
    from medseg.classical.io import (load_input, output_path, probabilities_path, read_probabilities, read_seeds,
                                     write_labels, write_probabilities)
    from medseg.errors import MedsegError

    inp = load_input(args.input, args.channels, args.case_id)
    out = output_path(args.output, inp)
    if args.probabilities and args.method not in PROBABILISTIC:
        raise MedsegError(f"--probabilities: {args.method} gives labels only; soft maps come from {', '.join(PROBABILISTIC)}")
    seeds = read_seeds(args.seeds, inp, box=args.box, circle=args.circle)
    probs_in = read_probabilities(args.prob, inp) if args.prob else None
    start = time.perf_counter()
    labels, probs = segment(args.method, inp, seeds, args.mask, select=args.select, largest_component=args.largest_component,
                            probabilities=probs_in, **params_from_args(args))
    seconds = time.perf_counter() - start
    written = write_labels(labels, inp, out)
    if args.probabilities and probs is not None:
        write_probabilities(probs, inp, probabilities_path(written))
    regions = int(len(set(labels[labels > 0].ravel().tolist()))) if labels.size < 5_000_000 else int(labels.max())
    print(f"{written}: {args.method} on {inp.case_id} ({inp.size_text()}), {regions} label(s) besides 0, {seconds:.1f} s")
    return 0
