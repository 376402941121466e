"""The training loop: AMP, gradient clipping, LR schedule, validation, atomic checkpoints, resume, logs, DDP.

``train(pipeline)`` is the Python entry point behind ``medseg train``. A run directory holds everything that
``medseg predict`` needs (``checkpoints/best.pt`` and ``last.pt`` carry the model name + arguments, label
scheme, target, preprocessing and inference settings), the resolved ``pipeline.yaml``, ``metrics.csv`` (one
row per epoch, rewritten from the checkpoint so it never has a gap or a duplicate), and TensorBoard events.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from medseg.atomic import write_text_atomic
from medseg.data.manifest import read_manifest
from medseg.errors import MedsegError
from medseg.losses import DeepSupervisionLoss, create_loss
from medseg.training import setup
from medseg.checkpoint import load_checkpoint, save_checkpoint
from medseg.training.config import Pipeline
from medseg.training.distributed import DistInfo, barrier, init_distributed, shutdown
from medseg.training.steps import ModelStep
from medseg.training.validation import validate


@dataclass(frozen=True)
class RunOptions:
    """How to run a pipeline: output folder, resume, extend a finished run to ``extend_epochs`` in total."""

    run_dir: Path | None = None
    resume: bool = False
    extend_epochs: int | None = None
    progress: bool = True


def _device(p: Pipeline, info: DistInfo) -> torch.device:
    want = p.training.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MedsegError("training.device: cuda was asked for but no CUDA device is available; use auto or cpu")
        return torch.device("cuda", info.local_rank) if want == "cuda" else torch.device(want)
    return torch.device("cpu")


def _autocast(p: Pipeline, device: torch.device) -> tuple[dict | None, bool]:
    """(autocast kwargs or None, whether a GradScaler is needed)."""
    amp = p.training.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
    if amp == "off":
        return None, False
    if amp == "fp16" and device.type != "cuda":
        raise MedsegError("training.amp: fp16 needs a CUDA device; use bf16 (CPUs with AMX/AVX512-BF16) or off")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return {"device_type": device.type, "dtype": dtype}, amp == "fp16"


class Trainer:
    def __init__(self, p: Pipeline, options: RunOptions):
        self.p, self.options = p, options
        self.info = init_distributed("cuda" if p.training.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = _device(p, self.info)
        if p.training.threads:
            torch.set_num_threads(p.training.threads)
        self.run_dir = Path(options.run_dir or p.output_dir or Path("runs") / p.name)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._check_run_dir()
        manifest_path = setup.resolve_manifest(p, self.run_dir, self.info.is_main, options.progress)
        barrier(self.info)
        manifest = read_manifest(manifest_path)
        self.scheme = setup.label_scheme(p, manifest)
        train_m, val_m = setup.split_cases(manifest, p)
        self.channels = list(manifest.channels)
        used = dataclasses.replace(manifest, cases=train_m.cases + val_m.cases)
        cache = setup.load_cases(p, used, self.scheme, self.run_dir, options.progress and self.info.is_main)
        self.train_cases = [cache[c.id] for c in train_m.cases]
        self.val_cases = [cache[c.id] for c in val_m.cases if c.label is not None]
        setup.check_patch_size(p, {c.id: c for c in self.train_cases})
        torch.manual_seed(p.seed)
        self.step = ModelStep.build(p, len(self.channels), setup.out_channels(self.scheme, p.data.target), self.device)
        self.step.check_size(tuple(p.sampling.patch_size), "sampling.patch_size")
        self.step.check_size(p.roi_size, "inference.roi_size")
        loss = create_loss(p.loss.name, p.data.target)
        self.loss = DeepSupervisionLoss(loss) if p.loss.deep_supervision else loss
        self.autocast, needs_scaler = _autocast(p, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
        self.optimizer = setup.build_optimizer(p, self.step.model.parameters())
        self.epochs = p.training.epochs
        self.state = {"epoch": 0, "best_metric": -1.0, "best_epoch": 0, "history": []}
        self._ckpt = None
        if options.resume:
            self._restore()
        self.scheduler = setup.build_scheduler(p, self.optimizer, self.epochs)
        if options.resume and self._ckpt is not None:
            self.scheduler.load_state_dict(self._ckpt["scheduler"])
            factor = setup.LRFactor(p.schedule.name, self.epochs, p.schedule.warmup_epochs, p.schedule.power, p.schedule.min_lr / p.optimizer.lr)
            self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor(self.scheduler.last_epoch)  # the constructor reset it to epoch 0
        self.step.wrap_ddp(self.info)
        length = p.training.iterations_per_epoch * p.sampling.batch_size
        self.dataset = setup.PatchDataset(self.train_cases, p, self.scheme, length // self.info.world_size, self.info.rank, self.info.world_size)

    # ------------------------------------------------------------------ run directory
    def _check_run_dir(self) -> None:
        if (self.ckpt_dir / "last.pt").exists() and not self.options.resume:
            raise MedsegError(f"{self.run_dir}: a run exists there already; add --resume to continue it or choose another --output")
        if self.options.resume and not (self.ckpt_dir / "last.pt").exists():
            raise MedsegError(f"{self.run_dir}: nothing to resume (no checkpoints/last.pt); run without --resume to start")

    def _restore(self) -> None:
        self._ckpt = ckpt = load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device)
        self.step.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = {k: ckpt[k] for k in ("epoch", "best_metric", "best_epoch", "history")}
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
        done, planned = ckpt["epoch"], ckpt["epochs"]
        self.epochs = planned
        if self.options.extend_epochs is not None:
            if self.options.extend_epochs < done:
                raise MedsegError(f"--extend-epochs {self.options.extend_epochs}: the run has already done {done} epochs")
            self.epochs = self.options.extend_epochs

    # ------------------------------------------------------------------ checkpoints and logs
    def _checkpoint_state(self) -> dict:
        model = self.step.bare_model
        return {
            "model": self.step.config, "state_dict": model.state_dict(), "channels": self.channels,
            "label_scheme": self.scheme.to_dict(), "target": self.p.data.target,
            "preprocessing": self.p.preprocessing.to_dict(), "inference": self._inference_dict(), "pipeline": self.p.to_dict(resolve_paths=True),
            "epochs": self.epochs, **self.state,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def _inference_dict(self) -> dict:
        i = self.p.inference
        return {"roi_size": list(self.p.roi_size), "overlap": i.overlap, "blend": i.blend, "sw_batch_size": i.sw_batch_size, "tta": i.tta}

    def _write_logs(self) -> None:
        history = self.state["history"]
        keys = list(dict.fromkeys(k for row in history for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.run_dir / "metrics.csv", out.getvalue())

    def _save(self, is_best: bool) -> None:
        state = self._checkpoint_state()
        save_checkpoint(state, self.ckpt_dir / "last.pt")
        if is_best:
            save_checkpoint(state, self.ckpt_dir / "best.pt")
        self._write_logs()

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int):
        self.dataset.epoch = epoch
        workers = self.p.data.workers
        kwargs = {"num_workers": workers, "prefetch_factor": 4} if workers > 0 else {}
        if workers > 0 and "fork" in torch.multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"  # workers share the cached cases instead of pickling them
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.p.sampling.batch_size, shuffle=False,
                                           pin_memory=self.device.type == "cuda", drop_last=True, **kwargs)

    def train_epoch(self, epoch: int, tb) -> dict:
        model = self.step.model
        model.train()
        losses, start, seen = [], time.perf_counter(), 0
        bar = None
        loader = self._loader(epoch)
        if self.options.progress and self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.epochs}", unit="it", leave=True, dynamic_ncols=True)
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(**self.autocast) if self.autocast else contextlib.nullcontext():
                loss = self.step.loss(x, y, self.loss)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.p.training.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.p.training.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(float(loss.detach()))
            seen += x.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", patches_s=f"{seen * self.info.world_size / (time.perf_counter() - start):.1f}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        return {"train_loss": float(np.mean(losses)), "lr": self.optimizer.param_groups[0]["lr"],
                "patches_per_s": seen * self.info.world_size / elapsed, "epoch_seconds": elapsed}

    def run(self) -> dict:
        start_epoch = self.state["epoch"]
        tb = None
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "pipeline.yaml", yaml.safe_dump(self.p.to_dict(resolve_paths=True), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_epoch + 1)
            if start_epoch >= self.epochs:
                print(f"{self.run_dir}: the run has finished its {self.epochs} epochs; to train longer pass --extend-epochs N (N > {self.epochs})")
        for epoch in range(start_epoch, self.epochs):
            row = {"epoch": epoch + 1, **self.train_epoch(epoch, tb)}
            self.scheduler.step()
            is_best = False
            if self.info.is_main:
                if self.val_cases and ((epoch + 1) % self.p.training.val_interval == 0 or epoch + 1 == self.epochs):
                    row.update(validate(self.step.bare_model, self.val_cases, self.p, self.scheme, self.device, self.autocast))
                    is_best = row["dice_mean"] > self.state["best_metric"]
                elif not self.val_cases:
                    is_best = True  # without validation cases the latest model is the one to use
                if is_best:
                    self.state["best_metric"] = row.get("dice_mean", self.state["best_metric"])
                    self.state["best_epoch"] = epoch + 1
                self.state["epoch"] = epoch + 1
                self.state["history"] = [*self.state["history"], row]
                self._save(is_best)
                for key, value in row.items():
                    if key != "epoch":
                        tb.add_scalar(key, value, epoch + 1)
                tb.flush()
                summary = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("dice_") or k == "train_loss")
                print(f"epoch {epoch + 1}/{self.epochs}: {summary}", flush=True)
            else:
                self.state["epoch"] = epoch + 1
            barrier(self.info)
        if tb is not None:
            tb.close()
        result = {"run_dir": str(self.run_dir), "epochs": self.state["epoch"], "best_metric": self.state["best_metric"],
                  "best_epoch": self.state["best_epoch"], "history": self.state["history"]}
        shutdown(self.info)
        return result


def train(pipeline: Pipeline, run_dir: str | Path | None = None, resume: bool = False, extend_epochs: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the experiment of ``pipeline``; returns the run directory and the metric history.

    Example:
        >>> from medseg.training.config import load_pipeline
        >>> result = train(load_pipeline("pipelines/demo.yaml"), run_dir="runs/demo")  # doctest: +SKIP
    """
    trainer = Trainer(pipeline, RunOptions(Path(run_dir) if run_dir else None, resume, extend_epochs, progress))
    return trainer.run()
