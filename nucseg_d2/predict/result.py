"""The result of predicting one image or slide region (the contract with the writers)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from detectron2.structures import Instances

__all__ = ["PredictionResult"]


@dataclass
class PredictionResult:
    """Nuclei found in one image or slide region; see docs/INTERFACES.md ("Prediction").

    Attributes:
        label_map: (H, W) uint16 (uint32 past 65,535 nuclei) at the analysed resolution,
            0 = background, ids 1..N by descending score.
        scores: float32 (N,), ``scores[i - 1]`` is the score of id i.
        downsample: analysed-level pixel coordinates times this are level-0 coordinates.
        origin: (x0, y0) level-0 offset of the analysed region.
        mpp: µm per pixel at the analysed level, or None when the file does not say.
        source: the input path, or None for an in-memory image.
        instances: Detectron2 ``Instances`` of the painted nuclei in analysed-image coordinates,
            ``instances[i]`` being id i + 1: ``pred_boxes`` (the model's boxes), ``scores``,
            ``pred_classes`` and ``pred_mask_probs`` (N, 1, 28, 28) float32, the stitched binary
            mask sampled at 28 x 28 points of its box (the format NucleiRCNN returns, so
            :func:`~nucseg_d2.modeling.postprocess.instances_to_label_map` re-pastes it; the
            label map is the exact mask, and holds only the part left uncovered by higher ids).
            Filled by ``NucleiPredictor.predict``; None for slides read through
            ``predict_source`` (unless asked for), where it would cost ~3 KB per nucleus.
    """

    label_map: np.ndarray
    scores: np.ndarray
    downsample: float = 1.0
    origin: Tuple[int, int] = (0, 0)
    mpp: Optional[float] = None
    source: Optional[str] = None
    instances: Optional[Instances] = None

    def __post_init__(self):
        if self.label_map.ndim != 2:
            raise ValueError(f"label_map must be 2-D, got shape {self.label_map.shape}")
        self.scores = np.asarray(self.scores, dtype=np.float32)

    @property
    def num_nuclei(self) -> int:
        return int(self.scores.shape[0])

    def to_level0(self, x, y):
        """Analysed-level coordinates -> level-0 (full-resolution slide) coordinates, both with pixel
        edges on integers (as the GeoJSON outlines): pass ``col + 0.5, row + 0.5`` for a pixel's
        centre (as the table's centroids), not its index, or the point lands ``downsample / 2``
        level-0 pixels up and left of it."""
        return (self.origin[0] + np.asarray(x) * self.downsample,
                self.origin[1] + np.asarray(y) * self.downsample)
