"""What a run reports: ``pipeline.yaml`` (written once, when the run starts), ``metrics.csv``, TensorBoard scalars, progress bars and one line per epoch.

Only the main process writes; the others get a :class:`RunLog` that does nothing.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from medseg.atomic import write_text_atomic
from medseg.training.config import Pipeline


class RunLog:
    def __init__(self, run_dir: Path, is_main: bool, progress: bool, start_epoch: int, p: Pipeline, write_pipeline: bool = True):
        """``write_pipeline``: write ``pipeline.yaml`` (when the run starts; a resumed run keeps the file it started with,
        and its allowed changes go to ``history.jsonl``)."""
        self.run_dir, self.is_main, self.progress = run_dir, is_main, progress
        self.tb = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if write_pipeline:
                write_text_atomic(run_dir / "pipeline.yaml", yaml.safe_dump(p.to_dict(resolve_paths=True), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1)

    def bar(self, total: int, desc: str):
        """A tqdm progress bar on the main process when progress is on, else None."""
        if not (self.progress and self.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="it", leave=True, dynamic_ncols=True)

    def epoch(self, row: dict, history: list[dict], epochs: int) -> None:
        """Log one finished epoch: TensorBoard scalars, ``metrics.csv`` from the whole history, one printed line."""
        if not self.is_main:
            return
        for key, value in row.items():
            if key != "epoch":
                self.tb.add_scalar(key, value, row["epoch"])
        self.tb.flush()
        write_metrics_csv(self.run_dir / "metrics.csv", history)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if (k.startswith("dice_") and "smoothed" not in k) or k == "train_loss")
        print(f"epoch {row['epoch']}/{epochs}: {summary}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch with the union of the keys of all rows (atomic)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, out.getvalue())
