"""The result of predicting one image or slide region (the contract with the writers)."""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

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
    """

    label_map: np.ndarray
    scores: np.ndarray
    downsample: float = 1.0
    origin: Tuple[int, int] = (0, 0)
    mpp: Optional[float] = None
    source: Optional[str] = None

    def __post_init__(self):
        if self.label_map.ndim != 2:
            raise ValueError(f"label_map must be 2-D, got shape {self.label_map.shape}")
        self.scores = np.asarray(self.scores, dtype=np.float32)

    @property
    def num_nuclei(self) -> int:
        return int(self.scores.shape[0])

    def to_level0(self, x, y):
        """Analysed-level pixel coordinates -> level-0 (full-resolution slide) coordinates."""
        return (self.origin[0] + np.asarray(x) * self.downsample,
                self.origin[1] + np.asarray(y) * self.downsample)
