"""ROI heads that also hand the positive ROIs' mask logits and regressed boxes to feature fusion."""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import select_foreground_proposals
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead, mask_rcnn_loss
from detectron2.structures import Boxes, ImageList, Instances

__all__ = ["NucleiROIHeads"]


@ROI_HEADS_REGISTRY.register()
class NucleiROIHeads(StandardROIHeads):
    """:class:`StandardROIHeads` whose training output also carries what feature fusion needs.

    Inference and every loss are exactly StandardROIHeads'. In training, ``forward`` returns
    ``(positive_rois, losses)`` instead of ``(sampled_proposals, losses)`` (GeneralizedRCNN
    ignores the first value in training, so the class drops into any Detectron2 model).
    ``positive_rois[i]`` holds image i's foreground sampled proposals in sampling order, with the
    usual fields (``proposal_boxes``, ``objectness_logits``, ``gt_classes``, ``gt_boxes``,
    ``gt_masks``...) plus:

    * ``pred_boxes`` (Boxes, detached): the box regressed from each proposal for its
      highest-scoring foreground class (class-agnostic regression: the single box).
    * ``pred_classes`` (int64): that class.
    * ``mask_logits`` (R, M, M), with gradient, when MASK_ON: the mask head's logit for the
      ground-truth class (channel 0 for a class-agnostic head), i.e. the logits the mask loss
      sees; computed in the same mask-head pass as ``loss_mask``.

    The mask head must be a :class:`BaseMaskRCNNHead` that keeps its ``forward``
    (``layers(x)`` then ``mask_rcnn_loss``), as Detectron2's heads and nucseg-d2's do: its
    ``layers`` is called once and the loss computed as ``BaseMaskRCNNHead.forward`` does.
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.mask_on:
            head = self.mask_head
            if not isinstance(head, BaseMaskRCNNHead) or type(head).forward is not BaseMaskRCNNHead.forward:
                raise TypeError(
                    f"NucleiROIHeads needs the mask logits of each ROI: MODEL.ROI_MASK_HEAD.NAME must be a "
                    f"BaseMaskRCNNHead subclass that implements layers() and keeps BaseMaskRCNNHead.forward; "
                    f"got {type(head).__name__}"
                )

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        del targets
        losses = self._forward_box(features, proposals)
        positive_rois, _ = select_foreground_proposals(proposals, self.num_classes)
        losses.update(self._forward_mask(features, positive_rois))
        losses.update(self._forward_keypoint(features, proposals))
        return positive_rois, losses

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """StandardROIHeads._forward_box; in training also sets ``pred_boxes``/``pred_classes``."""
        if not self.training:
            return super()._forward_box(features, proposals)
        box_features = self.box_pooler([features[f] for f in self.box_in_features],
                                       [x.proposal_boxes for x in proposals])
        box_features = self.box_head(box_features)
        predictions = self.box_predictor(box_features)
        del box_features
        losses = self.box_predictor.losses(predictions, proposals)
        with torch.no_grad():
            # From the proposals the box head saw, before train_on_pred_boxes replaces them.
            self._set_regressed_boxes(predictions, proposals)
            if self.train_on_pred_boxes:
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, pred_boxes_per_image in zip(proposals, pred_boxes):
                    proposals_per_image.proposal_boxes = Boxes(pred_boxes_per_image)
        return losses

    def _set_regressed_boxes(self, predictions, proposals: List[Instances]) -> None:
        """Eq. 1: each proposal's regressed box of its highest-scoring foreground class."""
        boxes_per_image = self.box_predictor.predict_boxes(predictions, proposals)
        probs_per_image = self.box_predictor.predict_probs(predictions, proposals)
        for proposals_per_image, boxes, probs in zip(proposals, boxes_per_image, probs_per_image):
            classes = probs[:, :-1].argmax(dim=1)  # the last column is background
            box_dim = 4
            if boxes.shape[1] > box_dim:  # class-specific regression: (R, K * 4)
                # view(-1, K, 4), not view(R, -1, 4): the latter cannot be inferred for R = 0.
                boxes = boxes.view(-1, boxes.shape[1] // box_dim, box_dim)[
                    torch.arange(len(boxes), device=boxes.device), classes]
            proposals_per_image.pred_boxes = Boxes(boxes.detach())
            proposals_per_image.pred_classes = classes

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """In training ``instances`` are the positive ROIs; sets their ``mask_logits``."""
        if not self.training or not self.mask_on:
            return super()._forward_mask(features, instances)
        if self.mask_pooler is not None:
            mask_features = self.mask_pooler([features[f] for f in self.mask_in_features],
                                             [x.proposal_boxes for x in instances])
        else:
            mask_features = {f: features[f] for f in self.mask_in_features}
        head = self.mask_head
        logits = head.layers(mask_features)
        # Exactly BaseMaskRCNNHead.forward in training.
        losses = {"loss_mask": mask_rcnn_loss(logits, instances, head.vis_period) * head.loss_weight}
        if logits.size(1) == 1:
            logits = logits[:, 0]
        else:
            gt_classes = torch.cat([x.gt_classes for x in instances]).to(torch.int64)
            logits = logits[torch.arange(len(logits), device=logits.device), gt_classes]
        for instances_per_image, logits_per_image in zip(instances, logits.split([len(x) for x in instances])):
            instances_per_image.mask_logits = logits_per_image
        return losses
