"""A training run, built once from a pipeline: data, model, loss, optimiser, precision, validation cases, state.

:meth:`Run.build` does all the set-up (and the checks that can fail) before the first step; the training loop in
:mod:`medseg.training.trainer` only uses what it holds. :meth:`Run.checkpoint` is everything ``medseg predict`` and
``--resume`` need; :meth:`Run.restore` reads it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from medseg.checkpoint import load_checkpoint
from medseg.data.labels import LabelScheme
from medseg.data.manifest import read_manifest
from medseg.errors import MedsegError
from medseg.losses import DeepSupervisionLoss, create_loss
from medseg.runtime import Precision, resolve_device, resolve_precision
from medseg.training import setup
from medseg.training.config import Pipeline
from medseg.training.distributed import DistInfo, barrier, init_distributed
from medseg.training.optim import build_optimizer
from medseg.training.steps import ModelStep
from medseg.training.validation import ValidationCase, validation_cases


@dataclass(frozen=True)
class RunOptions:
    """How to run a pipeline: output folder, resume, extend a finished run to ``extend_epochs`` in total."""

    run_dir: Path | None = None
    resume: bool = False
    extend_epochs: int | None = None
    progress: bool = True


@dataclass
class RunState:
    """What changes epoch by epoch (saved in every checkpoint). ``smoothed``: moving average of validation Dice."""

    epoch: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0
    smoothed: float | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "RunState":
        return cls(ckpt["epoch"], ckpt["best_metric"], ckpt["best_epoch"], ckpt.get("smoothed"), list(ckpt["history"]))


@dataclass
class Run:
    p: Pipeline
    options: RunOptions
    info: DistInfo
    precision: Precision
    run_dir: Path
    scheme: LabelScheme
    channels: list[str]
    step: ModelStep
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: setup.PatchDataset
    val_cases: list[ValidationCase]
    epochs: int
    state: RunState = field(default_factory=RunState)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @classmethod
    def build(cls, p: Pipeline, options: RunOptions) -> "Run":
        info = init_distributed("cuda" if p.training.device != "cpu" and torch.cuda.is_available() else "cpu")
        device = resolve_device(p.training.device, info.local_rank)
        precision = resolve_precision(p.training.amp, device)
        if p.training.threads:
            torch.set_num_threads(p.training.threads)
        run_dir = Path(options.run_dir or p.output_dir or Path("runs") / p.name)
        _check_run_dir(run_dir, options.resume)
        manifest_path = setup.resolve_manifest(p, run_dir, info.is_main, options.progress)
        barrier(info)
        manifest = read_manifest(manifest_path)
        scheme = setup.label_scheme(p, manifest)
        train_m, val_m = setup.split_cases(manifest, p)
        used = dataclasses.replace(manifest, cases=train_m.cases + val_m.cases)
        cache = setup.load_cases(p, used, scheme, run_dir, options.progress and info.is_main)
        train_cases = [cache[c.id] for c in train_m.cases]
        setup.check_patch_size(p, {c.id: c for c in train_cases})
        val = validation_cases([cache[c.id] for c in val_m.cases], val_m.cases, scheme) if info.is_main else []
        torch.manual_seed(p.seed)
        channels = list(manifest.channels)
        p.augmentation.check(p.model.spatial_dims, len(channels))  # colour jitter needs RGB
        step = ModelStep.build(p, len(channels), setup.out_channels(scheme, p.data.target), device)
        step.check_size(tuple(p.sampling.patch_size), "sampling.patch_size")
        step.check_size(p.roi_size, "inference.roi_size")
        loss = create_loss(p.loss.name, p.data.target)
        loss = DeepSupervisionLoss(loss) if p.loss.deep_supervision else loss
        length = p.training.iterations_per_epoch * p.sampling.batch_size // info.world_size
        dataset = setup.PatchDataset(train_cases, p, scheme, length, info.rank, info.world_size)
        run = cls(p, options, info, precision, run_dir, scheme, channels, step, loss,
                  build_optimizer(p, step.bare_model.parameters()), torch.amp.GradScaler("cuda", enabled=precision.scaler),
                  dataset, val, p.training.epochs)
        if options.resume:
            run.restore()
        step.wrap_ddp(info)
        return run

    def restore(self) -> None:
        """Model, optimiser, scaler, state and RNG from ``checkpoints/last.pt``; the schedule follows from the epoch."""
        ckpt = load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device)
        self.step.bare_model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState.from_checkpoint(ckpt)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
        self.epochs = ckpt["epochs"]
        extend = self.options.extend_epochs
        if extend is not None:
            if extend < self.state.epoch:
                raise MedsegError(f"--extend-epochs {extend}: the run has already done {self.state.epoch} epochs")
            self.epochs = extend

    def inference_dict(self) -> dict:
        """The prediction defaults stored with the model: sliding window and postprocessing of the pipeline."""
        i = self.p.inference
        return {"roi_size": list(self.p.roi_size), "overlap": i.overlap, "blend": i.blend, "sw_batch_size": i.sw_batch_size,
                "tta": i.tta, **dataclasses.asdict(self.p.postprocessing)}

    def checkpoint(self) -> dict:
        return {
            "model": self.step.config, "state_dict": self.step.bare_model.state_dict(), "channels": self.channels,
            "label_scheme": self.scheme.to_dict(), "target": self.p.data.target,
            "preprocessing": self.p.preprocessing.to_dict(), "inference": self.inference_dict(),
            "pipeline": self.p.to_dict(resolve_paths=True), "epochs": self.epochs, **self.state.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists() and not resume:
        raise MedsegError(f"{run_dir}: a run exists there already; add --resume to continue it or choose another --output")
    if resume and not last.exists():
        raise MedsegError(f"{run_dir}: nothing to resume (no checkpoints/last.pt); run without --resume to start")
