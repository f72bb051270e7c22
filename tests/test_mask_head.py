"""DualModalMaskHead: Table 1 layer by layer, both paths live, and use inside stock Detectron2."""
import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    build_mask_head,
)
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from nucseg_d2.config import add_nucseg_config
from nucseg_d2.modeling import DualModalMaskHead

ROI_FEATURES = ShapeSpec(channels=256, height=14, width=14)


def _mask_head_cfg(num_classes=1, cls_agnostic=False):
    cfg = get_cfg()
    add_nucseg_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_MASK_HEAD.NAME = "DualModalMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = cls_agnostic
    return cfg


def _build_head(num_classes=1, cls_agnostic=False, **cfg_overrides):
    cfg = _mask_head_cfg(num_classes, cls_agnostic)
    cfg.merge_from_list([item for kv in cfg_overrides.items() for item in kv])
    torch.manual_seed(0)
    return build_mask_head(cfg, ROI_FEATURES)


def _make_predictors_visible(head):
    """Replace the 0.001-std logit layers' init so each path's share of the output is large."""
    torch.manual_seed(1)
    for layer in (head.fc, head.conv5):
        nn.init.normal_(layer.weight, std=0.05)
        nn.init.normal_(layer.bias, std=0.5)


def test_registered_and_built_from_config():
    head = _build_head()
    assert ROI_MASK_HEAD_REGISTRY.get("DualModalMaskHead") is DualModalMaskHead
    assert isinstance(head, DualModalMaskHead)


def test_table1_shapes_layer_by_layer():
    head = _build_head(num_classes=3)
    outputs = {}
    hooked = ["mask_fcn3", "conv1", "conv2", "fc", "conv3", "conv4", "pixel_shuffle", "conv5"]
    for name in hooked:
        getattr(head, name).register_forward_hook(
            lambda module, inputs, output, name=name: outputs.__setitem__(name, output)
        )
    x = torch.randn(5, 256, 14, 14)
    logits = head.layers(x)

    assert len(head.shared_convs) == 3  # "Conv x 3"
    assert outputs["mask_fcn3"].shape == (5, 256, 14, 14)
    assert outputs["conv1"].shape == (5, 256, 14, 14)
    assert outputs["conv2"].shape == (5, 128, 14, 14)
    assert outputs["fc"].shape == (5, 784)
    assert outputs["conv3"].shape == (5, 256, 14, 14)
    assert outputs["conv4"].shape == (5, 1024, 14, 14)
    assert outputs["pixel_shuffle"].shape == (5, 256, 28, 28)  # Reshape2
    assert outputs["conv5"].shape == (5, 3, 28, 28)
    assert logits.shape == (5, 3, 28, 28)

    # Reshape1: the FC's 784 values become one 28x28 map, duplicated to every mask channel.
    fc_logits = head.fc_path(head.shared_features(x))
    assert fc_logits.shape == (5, 3, 28, 28)
    expected_map = outputs["fc"].view(5, 28, 28)
    for channel in range(3):
        torch.testing.assert_close(fc_logits[:, channel], expected_map)

    # Table 1 hyper-parameters: 3x3 / stride 1 / pad 1 convs, a 1x1 Conv5, GN + ReLU after each
    # conv block, and no activation on the logit layers.
    for conv in head.shared_convs + [head.conv1, head.conv2, head.conv3, head.conv4]:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        assert isinstance(conv.norm, nn.GroupNorm) and isinstance(conv.activation, nn.ReLU)
    assert head.conv5.kernel_size == (1, 1) and head.conv5.padding == (0, 0)
    assert head.conv5.activation is None and head.conv5.norm is None
    assert head.fc.in_features == 128 * 14 * 14
    assert (logits < 0).any()  # logits, not ReLU outputs


def test_paths_fork_after_conv1():
    """Issue wiring: Conv x 3 -> Conv1 is shared; the FC path starts at Conv2, the conv path at Conv3.

    Changing Conv1 changes both paths; changing Conv2 leaves the conv path unchanged; changing
    Conv3 leaves the FC path unchanged.
    """
    head = _build_head()
    _make_predictors_visible(head)
    x = torch.randn(2, 256, 14, 14)

    def paths():
        with torch.no_grad():
            shared = head.shared_features(x)
            return head.fc_path(shared), head.conv_path(shared)

    fc_before, conv_before = paths()
    saved = {name: p.clone() for name, p in head.state_dict().items()}

    with torch.no_grad():
        head.conv1.weight.mul_(-1.0)
    fc_after, conv_after = paths()
    assert not torch.allclose(fc_after, fc_before)
    assert not torch.allclose(conv_after, conv_before)
    head.load_state_dict(saved)

    with torch.no_grad():
        head.conv2.weight.mul_(-1.0)
    fc_after, conv_after = paths()
    assert not torch.allclose(fc_after, fc_before)
    torch.testing.assert_close(conv_after, conv_before)
    head.load_state_dict(saved)

    with torch.no_grad():
        head.conv3.weight.mul_(-1.0)
    fc_after, conv_after = paths()
    torch.testing.assert_close(fc_after, fc_before)
    assert not torch.allclose(conv_after, conv_before)

    # shared_features ends at Conv1, whose input is the third shared conv's output.
    inputs = {}
    head.conv1.register_forward_hook(lambda module, args, output: inputs.__setitem__("conv1", args[0]))
    with torch.no_grad():
        shared = head.shared_features(x)
        expected = x
        for conv in head.shared_convs:
            expected = conv(expected)
    torch.testing.assert_close(inputs["conv1"], expected)
    torch.testing.assert_close(shared, head.conv1(expected))


def test_each_path_alone_changes_output():
    head = _build_head(num_classes=2)
    _make_predictors_visible(head)
    x = torch.randn(4, 256, 14, 14)
    with torch.no_grad():
        shared = head.shared_features(x)
        fc_alone, conv_alone = head.fc_path(shared), head.conv_path(shared)
        both = head.layers(x)
        torch.testing.assert_close(both, fc_alone + conv_alone)

        saved = {name: p.clone() for name, p in head.named_parameters()}
        head.conv5.weight.zero_()
        head.conv5.bias.zero_()
        only_fc = head.layers(x)
        head.load_state_dict(saved, strict=False)
        head.fc.weight.zero_()
        head.fc.bias.zero_()
        only_conv = head.layers(x)

    torch.testing.assert_close(only_fc, fc_alone)
    torch.testing.assert_close(only_conv, conv_alone)
    # Each path's contribution is far above float noise: removing either changes the masks.
    assert (both - only_fc).abs().mean() > 0.1
    assert (both - only_conv).abs().mean() > 0.1
    assert ((both > 0) != (only_fc > 0)).any() and ((both > 0) != (only_conv > 0)).any()


@pytest.mark.parametrize("num_classes, cls_agnostic, channels", [(1, False, 1), (3, False, 3), (3, True, 1)])
def test_mask_channels_follow_classes(num_classes, cls_agnostic, channels):
    head = _build_head(num_classes=num_classes, cls_agnostic=cls_agnostic)
    _make_predictors_visible(head)
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        logits = head.layers(x)
        conv_logits = head.conv_path(head.shared_features(x))
    assert logits.shape == (2, channels, 28, 28)
    assert head.conv5.out_channels == channels
    # The FC path adds the same map to every class channel.
    fc_share = logits - conv_logits
    for channel in range(1, channels):
        torch.testing.assert_close(fc_share[:, channel], fc_share[:, 0])


def _training_instances(num_rois, image_size=64, num_classes=1):
    """Positive RoIs of one image: proposal boxes, gt classes and a disc gt mask per RoI."""
    generator = torch.Generator().manual_seed(2)
    corners = torch.rand(num_rois, 2, generator=generator) * (image_size - 24)
    sides = 8 + torch.rand(num_rois, 2, generator=generator) * 16
    boxes = torch.cat([corners, corners + sides], dim=1)
    ys, xs = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    radii = sides.min(dim=1).values / 2
    masks = (xs[None] - centres[:, 0, None, None]) ** 2 + (ys[None] - centres[:, 1, None, None]) ** 2
    masks = masks <= radii[:, None, None] ** 2
    instances = Instances((image_size, image_size))
    instances.proposal_boxes = Boxes(boxes)
    instances.gt_classes = torch.randint(num_classes, (num_rois,), generator=generator)
    instances.gt_masks = BitMasks(masks)
    return instances


@pytest.mark.parametrize("num_classes", [1, 3])
def test_mask_loss_gradients_reach_both_paths(num_classes):
    head = _build_head(num_classes=num_classes, VIS_PERIOD=1)
    head.train()
    instances = [_training_instances(n, num_classes=num_classes) for n in (6, 3)]
    x = torch.randn(9, 256, 14, 14)
    with EventStorage() as storage:
        losses = head(x, instances)  # BaseMaskRCNNHead.forward -> mask_rcnn_loss
        assert set(losses) == {"loss_mask"}
        assert torch.isfinite(losses["loss_mask"])
        losses["loss_mask"].backward()
        assert len(storage._vis_data) == 9  # vis_period is honoured: one image per RoI
    for name in ["mask_fcn1", "conv1", "conv2", "fc", "conv3", "conv4", "conv5"]:
        grad = getattr(head, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_inference_attaches_pred_masks():
    head = _build_head(num_classes=3)
    head.eval()
    instances = Instances((64, 64))
    instances.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0]]))
    instances.pred_classes = torch.tensor([2, 0])
    features = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        (out,) = head(features, [instances])
        logits = head.layers(features)
    assert out.pred_masks.shape == (2, 1, 28, 28)
    # Each ROI gets the probabilities of its own predicted class's channel.
    expected = logits[torch.arange(2), torch.tensor([2, 0])].sigmoid()[:, None]
    torch.testing.assert_close(out.pred_masks, expected)
    assert not torch.allclose(out.pred_masks[0], logits[0, 0].sigmoid()[None])


def test_empty_batch_of_rois():
    head = _build_head()
    assert head.layers(torch.zeros(0, 256, 14, 14)).shape == (0, 1, 28, 28)


def test_dual_modal_config_keys_are_honoured():
    head = _build_head(**{
        "MODEL.ROI_MASK_HEAD.DUAL_MODAL.NUM_SHARED_CONV": 2,
        "MODEL.ROI_MASK_HEAD.DUAL_MODAL.FC_CONV_DIM": 64,
        "MODEL.ROI_MASK_HEAD.DUAL_MODAL.SHUFFLE_CONV_DIM": 256,
    })
    assert len(head.shared_convs) == 2 and not hasattr(head, "mask_fcn3")
    assert head.conv2.out_channels == 64 and head.fc.in_features == 64 * 14 * 14
    assert head.conv4.out_channels == 256 and head.conv5.in_channels == 64
    assert head.layers(torch.randn(2, 256, 14, 14)).shape == (2, 1, 28, 28)


def test_fc_size_and_input_channels_follow_input_shape():
    cfg = _mask_head_cfg()
    head = build_mask_head(cfg, ShapeSpec(channels=64, height=7, width=7))
    assert head.mask_fcn1.in_channels == 64
    assert head.fc.out_features == 14 * 14
    assert head.layers(torch.randn(2, 64, 7, 7)).shape == (2, 1, 14, 14)


def test_rejects_unusable_shapes():
    with pytest.raises(ValueError, match="square"):
        DualModalMaskHead(ShapeSpec(channels=256, height=14, width=12), num_classes=1)
    with pytest.raises(ValueError, match="divisible"):
        DualModalMaskHead(ROI_FEATURES, num_classes=1, shuffle_conv_dim=1022)


def test_baseline_mask_head_checkpoint_initialises_shared_convs():
    """Detectron2's head's mask_fcn1-3 load into the shared convs with matching shapes."""
    cfg = _mask_head_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4  # as in our baseline configs (Detectron2's default is 0)
    baseline = build_mask_head(cfg, ROI_FEATURES)
    assert isinstance(baseline, MaskRCNNConvUpsampleHead)
    dual = _build_head()
    result = dual.load_state_dict(baseline.state_dict(), strict=False)
    assert {key.split(".")[0] for key in result.unexpected_keys} == {"mask_fcn4", "deconv", "predictor"}
    missing = {key.split(".")[0] for key in result.missing_keys}
    assert missing == {"conv1", "conv2", "fc", "conv3", "conv4", "conv5"}
    torch.testing.assert_close(dual.mask_fcn3.weight, baseline.mask_fcn3.weight)


def _stock_mask_rcnn_cfg():
    """A small ResNet-18 GN Mask R-CNN, built from Detectron2's own defaults only."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.MASK_ON", True,
        "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", "GN",
        "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.NORM", "GN",
        "MODEL.FPN.OUT_CHANNELS", 64,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_HEADS.NUM_CLASSES", 1,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "TEST.DETECTIONS_PER_IMAGE", 16,
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.NAME", "DualModalMaskHead",
        "MODEL.ROI_MASK_HEAD.NORM", "GN",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14,
    ])
    return cfg


def test_inside_stock_generalized_rcnn():
    torch.manual_seed(0)
    model = build_model(_stock_mask_rcnn_cfg())  # no add_nucseg_config: Table 1 defaults
    mask_head = model.roi_heads.mask_head
    assert type(model).__name__ == "GeneralizedRCNN"
    assert isinstance(mask_head, DualModalMaskHead)
    assert mask_head.mask_fcn1.in_channels == 64  # from the FPN, via input_shape
    assert mask_head.conv4.out_channels == 1024

    image_size = 64
    instances = _training_instances(4, image_size=image_size)
    gt = Instances((image_size, image_size))
    gt.gt_boxes = instances.proposal_boxes.clone()
    gt.gt_classes = torch.zeros(4, dtype=torch.int64)
    gt.gt_masks = instances.gt_masks
    image = torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8)
    batch = [{"image": image, "instances": gt, "height": image_size, "width": image_size}]

    model.train()
    with EventStorage():
        losses = model(batch)
        assert torch.isfinite(losses["loss_mask"])
        sum(losses.values()).backward()
    assert mask_head.fc.weight.grad.abs().sum() > 0
    assert mask_head.conv5.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": image_size, "width": image_size}])
    predictions = output["instances"]
    assert len(predictions) > 0
    assert predictions.pred_masks.shape == (len(predictions), image_size, image_size)


def test_zero_rois_forward_and_backward():
    """An image without nuclei sends no RoI through the head; training must still step."""
    from nucseg_d2.modeling.mask_head import ZeroBatchSafePixelShuffle

    shuffle = ZeroBatchSafePixelShuffle(2)
    x = torch.randn(3, 8, 5, 5)
    assert torch.equal(shuffle(x), torch.nn.functional.pixel_shuffle(x, 2))
    empty = torch.zeros(0, 8, 5, 5, requires_grad=True)
    out = shuffle(empty)
    assert out.shape == (0, 2, 10, 10)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
