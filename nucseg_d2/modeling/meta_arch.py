"""Meta-architectures: the nuclei Mask R-CNN baseline (the paper's panoptic model builds on it)."""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances

__all__ = ["NucleiRCNN"]


def compact_detector_postprocess(results: Instances, output_height: int, output_width: int):
    """Like Detectron2's ``detector_postprocess`` but keeps masks box-relative.

    A 1000×1000 Kumar tile holds up to ~1,900 nuclei: Detectron2's full-image ``pred_masks``
    would be ~2 GB of booleans, so masks stay (N, 1, M, M) probabilities in ``pred_mask_probs``
    and are pasted one box at a time by ``instances_to_label_map``.
    """
    if results.has("pred_masks"):
        # Renamed before filtering so Instances indexing keeps masks and boxes aligned.
        results.pred_mask_probs = results.pred_masks
        results.remove("pred_masks")
    results = detector_postprocess(results, output_height, output_width)
    return results


@META_ARCH_REGISTRY.register()
class NucleiRCNN(GeneralizedRCNN):
    """Mask R-CNN for nuclei; at inference returns compact masks unless told to paste them.

    ``MODEL.NUCSEG.PASTE_FULL_MASKS: True`` restores Detectron2's full-image ``pred_masks`` (what
    ``COCOEvaluator`` and ``Visualizer`` expect) at the memory cost explained above.
    """

    @configurable
    def __init__(self, *, paste_full_masks: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.paste_full_masks = paste_full_masks

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["paste_full_masks"] = cfg.MODEL.NUCSEG.PASTE_FULL_MASKS
        return ret

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], detected_instances=None,
                  do_postprocess: bool = True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        return self.postprocess_instances(results, batched_inputs)

    def postprocess_instances(self, results: List[Instances], batched_inputs) -> List[Dict]:
        """Rescale detections to each input's requested output size."""
        processed = []
        for result, inputs in zip(results, batched_inputs):
            height = inputs.get("height", result.image_size[0])
            width = inputs.get("width", result.image_size[1])
            if self.paste_full_masks:
                processed.append({"instances": detector_postprocess(result, height, width)})
            else:
                processed.append({"instances": compact_detector_postprocess(result, height, width)})
        return processed
