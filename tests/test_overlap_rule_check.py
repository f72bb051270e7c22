"""scripts/overlap_rule_check.py: its copy of the old float rule differs from paint_masks exactly at
the boundary it was written to measure, and nowhere else in a small exhaustive case."""
import importlib.util
from pathlib import Path

import numpy as np

from nucseg_d2.modeling.postprocess import paint_masks

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "overlap_rule_check.py"
spec = importlib.util.spec_from_file_location("overlap_rule_check", SCRIPT)
overlap_rule_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overlap_rule_check)


def _paint(painter, covered, max_overlap):
    # A 10-px row under a higher-scoring mask covering its first `covered` pixels.
    top = np.zeros((1, 10), bool)
    top[0, :covered] = True
    row = np.ones((1, 10), bool)
    label_map = np.zeros((1, 10), np.int32)
    painter(label_map, [(top, slice(0, 1), slice(0, 10)), (row, slice(0, 1), slice(0, 10))], max_overlap)
    return label_map


def test_the_float_rule_drops_a_mask_covered_exactly_at_0_3_and_agrees_elsewhere():
    differences = []
    for max_overlap in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        for covered in range(1, 10):
            old = _paint(overlap_rule_check.paint_masks_float_rule, covered, max_overlap)
            new = _paint(paint_masks, covered, max_overlap)
            if not np.array_equal(old, new):
                differences.append((max_overlap, covered))
    assert differences == [(0.3, 3)]
