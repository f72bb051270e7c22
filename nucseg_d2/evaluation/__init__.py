"""Nuclei evaluation: metrics and Detectron2 evaluators."""
