"""Prediction for real use: images and whole slides of any size, tiled and stitched.

``NucleiPredictor(config, weights).predict(image)`` returns a :class:`PredictionResult`;
``python -m nucseg_d2.predict`` / ``nucseg-predict`` runs it over files and writes the outputs.
"""
from .predictor import CheckpointError, NucleiPredictor, load_checkpoint, require_checkpoint_path
from .result import PredictionResult
from .slides import ArraySource, SlideSource, open_image

__all__ = [
    "NucleiPredictor",
    "PredictionResult",
    "CheckpointError",
    "load_checkpoint",
    "require_checkpoint_path",
    "open_image",
    "ArraySource",
    "SlideSource",
]
