"""Nuclei evaluation: pure metrics on label maps, significance tests, Detectron2 evaluators."""
from .evaluator import NucleiEvaluator
from .metrics import ALL_METRICS, compute_metrics, summarize

__all__ = ["NucleiEvaluator", "ALL_METRICS", "compute_metrics", "summarize"]
