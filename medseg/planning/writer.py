"""A plan written as an ordinary pipeline file, every planned value with a comment saying where it came from.

The file is YAML text written line by line (not dumped), so the comments sit beside the values; it loads with
:func:`medseg.training.config.load_pipeline` like any hand-written pipeline, and ``tests/test_planning.py`` checks
that what loads equals the plan.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from medseg.atomic import write_text_atomic
from medseg.planning.network import MIN_FEATURE_MAP, SPACING_RATIO, build_network
from medseg.planning.planner import MIN_EPOCHS, VALIDATION_SHARE, WIDTHS, Plan, training_step_seconds

COMMENT_COLUMN = 34


def _value(value) -> str:
    """A YAML flow-style value: ``[1.0, 1.0, 1.0]``, ``{a: 1}``, ``true``, ``'off'``."""
    if isinstance(value, tuple):
        value = [list(v) if isinstance(v, tuple) else v for v in value]
    text = yaml.safe_dump([value], default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text[1:-1]


def _line(indent: int, key: str, value=None, comment: str = "", section: bool = False) -> str:
    text = " " * indent + f"{key}:" + ("" if section else f" {_value(value)}")
    return f"{text.ljust(COMMENT_COLUMN)}  # {comment}" if comment else text


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _augmentation_lines(plan: Plan) -> list[str]:
    try:
        from medseg.data.augment import Augmentation
    except ImportError:  # pragma: no cover  (an older tree without augmentation)
        return []
    given = dict(plan.augmentation or {})
    fields = dataclasses.fields(Augmentation)
    unknown = set(given) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"unknown augmentation settings in the plan: {sorted(unknown)}")
    comment = (given and plan.notes.get("augmentation")) or "nnU-Net v2's defaults (medseg.data.augment.Augmentation)"
    lines = [_line(0, "augmentation", section=True, comment=comment)]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = f"nnU-Net's default: {_value(default)}" if f.name in given else ""
        lines.append(_line(2, f.name, given.get(f.name, default), note))
    return lines


def _data_lines(plan: Plan, manifest: str) -> list[str]:
    # on a GPU, augmentation at 128^3 costs ~0.2 s of CPU per patch: on an H100, 4 loader processes fed 15 of the 28
    # patches/s a 3D U-Net step takes, 8 fed 36 and 14 fed 43 (docs/performance.md, "Feeding a GPU")
    workers = 1 if plan.budget.device == "cpu" else max(2, min(12, (os.cpu_count() or 2) - 2))
    lines = [_line(0, "data", section=True), _line(2, "manifest", manifest, "relative to this file")]
    if plan.label_scheme is not None:
        lines.append(_line(2, "label_scheme", plan.label_scheme, "named from the label values seen: the manifest names no scheme"))
    lines += [_line(2, "target", plan.target, plan.notes["target"]),
              _line(2, "val_fold", 0, f"{plan.val_cases} of {plan.cases} cases validate") if plan.val_cases
              else _line(2, "val_fold", None, "a single labelled case: it trains, nothing validates"),
              _line(2, "cache", plan.cache, plan.notes.get("cache", "every prepared case in memory")),
              _line(2, "workers", workers, "loader processes beside the training process" if workers > 1
                    else "one loader process beside the training process on a CPU")]
    return lines


def _preprocessing_lines(plan: Plan) -> list[str]:
    d, norm = plan.design, plan.normalization
    orient = ("RAS: as the fingerprint" if plan.layout.orientation == "RAS"
              else f"the sliced axis ({plan.layout.orientation[-1]}) last: 2D models slice the last axis")
    lines = [_line(0, "preprocessing", section=True), _line(2, "orientation", plan.layout.orientation, orient),
             _line(2, "spacing", d.spacing, plan.notes["spacing"]),
             (_line(2, "crop_foreground", False, "2D images are kept whole (a photograph has no empty background to crop)")
              if norm["normalize"] == "rgb" else _line(2, "crop_foreground", True, "the fingerprint's shapes are of the cropped cases")),
             _line(2, "margin", 2), _line(2, "normalize", norm["normalize"], plan.notes["normalize"])]
    for key in ("ct_clip", "ct_mean", "ct_std"):
        if key in norm:
            lines.append(_line(2, key, norm[key], "foreground of all cases, per channel"))
    return lines


def _model_lines(plan: Plan) -> list[str]:
    net, budget = plan.design.network, plan.budget
    kernel_note = ("every kernel 3: the registered U-Net" if net.model_name == "unet"
                   else f"kernel 1 on axes over {SPACING_RATIO:g}x the finest spacing: dynunet takes per-axis kernels")
    bottleneck = "x".join(str(p // d) for p, d in zip(net.patch, net.divisor))
    base, cap = WIDTHS["cpu" if budget.device == "cpu" else "cuda"][net.spatial_dims]
    width = f"{base} doubling per level, at most {cap} ({budget.device}; {len(net.channels)} levels)"
    pool = (f"pool an axis while >= {2 * MIN_FEATURE_MAP} voxels and <= {SPACING_RATIO:g}x the finest spacing "
            f"(nnU-Net); bottleneck {bottleneck}")
    kw = net.model_kwargs
    if plan.deep_supervision and net.model_name == "dynunet":  # DynUNet's heads, as many as unet's
        kw["deep_supr_num"] = net.supervision_heads
    lines = [_line(0, "model", section=True), _line(2, "name", net.model_name, kernel_note),
             _line(2, "spatial_dims", net.spatial_dims, plan.notes["layout"]), _line(2, "kwargs", section=True)]
    for key, value in kw.items():
        comment = {"channels": width, "filters": width, "strides": pool, "kernel_size": "3, or 1 on coarse axes (nnU-Net)",
                   "num_res_units": "two conv-norm-act per level, as nnU-Net", "norm": "instance norm, as nnU-Net",
                   "deep_supr_num": "deep supervision heads on the decoder levels 1 .. levels - 3"}[key]
        lines.append(_line(4, key, value, comment))
    return lines


def _sampling_lines(plan: Plan) -> list[str]:
    d, net = plan.design, plan.design.network
    dims = net.spatial_dims
    base, cap = WIDTHS["cpu" if plan.budget.device == "cpu" else "cuda"][dims]
    rounded = build_network(d.median_shape[:dims], d.spacing[:dims], base, cap).patch
    shrunk = "" if tuple(net.patch) == tuple(rounded) else ", shrunk on the axes longest in mm"
    patch_note = plan.notes.get("patch") or (
        f"median shape {list(d.median_shape)} at that spacing, multiple of {list(net.divisor)}{shrunk}: "
        f"a step needs ~{_gib(d.memory_bytes)} of {_gib(d.available_bytes)}")
    batch_note = ("nnU-Net's minimum; CPU: a larger batch only means fewer steps" if plan.budget.device == "cpu"
                  else "2 or more while memory allows, at most 5% of the dataset's voxels (nnU-Net)")
    return [_line(0, "sampling", section=True), _line(2, "patch_size", net.patch, patch_note),
            _line(2, "batch_size", d.batch, batch_note), _line(2, "sampler", "foreground"),
            _line(2, "foreground_fraction", plan.foreground_fraction,
                  plan.notes.get("foreground_fraction", "nnU-Net: a third of the patches centred on foreground"))]


def _training_lines(plan: Plan) -> list[str]:
    s, t, b = plan.schedule, plan.timing, plan.budget
    step = training_step_seconds(t, b)
    data = f" ({t.step_seconds:.2f} s + the data path)" if step != t.step_seconds else ""
    epochs_note = (f"{s.epochs} x {s.iterations} steps of {step:.2f} s{data} fill {b.time_budget_min:g} min less "
                   f"{s.startup_seconds:.0f} s loading and {s.validations} validation(s) of {s.validation_seconds:.0f} s")
    amp = {"fp32": "off"}.get(b.precision, b.precision)
    warm = [_line(2, "init_from", plan.init_from, plan.notes["init_from"])] if plan.init_from else []
    return [_line(0, "training", section=True), _line(2, "epochs", s.epochs, plan.notes.get("epochs", epochs_note)),
            _line(2, "iterations_per_epoch", s.iterations, f"nnU-Net's 250, fewer to give >= {MIN_EPOCHS} epochs"),
            _line(2, "val_interval", s.val_interval, plan.notes.get("val_interval", f"validation in at most "
                  f"{VALIDATION_SHARE:.0%} of the budget, the final epoch always")),
            _line(2, "amp", amp, f"the precision the step time was measured in ({t.note})"),
            _line(2, "grad_clip", 12.0, "nnU-Net"), _line(2, "device", b.device),
            _line(2, "model_selection", "final", "the last epoch of the poly schedule (docs/training.md: model choice)")] + warm


def plan_yaml(plan: Plan, name: str, manifest: str, fingerprint: str, command: str = "") -> str:
    """The pipeline text of ``plan``; ``manifest`` and ``fingerprint`` as they should appear (relative paths)."""
    opt = plan.optimizer
    header = [f"# Planned by 'medseg plan' (rules: docs/planning.md) from {manifest}: {plan.cases} labelled case(s),",
              f"# for {plan.budget.device} with {plan.budget.memory_bytes / 2**30:g} GiB and {plan.budget.time_budget_min:g} min. "
              f"Fingerprint: {fingerprint}.",
              "# An ordinary pipeline file: each planned value says where it came from; edit freely."]
    if "cascade" in plan.notes:
        header.append(f"# Cascade (docs/training.md), {plan.notes['cascade']}.")
    if command:
        header.append(f"#   {command}")
    lines = header + [_line(0, "name", name), _line(0, "seed", 0)]
    lines += _data_lines(plan, manifest) + _preprocessing_lines(plan) + _model_lines(plan) + _sampling_lines(plan)
    lines += _augmentation_lines(plan)
    lines += [_line(0, "loss", section=True), _line(2, "name", "auto", "Dice + BCE for regions, Dice + CE for classes"),
              _line(2, "batch_dice", True, "nnU-Net (3D full resolution, 2D): Dice over the batch, not per patch"),
              _line(2, "deep_supervision", plan.deep_supervision, plan.notes["deep_supervision"])]
    lines += [_line(0, "optimizer", section=True)] + [
        _line(2, k, v, plan.notes["optimizer"] if k == "name" else "") for k, v in opt.items()]
    lines += [_line(0, "schedule", section=True), _line(2, "name", "poly", "nnU-Net: lr x (1 - epoch / epochs)^0.9"),
              _line(2, "power", 0.9)]
    lines += _training_lines(plan)
    windows = "x".join(str(p) for p in plan.design.network.patch)
    lines += [_line(0, "inference", section=True), _line(2, "roi_size", plan.design.network.patch, f"the patch ({windows})"),
              _line(2, "overlap", plan.overlap, "nnU-Net's 0.5 on a GPU; 0.25 on a CPU evaluates 1.8x instead of 4.2x the voxels"),
              _line(2, "blend", "gaussian", "nnU-Net"), _line(2, "sw_batch_size", 2), _line(2, "tta", plan.tta, plan.notes.get("tta", ""))]
    if plan.cascade is not None:
        lines += [_line(0, "cascade", section=True, comment="medseg.inference.cascade"),
                  _line(2, "localiser", plan.cascade["localiser"], "the first stage's run folder, relative to this file "
                        "(a CV folder: fold K's refiner is localised by its fold K)"),
                  _line(2, "margin_mm", plan.cascade["margin_mm"], "the output is kept within this distance of the "
                        "first stage's foreground"),
                  _line(2, "average", [], "regions averaged with the first stage: chosen by this run's cross-validation")]
    return "\n".join(lines) + "\n"


def write_plan(plan: Plan, path: str | Path, manifest: str | Path, name: str, fingerprint: str | Path,
               command: str = "") -> Path:
    """Write the pipeline file ``path``; the manifest and fingerprint paths are written relative to it."""
    path = Path(path)
    folder = path.parent.resolve() if path.parent.exists() else path.parent.absolute()
    rel = os.path.relpath(Path(manifest).resolve(), folder).replace(os.sep, "/")
    fp = os.path.relpath(Path(fingerprint).resolve(), folder).replace(os.sep, "/")
    write_text_atomic(path, plan_yaml(plan, name, rel, fp, command))
    return path

