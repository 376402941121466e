"""Evaluation of predicted label maps against ground truth: metrics, case matching, reports.

- :func:`compute_metrics` — pure arrays: Dice, IoU, precision, recall, F1, specificity, accuracy, HD95, ASSD,
  normalised surface Dice and volumes, per class and per region, and per case pixel accuracy, mean pixel accuracy,
  mean IoU and frequency-weighted IoU (``medseg.evaluation.metrics``).
- :func:`evaluate` — predictions (folder or manifest) against a ground-truth manifest -> :class:`EvaluationResult`
  with ``cases`` and ``summary`` DataFrames (``medseg.evaluation.evaluate``).
- :func:`write_report` — ``cases.csv``, ``summary.csv``, ``summary.json``, ``confusion.csv`` and ``report.html``
  (``medseg.evaluation.report``).

Metric definitions and the empty-mask rules: ``docs/evaluation.md``.
"""
from __future__ import annotations

from medseg.evaluation.evaluate import EvaluationResult, evaluate, summarize
from medseg.evaluation.metrics import METRICS, MetricSettings, compute_metrics
from medseg.evaluation.report import write_report

__all__ = ["evaluate", "EvaluationResult", "summarize", "compute_metrics", "MetricSettings", "METRICS", "write_report"]
