"""A training run, built once from a pipeline: data, model, loss, optimiser, precision, validation cases, state.

:meth:`Run.build` does all the set-up (and the checks that can fail) before the first step, cheapest first: the
pipeline against the run's own on ``--resume``, the network (before synthetic data is generated or any case is
loaded), then the data. The training loop in :mod:`medseg.training.trainer` only uses what it holds.
:meth:`Run.checkpoint` is everything ``medseg predict`` and ``--resume`` need; :meth:`Run.restore` reads it back.

Resuming compares the pipeline given with the one stored in ``checkpoints/last.pt``: a change to what the run trains
(model, data, preprocessing, sampling, augmentation, loss, optimizer, schedule, seed, iterations...) is refused with
one line per key; the changes of :data:`SAFE_ON_RESUME` (epochs, validation interval, device, precision, threads,
workers, caching, inference and postprocessing settings) are allowed and recorded in ``RUN/history.jsonl``, one JSON
line per start or resume. ``RUN/pipeline.yaml`` is written when the run starts and never rewritten.

While a training writes to a run folder, ``RUN/train.lock`` holds its process id (:func:`run_lock`): a second
training into the same folder is refused, and a lock whose process is gone is taken over.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from medseg.checkpoint import find_checkpoint, for_fold, load_checkpoint
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
from medseg.training.validation import ValidationCase, localised, validation_cases

MACHINE_SETTINGS = ("device", "amp", "channels_last")  # inference settings that belong to the predicting machine


@dataclass(frozen=True)
class RunOptions:
    """How to run a pipeline: output folder, resume, extend a finished run to ``extend_epochs`` in total."""

    run_dir: Path | None = None
    resume: bool = False
    extend_epochs: int | None = None
    progress: bool = True
    nan_policy: str = "error"  # NaN/infinite image voxels: error, or zero (set to 0 with a warning)


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
    loss: nn.Module | None
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
    def build(cls, p: Pipeline, options: RunOptions, resume: "ResumePoint | None" = None) -> "Run":
        """``resume``: the run's :func:`resume_point`, when the caller has read it already."""
        info = init_distributed("cuda" if p.training.device != "cpu" and torch.cuda.is_available() else "cpu")
        device = resolve_device(p.training.device, info.local_rank)
        precision = resolve_precision(p.training.amp, device)
        if p.training.threads:
            torch.set_num_threads(p.training.threads)
        run_dir = run_folder(p, options)
        previous, changes = resume if resume is not None else resume_point(p, options)
        if p.data.synthetic is not None and not (run_dir / "data" / "manifest.csv").exists():
            setup.probe_model(p)  # a pipeline error before any data is generated
        manifest_path = setup.resolve_manifest(p, run_dir, info.is_main, options.progress)
        barrier(info)
        manifest = read_manifest(manifest_path)
        scheme = setup.label_scheme(p, manifest)
        train_m, val_m = setup.split_cases(manifest, p)
        channels = list(manifest.channels)
        p.augmentation.check(p.model.spatial_dims, len(channels))  # colour jitter needs RGB
        torch.manual_seed(p.seed)
        step = ModelStep.build(p, len(channels), setup.out_channels(scheme, p.data.target), device)
        step.check_size(tuple(p.sampling.patch_size), "sampling.patch_size")
        step.check_size(p.roi_size, "inference.roi_size")
        init = initial_weights(step, p, channels) if previous is None and p.training.init_from else None
        loss = None  # an instance model computes its own loss terms
        if p.data.target != "instances":
            loss = create_loss(p.loss.name, p.data.target, p.loss.batch_dice)
            loss = DeepSupervisionLoss(loss, p.data.soft_targets) if p.loss.deep_supervision else loss
        used = dataclasses.replace(manifest, cases=train_m.cases + val_m.cases)
        cache = setup.load_cases(p, used, scheme, run_dir, options.progress and info.is_main, options.nan_policy)
        train_cases = [cache[c.id] for c in train_m.cases]
        setup.check_patch_size(p, {c.id: c for c in train_cases})
        val = validation_cases([cache[c.id] for c in val_m.cases], val_m.cases, scheme) if info.is_main else []
        val = localised(val, val_m.cases, p)  # a cascade's refiner: validated within its localiser's region
        length = p.training.iterations_per_epoch * p.sampling.batch_size // info.world_size
        dataset = setup.PatchDataset(train_cases, p, scheme, length, info.rank, info.world_size)
        run = cls(p, options, info, precision, run_dir, scheme, channels, step, loss,
                  build_optimizer(p, step.bare_model.parameters()), torch.amp.GradScaler("cuda", enabled=precision.scaler),
                  dataset, val, p.training.epochs)
        if previous is not None:
            run.restore(previous, changes)
        if info.is_main:
            run.record("resume" if previous is not None else "start", changes,
                       **({"init_from": str(init)} if init is not None else {}))
        step.wrap_ddp(info)
        return run

    def restore(self, ckpt: dict | None = None, changes: dict | None = None) -> None:
        """Model, optimiser, scaler, state and RNG from ``checkpoints/last.pt``; the schedule follows from the epoch.

        The run keeps its number of epochs unless ``--extend-epochs N`` (or a changed ``training.epochs``) asks for
        more."""
        ckpt = ckpt if ckpt is not None else load_checkpoint(self.ckpt_dir / "last.pt", map_location=self.device)
        try:
            self.step.bare_model.load_state_dict(ckpt["state_dict"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise MedsegError(f"{self.ckpt_dir / 'last.pt'}: the checkpoint does not fit the pipeline's model or optimizer "
                              f"({str(err).splitlines()[0][:150]}); resume with the run's own pipeline ({self.run_dir / 'pipeline.yaml'})") from None
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState.from_checkpoint(ckpt)
        torch.set_rng_state(ckpt["rng"]["torch"].cpu() if hasattr(ckpt["rng"]["torch"], "cpu") else ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
        self.epochs = target_epochs(ckpt, changes or {}, self.p, self.options)

    def record(self, event: str, changes: dict, **extra) -> None:
        """Append one line to ``RUN/history.jsonl``: a start or resume, the epoch, the epochs planned, what changed
        (and ``extra``: the checkpoint a warm start loaded, ``init_from``)."""
        entry = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": self.state.epoch, "epochs": self.epochs,
                 "pid": os.getpid(), **extra}
        if changes:
            entry["changes"] = {k: {"run": old, "given": new} for k, (old, new) in changes.items()}
        if self.options.extend_epochs is not None:
            entry["extend_epochs"] = self.options.extend_epochs
        if self.options.nan_policy != "error":
            entry["nan_policy"] = self.options.nan_policy
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def inference_dict(self) -> dict:
        """The prediction defaults stored with the model: every field of the pipeline's ``inference`` section (so
        ``medseg predict`` windows, blends and crops as validation did) and its postprocessing, less where and in
        which precision to run (:data:`MACHINE_SETTINGS`: the predicting machine's choice, ``--device``/``--amp``);
        with a ``cascade`` section, the localiser's absolute path, margin and averaged regions (:mod:`medseg.inference.cascade`)."""
        settings = {k: v for k, v in dataclasses.asdict(self.p.inference).items() if k not in MACHINE_SETTINGS}
        cascade = self.p.cascade
        localiser = {"localiser": str(self.p.resolve(cascade.localiser)), "localiser_margin_mm": float(cascade.margin_mm),
                     "localiser_average": list(cascade.average)} if cascade.localiser else {}
        return {**settings, "roi_size": list(self.p.roi_size), **dataclasses.asdict(self.p.postprocessing), **localiser}

    def checkpoint(self) -> dict:
        return {
            "model": self.step.config, "state_dict": self.step.bare_model.state_dict(), "channels": self.channels,
            "label_scheme": self.scheme.to_dict(), "target": self.p.data.target,
            "preprocessing": self.p.preprocessing.to_dict(), "inference": self.inference_dict(),
            "pipeline": self.p.to_dict(resolve_paths=True), "epochs": self.epochs, **self.state.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }


def initial_weights(step: ModelStep, p: Pipeline, channels: list[str]) -> Path:
    """Load the network weights of ``training.init_from`` (a run folder, fold K of a CV folder for the fold that
    validates on K, or a checkpoint file) into ``step``; the optimiser and the schedule start afresh. The model must
    be the same network (name, arguments, input channels in the same order, outputs): a warm start, for instance a
    cascade's refiner from its first stage, which has the refiner's network at a coarser spacing."""
    given = p.resolve(p.training.init_from)
    try:
        path = find_checkpoint(for_fold(given, p.data.val_fold), "last")
    except MedsegError:
        fold = f" (nor its fold_{p.data.val_fold})" if p.data.val_fold is not None else ""
        raise MedsegError(f"training.init_from {given}: no trained run there{fold}; train it first (a cascade's refiner "
                          "starts from its first stage: docs/training.md, Cascade) or remove training.init_from") from None
    ckpt = load_checkpoint(path)
    fix = "train the warm start's model with the same model section and channels, or remove training.init_from"
    if list(ckpt["channels"]) != list(channels):
        raise MedsegError(f"training.init_from {path}: its model reads channels {list(ckpt['channels'])}, this run's "
                          f"manifest has {list(channels)}; {fix}")
    theirs, ours = _plain_config(ckpt["model"]), _plain_config(step.config)
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise MedsegError(f"training.init_from {path}: another network ("
                          + "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ) + f"); {fix}")
    step.bare_model.load_state_dict(ckpt["state_dict"])
    return path


def _plain_config(config: dict) -> dict:
    """A model config as flat, comparable plain data (``kwargs.channels``: [16, 32], tuples as lists)."""
    return _flatten(json.loads(json.dumps(config, default=list)))


def run_folder(p: Pipeline, options: RunOptions) -> Path:
    """The run folder: ``--output``, else the pipeline's ``output_dir``, else ``runs/<name>``."""
    return Path(options.run_dir or p.output_dir or Path("runs") / p.name)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists() and not resume:
        raise MedsegError(f"{run_dir}: a run exists there already; add --resume to continue it or choose another --output")
    if resume and not last.exists():
        raise MedsegError(f"{run_dir}: nothing to resume (no checkpoints/last.pt); run without --resume to start")


# ---------------------------------------------------------------------------------------------- resume
ResumePoint = tuple  # (checkpoints/last.pt as loaded or None, the changes of resume_changes)


def resume_point(p: Pipeline, options: RunOptions) -> ResumePoint:
    """What a run starts from: ``(None, {})`` for a new run; for ``--resume`` its ``checkpoints/last.pt`` and the
    pipeline changes it accepts (:func:`resume_changes` raises on the others). The run folder is checked first."""
    run_dir = run_folder(p, options)
    _check_run_dir(run_dir, options.resume)
    if not options.resume:
        return None, {}
    previous = load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location="cpu")
    return previous, resume_changes(previous.get("pipeline"), p, run_dir)


def target_epochs(ckpt: dict, changes: dict, p: Pipeline, options: RunOptions) -> int:
    """The epochs a resumed run trains to: its own, unless ``--extend-epochs N`` or a changed ``training.epochs``
    asks for more (fewer than it has done is an error)."""
    extend, source = options.extend_epochs, "--extend-epochs"
    if extend is None and "training.epochs" in changes:
        extend, source = p.training.epochs, "training.epochs"
    if extend is None:
        return ckpt["epochs"]
    if extend < ckpt["epoch"]:
        raise MedsegError(f"{source} {extend}: the run has already done {ckpt['epoch']} epochs")
    return extend


SAFE_ON_RESUME = ("name", "output_dir", "training.epochs", "training.val_interval", "training.amp", "training.device",
                  "training.threads", "training.init_from", "data.workers", "data.cache", "data.cache_dir", "inference.",
                  "postprocessing.", "cascade.")


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_ON_RESUME)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and key != "data.label_scheme":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


_ABSENT = "(absent)"


def resume_changes(stored: dict | None, p: Pipeline, run_dir: Path) -> dict[str, tuple]:
    """``key -> (run's value, given value)`` for every key where the pipeline given to ``--resume`` differs from the
    run's (stored in its checkpoint); a :class:`ValidationError` with one line per key when any change is not in
    :data:`SAFE_ON_RESUME`."""
    from medseg.errors import ValidationError
    from medseg.training.config import parse_pipeline

    if not stored:
        return {}
    try:  # fill in keys added since the run started with their defaults
        stored = parse_pipeline(stored, run_dir).to_dict(resolve_paths=True)
    except MedsegError:
        pass
    old, new = _flatten(stored), _flatten(p.to_dict(resolve_paths=True))
    changes = {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in dict.fromkeys([*old, *new]) if old.get(k, _ABSENT) != new.get(k, _ABSENT)}
    unsafe = {k: v for k, v in changes.items() if not _safe(k)}
    if unsafe:
        lines = [f"{run_dir}: --resume with a pipeline that changes what the run trains ({len(unsafe)} key(s)); resume with "
                 f"the run's own pipeline ({run_dir / 'pipeline.yaml'}) or start a new run with another --output:"]
        lines += [f"  {k}: {old_v!r} in the run, {new_v!r} given" for k, (old_v, new_v) in unsafe.items()]
        raise ValidationError(lines)
    return changes


# ---------------------------------------------------------------------------------------------- lock
LOCK_NAME = "train.lock"
STALE_UNREADABLE_S = 30.0  # a lock file without a readable pid older than this is a leftover


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True):
    """Hold ``RUN/train.lock`` (this process's id and machine) while the block runs.

    Another training holding the lock is an error naming its pid; a lock left by a process that is gone (killed) is
    taken over with a warning. A run folder that did not exist and is still empty afterwards is removed again, so a
    training refused before it wrote anything leaves nothing behind."""
    if not enabled:
        yield
        return
    from medseg.atomic import host_tag, pid_alive
    from medseg.data.checks import warn

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": host_tag(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None:
                    age = time.time() - path.stat().st_mtime if path.exists() else STALE_UNREADABLE_S + 1
                    if age <= STALE_UNREADABLE_S:
                        raise MedsegError(f"{run_dir}: another training is starting in this run folder ({path}); wait for it "
                                          "or choose another --output") from None
                elif holder.get("host") != me["host"] or pid_alive(int(holder.get("pid", -1))):
                    where = "" if holder.get("host") == me["host"] else " on another machine"
                    raise MedsegError(f"{run_dir}: another training (pid {holder.get('pid')}{where}, since {holder.get('started', '?')}) "
                                      f"is writing to this run folder; wait for it to finish or choose another --output (if no "
                                      f"training runs there, delete {path})") from None
                warn([f"{path}: the training that held this lock (pid {holder.get('pid') if holder else '?'}) is gone; taking the lock over"])
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
            break
        else:
            raise MedsegError(f"{run_dir}: could not take the lock {path}; delete it if no training runs there")
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    try:
        yield
    finally:
        if _read_lock(path) == me:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: a refused training leaves nothing


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None
