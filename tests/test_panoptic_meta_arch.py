"""PanopticNucleiRCNN and NucleiROIHeads: Eq. 4 losses, one backbone pass, instance-only
inference, the ROI heads' training outputs, and checkpoints shared with the baseline."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from nucseg_d2 import add_nucseg_config
from nucseg_d2.config import NucleiConfigError, merge_config_file, validate_nucseg_config
from nucseg_d2.modeling import NucleiROIHeads, PanopticNucleiRCNN
from nucseg_d2.modeling.fusion import fusion_loss
from nucseg_d2.modeling.postprocess import instances_to_label_map

from model_inputs import synthetic_training_input

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "Base-Nuclei-RCNN-FPN.yaml"
SEVEN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask",
                "loss_sem_seg", "loss_fusion"}
NEW_BRANCHES = ("sem_seg_head.", "feature_fusion.")


def _small_cfg(panoptic=True):
    """ResNet-18 GN, narrow FPN/heads, few ROIs: a CPU-sized version of the base config."""
    cfg = get_cfg()
    add_nucseg_config(cfg)
    merge_config_file(cfg, str(BASE_CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 400,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 400,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 200,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 2,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
        "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4,
        "MODEL.SEM_SEG_HEAD.NORM", "GN",
        "TEST.DETECTIONS_PER_IMAGE", 50,
    ])
    if panoptic:
        cfg.merge_from_list([
            "MODEL.META_ARCHITECTURE", "PanopticNucleiRCNN",
            "MODEL.ROI_HEADS.NAME", "NucleiROIHeads",
            "MODEL.NUCSEG.SEMANTIC_ON", True,
            "MODEL.NUCSEG.FUSION_ON", True,
        ])
    return cfg


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def batch():
    # Two images of different sizes, so the batch is padded (sem_seg with the ignore value).
    return [synthetic_training_input(3, 64, 80), synthetic_training_input(4, 72, 64)]


def _train_losses(model, batch, seed=0):
    model.train()
    torch.manual_seed(seed)  # proposal sampling is random
    with EventStorage(0):
        return model(batch)


def test_registered():
    assert META_ARCH_REGISTRY.get("PanopticNucleiRCNN") is PanopticNucleiRCNN
    assert ROI_HEADS_REGISTRY.get("NucleiROIHeads") is NucleiROIHeads


def test_training_gives_the_seven_losses_of_eq4_all_finite(batch):
    model = _build(_small_cfg())
    fusion_inputs = []
    model.feature_fusion.register_forward_hook(lambda m, inputs, output: fusion_inputs.append(inputs))
    losses = _train_losses(model, batch)
    assert set(losses) == SEVEN_LOSSES
    feature, mask_logits, boxes, image_size = fusion_inputs[0]
    assert feature is not None and tuple(image_size) == (96, 96)  # both images, padded to 32
    assert len(mask_logits) == 2 and all(len(m) > 0 and len(m) == len(b) for m, b in zip(mask_logits, boxes))
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values()), losses
    sum(losses.values()).backward()
    for branch in (model.sem_seg_head, model.feature_fusion, model.roi_heads.mask_head, model.backbone):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


def test_semantic_targets_are_padded_with_the_ignore_value_and_line_up_with_the_fused_map():
    # Not square once padded: 64 x 80 and 40 x 48 pad to 64 x 96 (80 -> 96 by size_divisibility 32),
    # so a height/width swap cannot go unnoticed.
    batch = [synthetic_training_input(3, 64, 80), synthetic_training_input(5, 40, 48)]
    cfg = _small_cfg()
    assert cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255 and cfg.MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG2 == 1.0
    model = _build(cfg)
    assert model.backbone.size_divisibility == 32
    captured = {}
    model.sem_seg_head.register_forward_pre_hook(lambda m, inputs: captured.__setitem__("targets", inputs[1]))
    model.feature_fusion.register_forward_hook(lambda m, inputs, output: captured.__setitem__("fused", output))
    losses = _train_losses(model, batch)
    targets, fused = captured["targets"], captured["fused"]

    # Built by hand: 255 everywhere, each image's own 0/1 map in its top-left corner.
    expected = torch.full((2, 64, 96), 255, dtype=torch.int64)
    expected[0, :64, :80] = batch[0]["sem_seg"]
    expected[1, :40, :48] = batch[1]["sem_seg"]
    assert targets.shape == (2, 64, 96) and fused.shape == (2, 2, 64, 96)
    assert torch.equal(targets, expected)
    assert (targets == 255).sum() == 2 * 64 * 96 - 64 * 80 - 40 * 48  # exactly the padding is ignored
    # L_semseg2 scores F_N against these targets pixel for pixel, the padding left out.
    torch.testing.assert_close(losses["loss_fusion"], fusion_loss(fused, targets, 255))
    torch.testing.assert_close(losses["loss_fusion"], F.cross_entropy(fused, expected, ignore_index=255))


def test_training_step_on_a_batch_with_an_image_without_nuclei(batch):
    """Random crops can hold no nucleus (empty crops are kept): the step must still give finite
    losses and gradients, the empty image's fused map falling back to F_0."""
    empty = dict(batch[0])
    empty["instances"] = batch[0]["instances"][:0]
    empty["sem_seg"] = torch.zeros_like(batch[0]["sem_seg"])
    model = _build(_small_cfg())
    losses = _train_losses(model, [empty, batch[1]])
    assert set(losses) == SEVEN_LOSSES
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    sum(losses.values()).backward()
    for branch in (model.sem_seg_head, model.feature_fusion, model.roi_heads.mask_head, model.backbone):
        grads = [p.grad for p in branch.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_ignore_value_that_is_a_class_is_refused():
    for ignore_value in (0, 1):
        cfg = _small_cfg()
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = ignore_value
        with pytest.raises(NucleiConfigError, match=f"IGNORE_VALUE must not be a class.*got {ignore_value}"):
            validate_nucseg_config(cfg)
    cfg = _small_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = -1
    validate_nucseg_config(cfg)  # any non-class value is fine


@pytest.mark.parametrize("fusion_boxes, field", [("predicted", "pred_boxes"), ("proposal", "proposal_boxes")])
def test_fusion_pastes_each_mask_at_the_configured_box(batch, fusion_boxes, field):
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.FUSION_BOXES = fusion_boxes
    model = _build(cfg)
    positive_rois, fusion_inputs = [], []
    model.roi_heads.register_forward_hook(lambda m, inputs, output: positive_rois.extend(output[0]))
    model.feature_fusion.register_forward_hook(lambda m, inputs, output: fusion_inputs.append(inputs))
    _train_losses(model, batch)
    _, mask_logits, boxes, _ = fusion_inputs[0]
    for rois, pasted_boxes, logits in zip(positive_rois, boxes, mask_logits):
        assert torch.equal(pasted_boxes, rois.get(field).tensor) and len(logits) == len(rois)
    # The choice matters: an untrained box head moves the proposals.
    assert not torch.allclose(positive_rois[0].pred_boxes.tensor, positive_rois[0].proposal_boxes.tensor)


def test_fusion_box_offsets_script_measures_both_boxes_on_the_same_rois(batch):
    spec = importlib.util.spec_from_file_location("fusion_box_offsets", REPO / "scripts" / "fusion_box_offsets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = _build(_small_cfg())
    seen = []  # every pass's positive ROIs: 2 box choices x 2 batches x 2 images
    model.roi_heads.register_forward_hook(lambda m, inputs, output: seen.extend(output[0]))
    row = script.measure(model, [batch, batch], seed=0)
    assert len(seen) == 8
    first, second = seen[:4], seen[4:]
    # The same ROIs under both choices (the same sampling), so the losses differ by the box only.
    for a, b in zip(first, second):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
    assert row["rois"] == sum(len(r) for r in first) > 0
    iou = torch.cat([torch.diag(pairwise_iou(r.proposal_boxes, r.pred_boxes)) for r in first])
    assert row["iou_median"] == pytest.approx(float(np.median(iou.numpy())), abs=1e-6)
    assert 0 < row["iou_median"] < 1 and row["centre_offset_px_mean"] > 0
    assert 0 <= row["proposal_gt_iou"] <= 1 and 0 <= row["predicted_gt_iou"] <= 1
    # Same ROIs, different paste boxes: the two fusion losses are finite and not equal.
    assert np.isfinite(row["loss_fusion_predicted"]) and np.isfinite(row["loss_fusion_proposal"])
    assert row["loss_fusion_predicted"] != row["loss_fusion_proposal"]


def test_unknown_fusion_boxes_is_refused():
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.FUSION_BOXES = "ground_truth"
    with pytest.raises(ValueError, match="fusion_boxes"):
        _build(cfg)
    with pytest.raises(NucleiConfigError, match="MODEL.NUCSEG.FUSION_BOXES.*ground_truth"):
        validate_nucseg_config(cfg)


def test_settings_of_a_branch_that_is_off_are_refused_not_ignored():
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.FUSION_ON = False
    cfg.MODEL.NUCSEG.FUSION_BOXES = "proposal"
    with pytest.raises(NucleiConfigError, match="FUSION_BOXES 'proposal': MODEL.NUCSEG.FUSION_ON False"):
        validate_nucseg_config(cfg)
    cfg.MODEL.NUCSEG.FUSION_BOXES = "predicted"  # the default: nothing to say
    validate_nucseg_config(cfg)
    for panoptic, semantic_on in ((True, False), (False, False)):
        cfg = _small_cfg(panoptic=panoptic)
        cfg.MODEL.NUCSEG.SEMANTIC_ON = semantic_on
        cfg.MODEL.NUCSEG.RETURN_SEMANTIC = True
        with pytest.raises(NucleiConfigError, match="RETURN_SEMANTIC True needs the semantic branch"):
            validate_nucseg_config(cfg)


def test_each_loss_weight_scales_its_term(batch):
    cfg = _small_cfg()
    reference = _train_losses(_build(cfg), batch)
    keys = ["RPN_CLS", "RPN_LOC", "CLS", "BOX_REG", "MASK", "SEMSEG1", "SEMSEG2"]
    names = ["loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "loss_sem_seg", "loss_fusion"]
    weights = [0.5, 2.0, 3.0, 0.25, 1.5, 4.0, 0.1]
    for key, weight in zip(keys, weights):
        cfg.MODEL.NUCSEG.LOSS_WEIGHTS[key] = weight
    weighted = _train_losses(_build(cfg), batch)
    for name, weight in zip(names, weights):
        torch.testing.assert_close(weighted[name], reference[name] * weight)


def test_ablations_by_flags(batch):
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.FUSION_ON = False
    model = _build(cfg)
    assert model.feature_fusion is None
    assert set(_train_losses(model, batch)) == SEVEN_LOSSES - {"loss_fusion"}
    cfg.MODEL.NUCSEG.FUSION_ON, cfg.MODEL.NUCSEG.SEMANTIC_ON = True, False
    model = _build(cfg)
    assert model.sem_seg_head is None
    assert set(_train_losses(model, batch)) == SEVEN_LOSSES - {"loss_sem_seg"}


def test_backbone_runs_once_per_training_step(batch):
    model = _build(_small_cfg())
    calls = {"backbone": 0, "bottom_up": 0}
    model.backbone.register_forward_hook(lambda *args: calls.__setitem__("backbone", calls["backbone"] + 1))
    model.backbone.bottom_up.register_forward_hook(
        lambda *args: calls.__setitem__("bottom_up", calls["bottom_up"] + 1))
    _train_losses(model, batch)
    assert calls == {"backbone": 1, "bottom_up": 1}


def test_proposed_model_with_gcn_head_on_bottom_up_features(batch):
    cfg = _small_cfg()
    cfg.merge_from_list([
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_with_bottom_up_backbone",
        "MODEL.SEM_SEG_HEAD.NAME", "GCNSemSegHead",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.SEM_SEG_HEAD.GCN_CHANNELS", 32,
        "MODEL.ROI_MASK_HEAD.NAME", "DualModalMaskHead",
        "MODEL.ROI_MASK_HEAD.DUAL_MODAL.FC_CONV_DIM", 32,
        "MODEL.ROI_MASK_HEAD.DUAL_MODAL.SHUFFLE_CONV_DIM", 128,
    ])
    model = _build(cfg)
    calls = []
    model.backbone.bottom_up.register_forward_hook(lambda *args: calls.append(1))
    losses = _train_losses(model, batch)
    assert set(losses) == SEVEN_LOSSES
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    assert calls == [1]


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_inference_runs_only_the_instance_branch(batch):
    model = _build(_small_cfg())
    model.eval()
    semantic_calls = _count_calls(model.sem_seg_head)
    fusion_calls = _count_calls(model.feature_fusion)
    inputs = [{k: v for k, v in x.items() if k in ("image", "height", "width")} for x in batch]
    with torch.no_grad():
        outputs = model(inputs)
    assert [set(o) for o in outputs] == [{"instances"}, {"instances"}]
    assert outputs[1]["instances"].image_size == (72, 64)
    assert outputs[0]["instances"].has("pred_mask_probs")  # NucleiRCNN's compact masks
    assert semantic_calls == [] and fusion_calls == []


@pytest.mark.parametrize("mask_thresh", [0.3, 0.7])
def test_full_image_masks_are_binarised_at_the_configured_mask_threshold(mask_thresh):
    # PASTE_FULL_MASKS leaves the model binarising masks; the label map must then be the one
    # the compact path gives at the same TEST.NUCLEI.MASK_THRESH (it ignored it before: 0.5).
    def detections():
        instances = Instances((40, 40))
        instances.pred_boxes = Boxes(torch.tensor([[4.0, 6.0, 34.0, 30.0]]))
        instances.scores = torch.tensor([0.9])
        instances.pred_classes = torch.tensor([0])
        ramp = (torch.arange(28, dtype=torch.float32) + 0.5) / 28  # no value on a threshold
        instances.pred_masks = ramp.expand(28, 28).clone()[None, None]
        return instances

    label_maps = {}
    for paste_full in (True, False):
        cfg = _small_cfg(panoptic=False)
        cfg.MODEL.NUCSEG.PASTE_FULL_MASKS = paste_full
        cfg.TEST.NUCLEI.MASK_THRESH = mask_thresh
        model = _build(cfg)
        processed = model.postprocess_instances([detections()], [{"height": 40, "width": 40}])[0]["instances"]
        assert processed.has("pred_masks") == paste_full
        label_maps[paste_full] = instances_to_label_map(processed, score_thresh=0.5,
                                                        mask_thresh=mask_thresh, max_overlap=0.7)
    np.testing.assert_array_equal(label_maps[True], label_maps[False])
    box_area = 30 * 24
    assert 0 < (label_maps[True] > 0).sum() < box_area
    assert abs((label_maps[True] > 0).sum() / box_area - (1 - mask_thresh)) < 0.1


def test_return_semantic_adds_the_semantic_map(batch):
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.RETURN_SEMANTIC = True
    model = _build(cfg)
    model.eval()
    inputs = [{k: v for k, v in x.items() if k in ("image", "height", "width")} for x in batch]
    inputs[1]["height"], inputs[1]["width"] = 36, 32  # output size differs from input size
    with torch.no_grad():
        outputs = model(inputs)
    assert [set(o) for o in outputs] == [{"instances", "sem_seg"}, {"instances", "sem_seg"}]
    assert outputs[0]["sem_seg"].shape == (2, 64, 80)
    assert outputs[1]["sem_seg"].shape == (2, 36, 32)
    assert outputs[1]["instances"].image_size == (36, 32)


def test_config_errors_are_explicit():
    cfg = _small_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    with pytest.raises(ValueError, match="NucleiROIHeads"):
        _build(cfg)
    cfg = _small_cfg()
    cfg.MODEL.NUCSEG.SEMANTIC_ON = False
    cfg.MODEL.NUCSEG.RETURN_SEMANTIC = True
    with pytest.raises(ValueError, match="SEMANTIC_ON"):
        _build(cfg)


def test_missing_sem_seg_targets_are_reported(batch):
    model = _build(_small_cfg())
    inputs = [{k: v for k, v in x.items() if k != "sem_seg"} for x in batch]
    with pytest.raises(KeyError, match="sem_seg"):
        _train_losses(model, inputs)


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps what it reports about incompatible keys."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def test_baseline_checkpoint_loads_into_the_panoptic_model_and_back(tmp_path):
    baseline_cfg = _small_cfg(panoptic=False)
    baseline_cfg.MODEL.META_ARCHITECTURE = "NucleiRCNN"
    baseline = _build(baseline_cfg, seed=1)
    DetectionCheckpointer(baseline, save_dir=str(tmp_path)).save("baseline")
    panoptic = _build(_small_cfg(), seed=2)
    panoptic_only = [k for k in panoptic.state_dict() if k.startswith(NEW_BRANCHES)]
    assert panoptic_only

    checkpointer = _RecordingCheckpointer(panoptic)
    checkpointer.load(str(tmp_path / "baseline.pth"))
    incompatible = checkpointer.incompatible
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert sorted(incompatible.missing_keys) == sorted(panoptic_only)
    panoptic_state = panoptic.state_dict()
    for key, value in baseline.state_dict().items():
        assert torch.equal(panoptic_state[key], value), key

    # And the other way (an ablation started from the full model): only the new branches are left.
    DetectionCheckpointer(panoptic, save_dir=str(tmp_path)).save("panoptic")
    checkpointer = _RecordingCheckpointer(baseline)
    checkpointer.load(str(tmp_path / "panoptic.pth"))
    assert checkpointer.incompatible.missing_keys == []
    assert sorted(checkpointer.incompatible.unexpected_keys) == sorted(panoptic_only)


# ---------------------------------------------------------------- NucleiROIHeads alone


def _roi_heads_and_inputs(name, num_classes=1, cls_agnostic_mask=False):
    cfg = _small_cfg(panoptic=False)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", name, "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
                         "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", cls_agnostic_mask])
    shapes = {f"p{level}": ShapeSpec(channels=32, stride=2 ** level) for level in range(2, 6)}
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, shapes)
    features = {f"p{level}": torch.randn(2, 32, 64 // 2 ** level, 64 // 2 ** level) for level in range(2, 6)}
    generator = torch.Generator().manual_seed(5)
    targets, proposals = [], []
    for _ in range(2):
        target = Instances((64, 64))
        corners = torch.rand(6, 2, generator=generator) * 40
        target.gt_boxes = Boxes(torch.cat([corners, corners + 8 + torch.rand(6, 2, generator=generator) * 14], 1))
        target.gt_classes = torch.randint(0, num_classes, (6,), generator=generator)
        target.gt_masks = BitMasks(torch.rand(6, 64, 64, generator=generator) > 0.5)
        targets.append(target)
        proposal = Instances((64, 64))
        jitter = torch.randn(30, 4, generator=generator) * 2
        proposal.proposal_boxes = Boxes(target.gt_boxes.tensor.repeat(5, 1) + jitter)
        proposal.objectness_logits = torch.randn(30, generator=generator)
        proposals.append(proposal)
    return heads, features, proposals, targets


def _run_heads(heads, features, proposals, targets):
    heads.train()
    torch.manual_seed(7)
    with EventStorage(0):
        return heads(None, features, [p[:] for p in proposals], targets)


@pytest.mark.parametrize("num_classes,cls_agnostic_mask", [(1, False), (3, False), (3, True)])
def test_nuclei_roi_heads_losses_equal_standard_roi_heads(num_classes, cls_agnostic_mask):
    standard, features, proposals, targets = _roi_heads_and_inputs("StandardROIHeads", num_classes, cls_agnostic_mask)
    nuclei, *_ = _roi_heads_and_inputs("NucleiROIHeads", num_classes, cls_agnostic_mask)
    nuclei.load_state_dict(standard.state_dict())
    _, expected = _run_heads(standard, features, proposals, targets)
    _, losses = _run_heads(nuclei, features, proposals, targets)
    assert set(losses) == set(expected) == {"loss_cls", "loss_box_reg", "loss_mask"}
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name])


@pytest.mark.parametrize("num_classes,cls_agnostic_mask", [(1, False), (3, False), (3, True)])
def test_nuclei_roi_heads_inference_equals_standard_roi_heads(num_classes, cls_agnostic_mask):
    """Eval mode, same weights, features and proposals: the detections (pred_boxes, scores, pred_classes)
    and pred_masks are identical, bit for bit. pred_masks is what both heads give at this level:
    mask_rcnn_inference's (R, 1, M, M) probabilities of each detection's predicted class; NucleiRCNN only
    renames it pred_mask_probs later, in its post-processing (compact_detector_postprocess)."""
    standard, features, proposals, _ = _roi_heads_and_inputs("StandardROIHeads", num_classes, cls_agnostic_mask)
    nuclei, *_ = _roi_heads_and_inputs("NucleiROIHeads", num_classes, cls_agnostic_mask)
    # Larger than the default init, so that detections, classes and per-class masks clearly differ.
    for layer in (standard.box_predictor.cls_score, standard.box_predictor.bbox_pred, standard.mask_head.predictor):
        torch.nn.init.normal_(layer.weight, std=0.5)
    nuclei.load_state_dict(standard.state_dict())
    outputs = {}
    for name, heads in (("standard", standard), ("nuclei", nuclei)):
        heads.eval()
        with torch.no_grad():
            outputs[name] = heads(None, features, [p[:] for p in proposals])
    (expected, expected_losses), (results, losses) = outputs["standard"], outputs["nuclei"]
    assert losses == expected_losses == {}
    assert len(results) == len(expected) == 2
    fields = {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    for result, reference in zip(results, expected):
        assert set(result.get_fields()) == set(reference.get_fields()) == fields
        assert len(reference) > 0 and result.image_size == reference.image_size
        assert torch.equal(result.pred_boxes.tensor, reference.pred_boxes.tensor)
        assert torch.equal(result.scores, reference.scores)
        assert torch.equal(result.pred_classes, reference.pred_classes)
        assert result.pred_masks.shape == (len(reference), 1, 28, 28)
        assert torch.equal(result.pred_masks, reference.pred_masks)
    classes = torch.cat([r.pred_classes for r in expected])
    assert len(classes.unique()) == num_classes  # with 3 classes, every class's path is compared
    masks = torch.cat([r.pred_masks for r in expected])
    assert masks.min() < 0.2 and masks.max() > 0.8  # not the flat 0.5 of an untrained predictor


@pytest.mark.parametrize("num_classes,cls_agnostic_mask", [(1, False), (3, False), (3, True)])
def test_nuclei_roi_heads_expose_positive_mask_logits_and_regressed_boxes(num_classes, cls_agnostic_mask):
    heads, features, proposals, targets = _roi_heads_and_inputs("NucleiROIHeads", num_classes, cls_agnostic_mask)
    # Larger than the default init, so that classes' scores and boxes clearly differ.
    torch.nn.init.normal_(heads.box_predictor.cls_score.weight, std=0.5)
    torch.nn.init.normal_(heads.box_predictor.bbox_pred.weight, std=0.5)
    box_outputs, mask_outputs = [], []
    heads.box_predictor.register_forward_hook(lambda m, i, output: box_outputs.append(output))
    heads.mask_head.predictor.register_forward_hook(lambda m, i, output: mask_outputs.append(output))
    box_pooler_inputs = []
    heads.box_pooler.register_forward_hook(lambda m, inputs, o: box_pooler_inputs.append(inputs[1]))
    positive_rois, losses = _run_heads(heads, features, proposals, targets)

    assert len(mask_outputs) == 1  # the mask head ran once, for the loss and the logits
    full_logits = mask_outputs[0]
    assert len(positive_rois) == 2 and sum(len(r) for r in positive_rois) == len(full_logits) > 0
    mask_logits = torch.cat([r.mask_logits for r in positive_rois])
    gt_classes = torch.cat([r.gt_classes for r in positive_rois])
    assert torch.all((gt_classes >= 0) & (gt_classes < num_classes))
    expected = full_logits[:, 0] if cls_agnostic_mask else full_logits[torch.arange(len(full_logits)), gt_classes]
    torch.testing.assert_close(mask_logits, expected)
    assert mask_logits.shape[1:] == (28, 28) and mask_logits.requires_grad

    # Boxes: regressed from each positive proposal for its highest-scoring foreground class.
    # Each image's sampled proposals put the foreground first, so the positives are the first
    # rows of each image's block in the box predictor's outputs.
    scores, deltas = box_outputs[0]
    sampled_per_image = box_pooler_inputs[0]
    block_starts = [0, len(sampled_per_image[0])]
    rows = torch.cat([start + torch.arange(len(r)) for r, start in zip(positive_rois, block_starts)])
    proposal_boxes = torch.cat([r.proposal_boxes.tensor for r in positive_rois])
    torch.testing.assert_close(proposal_boxes, torch.cat([b.tensor for b in sampled_per_image])[rows])
    regressed = heads.box_predictor.box2box_transform.apply_deltas(deltas[rows], proposal_boxes)
    classes = scores[rows, :-1].argmax(dim=1)
    if num_classes > 1:
        regressed = regressed.view(len(rows), num_classes, 4)[torch.arange(len(rows)), classes]
    pred_boxes = torch.cat([r.pred_boxes.tensor for r in positive_rois])
    assert not pred_boxes.requires_grad
    torch.testing.assert_close(pred_boxes, regressed)
    torch.testing.assert_close(torch.cat([r.pred_classes for r in positive_rois]), classes)


def test_regressed_boxes_of_an_image_without_proposals_with_class_specific_regression():
    heads, *_ = _roi_heads_and_inputs("NucleiROIHeads", num_classes=3)
    generator = torch.Generator().manual_seed(1)
    filled = Instances((64, 64), proposal_boxes=Boxes(torch.tensor([[4.0, 4.0, 20.0, 24.0]])))
    empty = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(0, 4)))
    scores = torch.randn(1, 4, generator=generator)  # 3 classes + background
    deltas = torch.randn(1, 12, generator=generator) * 0.1  # class-specific: 3 x 4
    heads._set_regressed_boxes((scores, deltas), [empty, filled])
    assert empty.pred_boxes.tensor.shape == (0, 4) and empty.pred_classes.shape == (0,)
    best = int(scores[0, :3].argmax())
    expected = heads.box_predictor.box2box_transform.apply_deltas(deltas, filled.proposal_boxes.tensor)
    torch.testing.assert_close(filled.pred_boxes.tensor, expected[:, 4 * best:4 * best + 4])


@pytest.mark.slow
def test_proposed_model_fits_a_fixed_batch_and_every_learned_loss_falls():
    """The demo's proposed model (Table 1 head, fusion, GCN branch) trained on one fixed batch:
    each loss term, measured on that batch with the same proposal sampling before and after,
    falls. (The end-to-end train_net test logs only 20-iteration medians.)"""
    from nucseg_d2.config import build_nuclei_cfg

    cfg = build_nuclei_cfg(REPO / "configs" / "demo.yaml", ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [synthetic_training_input(seed, 128, 128) for seed in (3, 4)]

    def losses_on_the_batch():
        torch.manual_seed(1)  # the same RPN/ROI sampling each time
        with torch.no_grad(), EventStorage():
            return {name: float(value) for name, value in model(batch).items()}

    before = losses_on_the_batch()
    assert set(before) == SEVEN_LOSSES
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(20):
        torch.manual_seed(100 + step)
        with EventStorage():
            loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = losses_on_the_batch()
    assert sum(after.values()) < 0.75 * sum(before.values()), (before, after)
    for name in ("loss_rpn_cls", "loss_cls", "loss_mask", "loss_sem_seg", "loss_fusion"):
        assert after[name] < before[name], (name, before[name], after[name])
