"""Detect distillation campaigns in traffic logs, measured against simulated ground truth.

The simulator (``simulate``, scenarios, ``replay``) lives in ``distillscope.traffic``.
``detect`` scores every account of a log and flags campaigns (``distillscope.detect.detector``);
``fit_reference`` fits its signals on earlier traffic to score new logs against
(``distillscope.detect.signals``); ``evaluate_alerts`` measures the flags against the truth
(``distillscope.detect.evaluate``).
"""

from distillscope.detect.detector import (
    DetectConfig,
    DetectError,
    DetectionSummary,
    detect,
    fit_reference,
)
from distillscope.detect.evaluate import evaluate_alerts
from distillscope.detect.signals import BadReferenceError, Reference

__all__ = [
    "DetectConfig",
    "DetectError",
    "DetectionSummary",
    "detect",
    "fit_reference",
    "Reference",
    "BadReferenceError",
    "evaluate_alerts",
]
