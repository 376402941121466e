"""``medseg.plan``: fingerprint a manifest, plan within a budget, write the pipeline and the fingerprint JSON."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from medseg.errors import MedsegError, check_choice
from medseg.planning.fingerprint import fingerprint_manifest
from medseg.planning.planner import MIN_STEPS, Budget, Plan, Timer, make_plan
from medseg.planning.writer import write_plan


def fingerprint_path(output: str | Path) -> Path:
    """``pipelines/NAME.yaml`` -> ``pipelines/NAME.fingerprint.json``."""
    output = Path(output)
    return output.with_name(f"{_stem(output)}.fingerprint.json")


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name


def refiner_path(output: str | Path) -> Path:
    """``pipelines/NAME.yaml`` -> ``pipelines/NAME_refiner.yaml`` (the second stage of ``medseg plan --cascade``)."""
    output = Path(output)
    return output.with_name(f"{_stem(output)}_refiner{output.suffix or '.yaml'}")


def plan(manifest: str | Path, output: str | Path, *, device: str = "cpu", memory_gib: float | None = None,
         time_budget_min: float = 20.0, dims: str | int = "auto", modality: str | Sequence[str] | None = None,
         min_steps: int | None = None, name: str | None = None, progress: bool | None = None, timer: Timer | None = None,
         command: str = "", cascade: bool = False) -> Plan:
    """Plan a pipeline for the labelled cases of ``manifest`` and write it to ``output`` (YAML), with the dataset
    fingerprint beside it (``NAME.fingerprint.json``). Returns the :class:`~medseg.planning.planner.Plan`.

    Args:
        device: ``cpu`` or ``cuda``: where training will run; the step time is measured there.
        memory_gib: memory for training (default: 8 GiB on CPU, the GPU's memory on CUDA).
        time_budget_min: wall-clock minutes for the whole training run (loading, steps, validation).
        dims: ``auto``, 2 or 3. modality: ``ct``/``mri`` for all channels or one per channel (default: guessed).
        min_steps: below this many training steps in the budget, the spacing is coarsened (default
            :data:`~medseg.planning.planner.MIN_STEPS`; docs/planning.md).
        timer: ``timer(network, batch) -> StepTime`` instead of measuring (tests, or planning for another machine).
        cascade: when the plan had to coarsen the grid, write a two-stage cascade instead
            (:mod:`medseg.planning.cascade`): ``output`` is the first stage, ``NAME_refiner.yaml`` beside it the
            second, whose ``cascade.localiser`` is ``runs/NAME`` (relative to the working folder, written relative
            to the file); the returned plan is the first stage's.

    Example:
        >>> import medseg
        >>> p = medseg.plan("data_manifests/brats18_20.csv", "pipelines/brats_planned.yaml")  # doctest: +SKIP
        >>> p.design.network.patch, p.schedule.epochs  # doctest: +SKIP
    """
    from medseg.runtime import resolve_device, resolve_precision

    check_choice(device, ("cpu", "cuda"), "--device")
    dims = check_choice(str(dims), ("auto", "2", "3"), "--dims")
    min_steps = MIN_STEPS if min_steps is None else min_steps
    if time_budget_min <= 0 or min_steps < 0 or (memory_gib is not None and memory_gib <= 0):
        raise MedsegError("--time-budget and --memory must be positive, --min-steps not negative")
    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise MedsegError(f"{output}: the plan is a pipeline file; give a .yaml name such as pipelines/NAME.yaml")
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    if memory_gib is None and dev.type == "cuda":
        import torch

        memory_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
    fp = fingerprint_manifest(manifest, modality=modality, progress=progress)
    budget = Budget(dev.type, memory_gib, float(time_budget_min), dims, int(min_steps), precision.name)
    if timer is None:
        from medseg.planning.measure import step_timer
        from medseg.planning.planner import target_and_scheme

        target, _, out_ch, _ = target_and_scheme(fp)
        timer = step_timer(len(fp.channels), out_ch, target, dev, precision)
    result = make_plan(fp, budget, timer)
    name = name or _stem(output)
    refiner = None
    if cascade:
        from medseg.planning.cascade import plan_cascade

        folder = output.parent.resolve() if output.parent.exists() else output.parent.absolute()
        localiser = os.path.relpath((Path("runs") / name).absolute(), folder).replace(os.sep, "/")
        result, refiner = plan_cascade(result, fp, localiser)
    output.parent.mkdir(parents=True, exist_ok=True)
    fp_file = fp.save(fingerprint_path(output), manifest)
    write_plan(result, output, manifest, name, fp_file, command)
    if refiner is not None:
        write_plan(refiner, refiner_path(output), manifest, f"{name}_refiner", fp_file, command)
    return result
