"""Meta-architectures: the nuclei Mask R-CNN baseline and the paper's panoptic model on top of it."""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .fusion import FeatureFusion, build_feature_fusion, fusion_loss
from .roi_heads import NucleiROIHeads

# MODEL.NUCSEG.FUSION_BOXES -> the positive ROIs' field whose boxes feature fusion pastes at.
FUSION_BOX_FIELDS = {"predicted": "pred_boxes", "proposal": "proposal_boxes"}

__all__ = ["NucleiRCNN", "PanopticNucleiRCNN"]


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
    def __init__(self, *, paste_full_masks: bool = False, mask_threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.paste_full_masks = paste_full_masks
        # Full-image masks leave the model binarised, so TEST.NUCLEI.MASK_THRESH must apply here.
        self.mask_threshold = mask_threshold

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["paste_full_masks"] = cfg.MODEL.NUCSEG.PASTE_FULL_MASKS
        ret["mask_threshold"] = cfg.TEST.NUCLEI.MASK_THRESH
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
                processed.append({"instances": detector_postprocess(result, height, width,
                                                                    mask_threshold=self.mask_threshold)})
            else:
                processed.append({"instances": compact_detector_postprocess(result, height, width)})
        return processed


# Config key (under MODEL.NUCSEG.LOSS_WEIGHTS) weighting each term of the total loss, Eq. 4.
LOSS_WEIGHT_KEYS = {
    "loss_rpn_cls": "RPN_CLS",  # L_rpn-obj
    "loss_rpn_loc": "RPN_LOC",  # L_rpn-reg
    "loss_cls": "CLS",  # L_det-cls
    "loss_box_reg": "BOX_REG",  # L_det-reg
    "loss_mask": "MASK",  # L_det-mask
    "loss_sem_seg": "SEMSEG1",  # semantic branch
    "loss_fusion": "SEMSEG2",  # feature fusion
}


@META_ARCH_REGISTRY.register()
class PanopticNucleiRCNN(NucleiRCNN):
    """The paper's panoptic model (Fig. 2): NucleiRCNN + semantic branch + feature fusion.

    Training runs the backbone once; its features feed the RPN, the ROI heads, the semantic head
    (``MODEL.SEM_SEG_HEAD``, when ``MODEL.NUCSEG.SEMANTIC_ON``) and feature fusion (when
    ``MODEL.NUCSEG.FUSION_ON``; needs :class:`NucleiROIHeads`). The returned losses are the
    seven terms of Eq. 4, each multiplied by its ``MODEL.NUCSEG.LOSS_WEIGHTS`` key: loss_rpn_cls,
    loss_rpn_loc, loss_cls, loss_box_reg, loss_mask, loss_sem_seg (L_semseg1), loss_fusion
    (L_semseg2); the trainer sums them. Semantic targets are the inputs' ``sem_seg`` (0/1),
    padded with ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``.

    Inference is NucleiRCNN's (the extra branches do not run) and returns ``{"instances"}`` per
    image; with ``MODEL.NUCSEG.RETURN_SEMANTIC`` also ``"sem_seg"``: the semantic head's
    (num_classes, height, width) logits, as Detectron2's PanopticFPN returns them.
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: Optional[nn.Module] = None,
        feature_fusion: Optional[FeatureFusion] = None,
        fusion_in_feature: str = "p2",
        fusion_boxes: str = "predicted",
        sem_seg_ignore_value: int = 255,
        loss_weights: Optional[Dict[str, float]] = None,
        return_semantic: bool = False,
        **kwargs,
    ):
        """
        Args:
            sem_seg_head: the semantic branch (Detectron2 sem-seg head interface) or None.
            feature_fusion: a FeatureFusion or None; needs ``roi_heads`` to be NucleiROIHeads.
            fusion_in_feature: the backbone feature the fusion map is made from.
            fusion_boxes: where each mask is pasted: "predicted", its ROI's regressed box (paper
                Eq. 1), or "proposal", the box its logits were pooled from.
            sem_seg_ignore_value: target value of padding / unlabelled pixels.
            loss_weights: multiplier per loss name (names missing here get 1).
            return_semantic: also return the semantic head's map at inference.
            kwargs: NucleiRCNN's arguments.
        """
        super().__init__(**kwargs)
        if feature_fusion is not None and not isinstance(self.roi_heads, NucleiROIHeads):
            raise ValueError(
                "MODEL.NUCSEG.FUSION_ON needs the positive ROIs' mask logits and boxes: set "
                f"MODEL.ROI_HEADS.NAME to 'NucleiROIHeads' (got {type(self.roi_heads).__name__})"
            )
        if feature_fusion is not None and not self.roi_heads.mask_on:
            raise ValueError("MODEL.NUCSEG.FUSION_ON pastes predicted masks: it needs MODEL.MASK_ON True")
        if return_semantic and sem_seg_head is None:
            raise ValueError("MODEL.NUCSEG.RETURN_SEMANTIC needs the semantic branch (MODEL.NUCSEG.SEMANTIC_ON True)")
        self.sem_seg_head = sem_seg_head
        self.feature_fusion = feature_fusion
        self.fusion_in_feature = fusion_in_feature
        if fusion_boxes not in FUSION_BOX_FIELDS:
            raise ValueError(f"fusion_boxes must be one of {sorted(FUSION_BOX_FIELDS)}, got {fusion_boxes!r}")
        self.fusion_box_field = FUSION_BOX_FIELDS[fusion_boxes]
        self.sem_seg_ignore_value = sem_seg_ignore_value
        self.loss_weights = dict(loss_weights or {})
        self.return_semantic = return_semantic

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        output_shape = ret["backbone"].output_shape()
        nucseg = cfg.MODEL.NUCSEG
        if nucseg.SEMANTIC_ON:
            ret["sem_seg_head"] = build_sem_seg_head(cfg, output_shape)
        if nucseg.FUSION_ON:
            if cfg.MODEL.ROI_HEADS.NAME != "NucleiROIHeads" and not isinstance(ret["roi_heads"], NucleiROIHeads):
                raise ValueError(
                    "MODEL.NUCSEG.FUSION_ON: True requires MODEL.ROI_HEADS.NAME: 'NucleiROIHeads' "
                    f"(got {cfg.MODEL.ROI_HEADS.NAME!r}), which exposes the positive ROIs' mask logits "
                    "and regressed boxes during training"
                )
            ret["feature_fusion"] = build_feature_fusion(cfg, output_shape)
        ret["fusion_in_feature"] = nucseg.FUSION_IN_FEATURE
        ret["fusion_boxes"] = nucseg.FUSION_BOXES
        ret["sem_seg_ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        ret["loss_weights"] = {name: nucseg.LOSS_WEIGHTS[key] for name, key in LOSS_WEIGHT_KEYS.items()}
        ret["return_semantic"] = nucseg.RETURN_SEMANTIC
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)

        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        positive_rois, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses = {**proposal_losses, **detector_losses}

        if self.sem_seg_head is not None or self.feature_fusion is not None:
            gt_sem_seg = self._batched_sem_seg(batched_inputs)
        if self.sem_seg_head is not None:
            _, sem_seg_losses = self.sem_seg_head(features, gt_sem_seg)
            losses.update(sem_seg_losses)
        if self.feature_fusion is not None:
            fused = self.feature_fusion(
                features[self.fusion_in_feature],
                [x.mask_logits for x in positive_rois],
                [x.get(self.fusion_box_field).tensor for x in positive_rois],
                images.tensor.shape[-2:],
            )
            losses["loss_fusion"] = fusion_loss(fused, gt_sem_seg, self.sem_seg_ignore_value)

        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)
        return {name: loss * self.loss_weights.get(name, 1.0) for name, loss in losses.items()}

    def _batched_sem_seg(self, batched_inputs) -> torch.Tensor:
        """(B, H, W) targets at the padded image size, padding = ignore value (as PanopticFPN)."""
        if "sem_seg" not in batched_inputs[0]:
            raise KeyError(
                "PanopticNucleiRCNN trains its semantic branch / feature fusion on each input's "
                "'sem_seg' (H, W) 0/1 map, as NucleiDatasetMapper outputs; it is missing"
            )
        return ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_ignore_value,
            self.backbone.padding_constraints,
        ).tensor

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], detected_instances=None,
                  do_postprocess: bool = True):
        """NucleiRCNN's inference; with ``return_semantic`` the semantic head also runs on the same
        features and each output gains ``sem_seg`` (without post-processing: ``(instances,
        sem_seg_logits)``)."""
        if not self.return_semantic:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        sem_seg_results, _ = self.sem_seg_head(features, None)
        if not do_postprocess:
            return results, sem_seg_results
        processed = self.postprocess_instances(results, batched_inputs)
        for output, sem_seg, inputs, image_size in zip(processed, sem_seg_results, batched_inputs,
                                                       images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            output["sem_seg"] = sem_seg_postprocess(sem_seg, image_size, height, width)
        return processed
