"""Planning: a dataset fingerprint and a budget -> an ordinary, commented pipeline file (``medseg plan``).

- :mod:`~medseg.planning.fingerprint`: spacing, shape, foreground intensities, classes and modality of each case;
- :mod:`~medseg.planning.network`: the U-Net topology of a patch (pooling, kernels, widths) and its memory and FLOPs;
- :mod:`~medseg.planning.planner`: the rules, pure functions of the fingerprint, the budget and a step timer;
- :mod:`~medseg.planning.measure`: the step timer that measures on the training device;
- :mod:`~medseg.planning.writer`: the pipeline YAML with a comment on every planned value.

The rules and where their numbers come from: docs/planning.md.
"""
from __future__ import annotations

from medseg.planning.api import fingerprint_path, plan
from medseg.planning.fingerprint import Fingerprint, fingerprint_manifest
from medseg.planning.planner import Budget, Plan, StepTime, make_plan
from medseg.planning.writer import plan_yaml, write_plan

__all__ = ["Budget", "Fingerprint", "Plan", "StepTime", "fingerprint_manifest", "fingerprint_path", "make_plan", "plan",
           "plan_yaml", "write_plan"]
