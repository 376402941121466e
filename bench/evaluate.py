"""Time medseg's metrics against MONAI's metric classes on one full BraTS case.

Both sides start from the same two label maps (240x240x155, already in memory) and compute, for the three
regions WT/TC/ET, Dice, HD95 and normalised surface Dice (tolerance 1 mm). MONAI's time includes building the
one-hot region tensors it needs; medseg's includes everything ``compute_metrics`` does (it also returns IoU,
precision, recall, specificity, ASSD and volumes). Reading the files is not timed.

    python bench/evaluate.py [--case Brats18_2013_11_1] [--repeats 5]

Prints the median time of each side, the ratio and the largest difference between the values.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats18"
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


def load(case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    from medseg.data.io import read_volume

    folder = DATA / case
    ref = read_volume(folder / f"{case}_seg.nii.gz")
    pred = next(p for p in sorted(folder.glob("DeepBrainSeg_Prediction*.nii.gz")) if "mask" not in p.name)
    array = read_volume(pred).array
    if "iteration_0" in pred.name:  # ET = 3 in these files
        array = np.where(array == 3, 4, array).astype(np.uint8)
    return array, ref.array, ref.spacing


def run_monai(pred: np.ndarray, ref: np.ndarray, spacing) -> np.ndarray:
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    p = torch.from_numpy(np.stack([np.isin(pred, v) for v in REGIONS.values()])[None]).float()
    r = torch.from_numpy(np.stack([np.isin(ref, v) for v in REGIONS.values()])[None]).float()
    dice = DiceMetric(include_background=True, reduction="none")(p, r)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, r, spacing=spacing)
    nsd = SurfaceDiceMetric([1.0] * len(REGIONS), include_background=True, reduction="none")(p, r, spacing=spacing)
    return torch.cat([dice, hd95, nsd]).numpy()


def run_medseg(pred: np.ndarray, ref: np.ndarray, spacing) -> np.ndarray:
    from medseg.evaluation import MetricSettings, compute_metrics

    df = compute_metrics(pred, ref, spacing, "brats", MetricSettings(targets=("regions",)))
    df = df[df["kind"] == "region"].set_index("target").loc[list(REGIONS)]
    return df[["dice", "hd95", "nsd"]].to_numpy().T


def timed(fn, repeats: int, *args) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="Brats18_2013_11_1")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: the benchmark needs the shared BraTS cases")
    pred, ref, spacing = load(args.case)
    warnings.filterwarnings("ignore")
    run_medseg(pred, ref, spacing), run_monai(pred, ref, spacing)  # warm-up (imports, caches)
    t_monai, v_monai = timed(run_monai, args.repeats, pred, ref, spacing)
    t_ours, v_ours = timed(run_medseg, args.repeats, pred, ref, spacing)
    print(f"case {args.case} {pred.shape}, regions {', '.join(REGIONS)}: Dice, HD95, surface Dice (1 mm)")
    print(f"MONAI  (DiceMetric + HausdorffDistanceMetric + SurfaceDiceMetric): {t_monai * 1000:8.1f} ms")
    print(f"medseg (compute_metrics):                                          {t_ours * 1000:8.1f} ms")
    print(f"ratio: {t_monai / t_ours:.1f}x; largest difference in values: {np.abs(np.asarray(v_monai) - v_ours).max():.2e}")


if __name__ == "__main__":
    main()
