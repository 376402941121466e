"""A two-stage cascade planned from a plan that had to coarsen the grid (``medseg plan --cascade``).

When too few training steps fit the budget at the data's spacing, the planner coarsens it (2 mm for BraTS on a CPU),
and thin structures are lost on the coarse grid. nnU-Net then adds a cascade. The rules here
(:mod:`medseg.inference.cascade` says how the stages predict together):

- **the budget is split between the stages, two thirds to the first**: the first stage (the *localiser*) is the plan
  with :data:`LOCALISER_SHARE` of its epochs, the second (the *refiner*) has the rest, so both fit the one time
  budget. On the 20 BraTS cases the first stage was the weaker half: a better-converged 2 mm localiser (13 min) with
  a 6-minute refiner beat 10 + 10 minutes on WT and TC (docs/results.md, "How the 20 minutes are split");
- **the localiser converges in few steps**: it only has to find the object on the coarse grid, so its augmentation
  is :data:`LOCALISER_AUGMENTATION` (mirroring, brightness and contrast, nnU-Net's other transforms off) and half of
  its patches are centred on foreground (:data:`LOCALISER_FOREGROUND_FRACTION`), the recipe of the 2 mm pipeline
  that localised best in that comparison;
- **the refiner is the same network and patch at the data's own spacing** (the spacing the plan had to give up):
  its step costs what the plan's step costs, so the plan's iterations hold; the patch covers a smaller field of view,
  which is why every refiner patch is centred on the object (``foreground_fraction: 1.0``) and its output is kept
  within ``margin_mm`` of the localiser's foreground;
- **the refiner starts from the first stage's weights** (``training.init_from``; fold K's for fold K): it is the
  same network, and a model that has learnt the object at the coarse spacing adapts to the fine one in far fewer
  steps than a network from scratch learns it (docs/results.md, "Warm start");
- **the refiner validates once, at its last epoch**: its windows on the fine grid cost 8x (3D) the coarse ones, over
  the whole image (docs/training.md, Cascade);
- **TTA by the plan's rule on the fine grid**: mirroring while its passes over a median case take at most
  :data:`~medseg.planning.planner.TTA_MAX_SECONDS`;
- the margin is :class:`medseg.inference.cascade.CascadeSettings`' default (6 mm, looked at on one BraTS fold);
  which regions the two stages average is chosen by the refiner's cross-validation, not planned.

Example:
    >>> split_epochs(10)
    (7, 3)
"""
from __future__ import annotations

import math
from dataclasses import replace

from medseg.errors import MedsegError
from medseg.inference.cascade import CascadeSettings
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.planner import (Design, Plan, Schedule, cache_rule, deep_supervision_rule, median_shape, optimizer_for,
                                     target_spacing, tta_rule, windows_per_case)

REFINER_FOREGROUND_FRACTION = 1.0
LOCALISER_SHARE = 2 / 3
LOCALISER_FOREGROUND_FRACTION = 0.5
# the augmentation settings the localiser changes (the rest keep their defaults): mirroring, brightness and contrast
LOCALISER_AUGMENTATION = {"rotation_p": 0.0, "scale_p": 0.0, "noise_p": 0.0, "blur_p": 0.0, "lowres_p": 0.0,
                          "gamma_p": 0.0}


def split_epochs(epochs: int) -> tuple[int, int]:
    """The plan's epochs shared by the two stages: :data:`LOCALISER_SHARE` (rounded, at least one epoch each)
    localises, the rest refines."""
    if epochs < 2:
        raise MedsegError(f"a cascade splits the plan's epochs between two stages; the plan has {epochs}: give a "
                          "larger --time-budget")
    first = min(epochs - 1, max(1, round(epochs * LOCALISER_SHARE)))
    return first, epochs - first


def plan_cascade(plan: Plan, fp: Fingerprint, localiser: str) -> tuple[Plan, Plan]:
    """(localiser plan, refiner plan) from ``plan``, which must have coarsened the grid (module doc). ``localiser``
    is where the refiner's pipeline finds the first stage's run, relative to the refiner's pipeline file."""
    if plan.coarsen_factor == 1.0:
        raise MedsegError(f"--cascade: the plan keeps the data's spacing {list(plan.target_spacing)} (enough training "
                          "steps fit the budget there), so there is nothing for a second stage to refine; plan without "
                          "--cascade")
    s = plan.schedule
    first, second = split_epochs(s.epochs)
    step_share = s.train_seconds / s.epochs  # training seconds of one epoch in the plan
    budget1 = replace(plan.budget, time_budget_min=plan.budget.time_budget_min * first / s.epochs)
    budget2 = replace(plan.budget, time_budget_min=plan.budget.time_budget_min * second / s.epochs)
    interval1 = min(s.val_interval, first)
    stage1 = _with_steps(replace(plan, budget=budget1, schedule=replace(
        s, epochs=first, val_interval=interval1, validations=math.ceil(first / interval1), train_seconds=step_share * first),
        foreground_fraction=LOCALISER_FOREGROUND_FRACTION, augmentation=LOCALISER_AUGMENTATION,
        notes={**plan.notes, "cascade": f"stage 1 of 2: {first} of the plan's {s.epochs} epochs (the refiner has the "
                                        f"other {second})",
               "foreground_fraction": "half the patches centred on the object: this stage localises it",
               "augmentation": "a localiser's recipe that converges in few steps: mirroring, brightness and contrast "
                               "at nnU-Net's probabilities, its other transforms off (medseg.planning.cascade)"}))

    fine_ras = target_spacing(fp.spacings)[0]  # the planner's rule, on the fingerprint's RAS axes
    fine, shape = plan.layout.permute(fine_ras), plan.layout.permute(median_shape(fp.spacings, fp.shapes, fine_ras))
    design = Design(fine, shape, plan.design.network, plan.design.batch, plan.design.memory_bytes, plan.design.available_bytes)
    one_val = plan.val_cases * windows_per_case(design, plan.overlap) * plan.timing.forward_seconds
    tta, tta_note = tta_rule(design, plan.timing, plan.overlap)
    margin = CascadeSettings().margin_mm
    cache, cache_note = cache_rule(fp, fine_ras, plan.budget)  # the cases prepared on the fine grid
    coarse = "x".join(f"{v:g}" for v in plan.design.spacing)
    notes = {**plan.notes, "tta": tta_note,
             "spacing": f"the target spacing before the plan coarsened it x{plan.coarsen_factor:g}; the first stage "
                        f"works at {coarse} mm",
             "patch": f"the first stage's network and patch ({'x'.join(map(str, plan.design.network.patch))}): a step "
                      "costs the same, on a smaller field of view",
             "foreground_fraction": "every patch centred on the object: the output is kept near the first stage's",
             "epochs": f"{second} of the plan's {s.epochs} epochs x {s.iterations} steps, {budget2.time_budget_min:.1f} of "
                       f"{plan.budget.time_budget_min:g} min (the first stage has the other {first})",
             "val_interval": "once, at the end: windows over the whole image on the fine grid cost more "
                             "(docs/training.md, Cascade)",
             "cascade": f"stage 2 of 2: kept within {margin:g} mm of the first stage's foreground (medseg default)",
             "init_from": "starts from the first stage's weights (fold K's for fold K): the same network, trained at "
                          "the coarse spacing", "cache": cache_note}
    refiner = _with_steps(replace(plan, budget=budget2, coarsen_factor=1.0, design=design, tta=tta, notes=notes,
                                  schedule=Schedule(second, s.iterations, second, 1, one_val, step_share * second,
                                                    s.startup_seconds),
                                  foreground_fraction=REFINER_FOREGROUND_FRACTION,
                                  cascade={"localiser": localiser, "margin_mm": margin}, init_from=localiser,
                                  cache=cache))
    return stage1, refiner


def _with_steps(stage: Plan) -> Plan:
    """The plan's step-count rules (optimiser, deep supervision) applied to one stage's own steps."""
    steps = stage.schedule.epochs * stage.schedule.iterations
    optimizer, optimizer_note = optimizer_for(steps)
    supervised, supervision_note = deep_supervision_rule(stage.design.network, steps)
    return replace(stage, optimizer=optimizer, deep_supervision=supervised,
                   notes={**stage.notes, "optimizer": optimizer_note, "deep_supervision": supervision_note})

