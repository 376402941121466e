"""The training loop: a :class:`~medseg.training.run.Run` is built once, then each epoch trains, validates, chooses
the model, checkpoints and logs.

``train(pipeline)`` is the Python entry point behind ``medseg train``. A run directory holds everything that
``medseg predict`` needs (``checkpoints/best.pt`` and ``last.pt`` carry the model name + arguments, label
scheme, target, preprocessing, inference and postprocessing settings), the resolved ``pipeline.yaml``,
``metrics.csv`` (one row per epoch, rewritten from the checkpoint so it never has a gap or a duplicate), and
TensorBoard events.

Which model ``best.pt`` holds is ``training.model_selection``:

- ``final`` (default): the model of the last epoch. With a handful of validation cases the epoch of the highest
  validation Dice is mostly noise, and a schedule that ends with a learning rate near zero (poly) gives a stable
  last model; nnU-Net predicts with its final checkpoint for the same reason.
- ``smoothed``: the epoch with the highest moving average of the validation mean Dice
  (``training.smoothing`` = weight of the past, 0.9 as nnU-Net's smoothed pseudo-Dice).
- ``best``: the epoch with the highest raw validation mean Dice.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from medseg.checkpoint import save_checkpoint
from medseg.errors import MedsegError
from medseg.training.config import Pipeline
from medseg.training.distributed import barrier, shutdown
from medseg.training.logs import RunLog
from medseg.training.optim import set_lr
from medseg.training.run import Run, RunOptions, RunState, resume_point, run_folder, run_lock, target_epochs
from medseg.training.validation import validate

__all__ = ["train", "Run", "RunOptions", "train_epoch", "choose"]


def _loader(run: Run, epoch: int) -> torch.utils.data.DataLoader:
    run.dataset.epoch = epoch
    workers = run.p.data.workers
    kwargs = {"num_workers": workers, "prefetch_factor": 4} if workers > 0 else {}
    if workers > 0 and "fork" in torch.multiprocessing.get_all_start_methods():
        kwargs["multiprocessing_context"] = "fork"  # workers share the cached cases instead of pickling them
    return torch.utils.data.DataLoader(run.dataset, batch_size=run.p.sampling.batch_size, shuffle=False,
                                       pin_memory=run.device.type == "cuda", drop_last=True, **kwargs)


def train_epoch(run: Run, epoch: int, log: RunLog) -> dict:
    """One epoch of optimiser steps; returns the epoch's training row (loss, lr, throughput)."""
    model = run.step.bare_model
    model.train()
    lr = set_lr(run.optimizer, run.p, epoch, run.epochs)
    losses, start, seen = [], time.perf_counter(), 0
    loader = _loader(run, epoch)
    bar = log.bar(len(loader), f"epoch {epoch + 1}/{run.epochs}")
    for batch, (x, y) in enumerate(loader):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.precision.autocast():
            loss = run.step.loss(x, y, run.loss)
        value = float(loss.detach())
        if not np.isfinite(value):
            raise _non_finite(run, epoch, batch, f"the training loss became {value}")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if run.p.training.grad_clip:
            run.scaler.unscale_(run.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.p.training.grad_clip)
            if not run.precision.scaler and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
                raise _non_finite(run, epoch, batch, f"the gradients became non-finite (norm {float(norm)})")
        run.scaler.step(run.optimizer)
        run.scaler.update()
        losses.append(value)
        seen += x.shape[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", patches_s=f"{seen * run.info.world_size / (time.perf_counter() - start):.1f}")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    return {"train_loss": float(np.mean(losses)), "lr": lr, "patches_per_s": seen * run.info.world_size / elapsed,
            "epoch_seconds": elapsed}


def _non_finite(run: Run, epoch: int, batch: int, what: str) -> MedsegError:
    """The error for a non-finite loss or gradient: where (epoch, batch, the cases its patches came from), that no
    checkpoint of this epoch was written, and what to do."""
    size = run.p.sampling.batch_size
    cases = sorted({run.dataset.case_of(i) for i in range(batch * size, (batch + 1) * size) if i < len(run.dataset)})
    return MedsegError(f"{run.run_dir}: {what} at epoch {epoch + 1}, batch {batch + 1} "
                       f"(patches of case(s) {', '.join(cases)}); training stopped and no checkpoint of this epoch was written "
                       f"(checkpoints/last.pt holds epoch {run.state.epoch}): check those cases with 'medseg validate', lower "
                       "optimizer.lr or set training.grad_clip")


def check_finite_weights(run: Run) -> None:
    """A checkpoint is never written with NaN or infinite weights: an error naming the first such tensor."""
    for name, tensor in run.step.bare_model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MedsegError(f"{run.run_dir}: the model's weights became NaN or infinite ({name}) during epoch {run.state.epoch + 1}; "
                              f"training stopped and no checkpoint of this epoch was written (checkpoints/last.pt holds epoch "
                              f"{run.state.epoch}): lower optimizer.lr, set training.grad_clip, or check the data with 'medseg validate'")


def choose(state: RunState, row: dict, mode: str, smoothing: float, validated: bool) -> bool:
    """Update ``state`` with the epoch's ``row``; True when ``best.pt`` should hold this epoch's model.

    Without validation cases the latest model is the one to use whatever the mode.
    """
    metric = row.get("dice_mean")
    if metric is not None:
        state.smoothed = metric if state.smoothed is None else smoothing * state.smoothed + (1 - smoothing) * metric
        row["dice_mean_smoothed"] = state.smoothed
    if mode == "final" or not validated:
        chosen = True
    elif metric is None:
        return False
    else:
        chosen = (state.smoothed if mode == "smoothed" else metric) > state.best_metric
    if chosen:
        score = state.smoothed if mode == "smoothed" else metric
        state.best_metric = state.best_metric if score is None else float(score)
        state.best_epoch = row["epoch"]
    return chosen


def _epoch(run: Run, epoch: int, log: RunLog) -> None:
    row = {"epoch": epoch + 1, **train_epoch(run, epoch, log)}
    if not torch.isfinite(torch.tensor(row["train_loss"])):
        raise MedsegError(f"{run.run_dir}: the training loss became {row['train_loss']} in epoch {epoch + 1}; "
                          "lower optimizer.lr, set training.grad_clip, or check the data with 'medseg validate'")
    check_finite_weights(run)
    if run.info.is_main:
        p = run.p
        due = (epoch + 1) % p.training.val_interval == 0 or epoch + 1 == run.epochs
        if run.val_cases and due:
            row.update(validate(run.step.bare_model, run.val_cases, p, run.scheme, run.precision))
        is_best = choose(run.state, row, p.training.model_selection, p.training.smoothing, bool(run.val_cases))
        run.state.epoch = epoch + 1
        run.state.history = [*run.state.history, row]
        state = run.checkpoint()
        save_checkpoint(state, run.ckpt_dir / "last.pt")
        if is_best:
            save_checkpoint(state, run.ckpt_dir / "best.pt")
        log.epoch(row, run.state.history, run.epochs)
    else:
        run.state.epoch = epoch + 1
    barrier(run.info)


def run_training(run: Run) -> dict:
    """Train ``run`` from its current epoch to ``run.epochs``; returns the run folder and the metric history."""
    fresh = not run.options.resume or not (run.run_dir / "pipeline.yaml").exists()
    log = RunLog(run.run_dir, run.info.is_main, run.options.progress, run.state.epoch, run.p, write_pipeline=fresh)
    try:
        for epoch in range(run.state.epoch, run.epochs):
            _epoch(run, epoch, log)
    finally:
        log.close()
    s = run.state
    result = {"run_dir": str(run.run_dir), "epochs": s.epoch, "best_metric": s.best_metric, "best_epoch": s.best_epoch,
              "history": s.history}
    shutdown(run.info)
    return result


def train(pipeline: Pipeline, run_dir: str | Path | None = None, resume: bool = False, extend_epochs: int | None = None,
          progress: bool = True, nan_policy: str = "error") -> dict:
    """Train (or resume) the experiment of ``pipeline``; returns the run directory and the metric history.

    The run folder is checked (a writable folder) and locked (``RUN/train.lock``) before anything is computed; on
    resume the temporary files a killed run left there (a checkpoint it was writing) are removed;
    ``nan_policy="zero"`` sets NaN/infinite image voxels to 0 with a warning instead of stopping.

    Example:
        >>> from medseg.training.config import load_pipeline
        >>> result = train(load_pipeline("pipelines/demo.yaml"), run_dir="runs/demo")  # doctest: +SKIP
    """
    from medseg.atomic import check_output_dir, sweep_stale
    from medseg.data.checks import check_nan_policy

    check_nan_policy(nan_policy)
    options = RunOptions(Path(run_dir) if run_dir else None, resume, extend_epochs, progress, nan_policy)
    folder = check_output_dir(run_folder(pipeline, options), "--output")
    with run_lock(folder, enabled=int(os.environ.get("RANK", "0")) == 0):
        resume = resume_point(pipeline, options)
        previous, changes = resume
        if previous is not None and int(os.environ.get("RANK", "0")) == 0:
            for d in (folder, folder / "checkpoints"):  # what a killed run was writing when it died
                sweep_stale(d)
        if previous is not None and previous["epoch"] >= target_epochs(previous, changes, pipeline, options):
            return _finished(folder, previous)  # nothing to train: no case loaded, nothing recorded
        return run_training(Run.build(pipeline, options, resume))


def _finished(run_dir: Path, ckpt: dict) -> dict:
    """The result of a resumed run that has done all its epochs, from its last checkpoint."""
    s = RunState.from_checkpoint(ckpt)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{run_dir}: the run has finished its {s.epoch} epochs; to train longer pass --extend-epochs N (N > {s.epoch})",
              flush=True)
    return {"run_dir": str(run_dir), "epochs": s.epoch, "best_metric": s.best_metric, "best_epoch": s.best_epoch,
            "history": s.history}
