"""Dual-modal mask head: the paper's mask generator (Sec. 3.1, Fig. 4, Table 1) for Detectron2.

Wiring, on RoIAligned features of C_in x R x R (normally 256 x 14 x 14), with S = 2R::

    input -> Conv x 3 (3x3, 256) -> Conv1 (3x3, 256)              = shared features
    FC path:   Conv2 (3x3, 128) -> FC (-> S*S)
               -> Reshape1: 1 x S x S, duplicated to the K mask channels
    conv path: Conv3 (3x3, 256) -> Conv4 (3x3, 1024) -> Reshape2: pixel shuffle x2 (256 x S x S)
               -> Conv5 (1x1, -> K)
    output = FC path + conv path (pixel-wise sum), K x S x S mask logits

Choices and differences, all deliberate:

* Both paths start from Conv1's output: the shared trunk is Conv x 3 -> Conv1, the FC path
  begins at Conv2 and the conv path at Conv3. Table 1 lists Conv1 right after Conv x 3 without
  saying where the paths fork; we follow the issue's specification ("conv x 3 -> Conv1; FC
  path: Conv2 ...; conv path: Conv3 ..."). The other reading, as in PANet's fused mask head
  [Liu et al. 2018b], forks after Conv x 3 and puts Conv1 at the start of the FC path; it is not
  implemented. Conv4 + pixel shuffle is the dense upsampling convolution of
  [Wang et al. 2018], in place of a deconv.
* The authors' released code used 4 shared convs and reused one conv in the conv path instead
  of a separate Conv3. Our trunk (Conv x 3 -> Conv1) is also four convs deep, but the conv path
  has its own Conv3, as in Table 1.
* The released code put a ReLU after the FC; we do not: FC and Conv5 both produce logits that
  are summed, and with one logit per class a ReLU would let the FC path only ever raise it.
* K = Detectron2's mask channels (one logit per foreground class, or 1 if class-agnostic)
  instead of the paper's 2 (background + nucleus), so the head drops into any Mask R-CNN and
  ``mask_rcnn_loss`` / ``mask_rcnn_inference`` apply unchanged. Reshape1's "channel
  duplication" therefore copies the FC's single S x S map to all K channels.
* Every conv block is conv -> norm (ROI_MASK_HEAD.NORM, GN in our configs; the paper trained
  without BatchNorm) -> ReLU, as in Detectron2's heads (the paper omits ReLUs in its figures).
* The FC output size follows the pooler resolution: (2R)^2 = 784 for R = 14.

Conv4 (256 -> 1024 at R x R) costs about as much as the stock head's four convs together;
``shuffle_conv_dim`` (DUAL_MODAL.SHUFFLE_CONV_DIM) can shrink it, e.g. 256 (64 x S x S after the
shuffle), as a cheaper, non-paper variant. See docs/MODEL.md for measured costs.
"""
import fvcore.nn.weight_init as weight_init
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead

__all__ = ["DualModalMaskHead"]

# Reshape2 is a pixel shuffle that doubles the RoI side, like the deconv of the stock head.
UPSCALE = 2


class ZeroBatchSafePixelShuffle(nn.PixelShuffle):
    """``nn.PixelShuffle`` whose backward also works for zero RoIs (an image without nuclei).

    torch's pixel_shuffle backward fails on an empty batch; the same rearrangement written as
    reshape + permute has a well-defined (empty) gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            return super().forward(x)
        n, c, h, w = x.shape
        r = self.upscale_factor
        x = x.reshape(n, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // (r * r), h * r, w * r)


@ROI_MASK_HEAD_REGISTRY.register()
class DualModalMaskHead(BaseMaskRCNNHead):
    """Mask head summing an FC path and a pixel-shuffle conv path (paper Table 1).

    ``layers(x)`` maps (N, C_in, R, R) RoI features to (N, K, 2R, 2R) mask logits.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dim: int = 256,
        num_shared_conv: int = 3,
        fc_conv_dim: int = 128,
        shuffle_conv_dim: int = 1024,
        conv_norm="",
        **kwargs,
    ):
        """
        Args:
            input_shape: channels, height and width of the RoI features (height == width).
            num_classes: mask channels K: foreground classes, or 1 for class-agnostic masks.
            conv_dim: width of the shared convs, Conv1 and Conv3 (Table 1: 256).
            num_shared_conv: number of 3x3 convs before Conv1 (Table 1: 3); Conv1 is always
                added after them and is shared as well.
            fc_conv_dim: width of Conv2, the conv before the FC (Table 1: 128).
            shuffle_conv_dim: width of Conv4, pixel-shuffled to shuffle_conv_dim / 4 channels
                (Table 1: 1024).
            conv_norm: norm after each conv, see :func:`detectron2.layers.get_norm`.
            kwargs: ``loss_weight`` and ``vis_period`` of :class:`BaseMaskRCNNHead`.
        """
        super().__init__(**kwargs)
        if input_shape.height is None or input_shape.height != input_shape.width:
            raise ValueError(f"DualModalMaskHead needs square RoI features of known size, got {input_shape}")
        if shuffle_conv_dim % (UPSCALE * UPSCALE) != 0:
            raise ValueError(
                f"shuffle_conv_dim must be divisible by {UPSCALE * UPSCALE}, got {shuffle_conv_dim}"
            )
        if num_shared_conv < 0:
            raise ValueError(f"num_shared_conv must be >= 0, got {num_shared_conv}")
        self.num_mask_channels = num_classes
        self.mask_side = input_shape.height * UPSCALE

        def conv_block(in_channels, out_channels):
            return Conv2d(
                in_channels,
                out_channels,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=not conv_norm,
                norm=get_norm(conv_norm, out_channels),
                activation=nn.ReLU(),
            )

        # Shared trunk: Conv x 3, named like MaskRCNNConvUpsampleHead's convs so that a baseline
        # checkpoint initialises them (its mask_fcn4, deconv and predictor are left unused), then
        # Conv1, whose output both paths start from.
        self.shared_convs = []
        channels = input_shape.channels
        for k in range(num_shared_conv):
            conv = conv_block(channels, conv_dim)
            self.add_module(f"mask_fcn{k + 1}", conv)
            self.shared_convs.append(conv)
            channels = conv_dim
        self.conv1 = conv_block(channels, conv_dim)

        # FC path: global view of the whole RoI, one S x S map.
        self.conv2 = conv_block(conv_dim, fc_conv_dim)
        self.fc = nn.Linear(fc_conv_dim * input_shape.height * input_shape.width, self.mask_side**2)

        # Conv path: local detail, upsampled by rearranging channels rather than a deconv.
        self.conv3 = conv_block(conv_dim, conv_dim)
        self.conv4 = conv_block(conv_dim, shuffle_conv_dim)
        self.pixel_shuffle = ZeroBatchSafePixelShuffle(UPSCALE)
        self.conv5 = Conv2d(shuffle_conv_dim // (UPSCALE * UPSCALE), num_classes, kernel_size=1)

        for conv in self.shared_convs + [self.conv1, self.conv2, self.conv3, self.conv4]:
            weight_init.c2_msra_fill(conv)
        # FC and Conv5 predict logits: small normal init as Detectron2's mask predictor.
        for predictor in (self.fc, self.conv5):
            nn.init.normal_(predictor.weight, std=0.001)
            nn.init.constant_(predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mask_head_cfg = cfg.MODEL.ROI_MASK_HEAD
        ret.update(
            input_shape=input_shape,
            num_classes=1 if mask_head_cfg.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=mask_head_cfg.CONV_DIM,
            conv_norm=mask_head_cfg.NORM,
        )
        # A stock Detectron2 config without add_nucseg_config() gets Table 1's defaults.
        dual_modal_cfg = mask_head_cfg.get("DUAL_MODAL")
        if dual_modal_cfg is not None:
            ret.update(
                num_shared_conv=dual_modal_cfg.NUM_SHARED_CONV,
                fc_conv_dim=dual_modal_cfg.FC_CONV_DIM,
                shuffle_conv_dim=dual_modal_cfg.SHUFFLE_CONV_DIM,
            )
        return ret

    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv x 3 -> Conv1: features both paths start from."""
        for conv in self.shared_convs:
            x = conv(x)
        return self.conv1(x)

    def fc_path(self, shared: torch.Tensor) -> torch.Tensor:
        """Conv2 -> FC -> Reshape1; (N, K, S, S) logits, equal in all K channels."""
        x = self.conv2(shared)
        x = self.fc(x.flatten(start_dim=1))
        x = x.view(-1, 1, self.mask_side, self.mask_side)
        return x.expand(-1, self.num_mask_channels, -1, -1)

    def conv_path(self, shared: torch.Tensor) -> torch.Tensor:
        """Conv3 -> Conv4 -> pixel shuffle (Reshape2) -> Conv5; (N, K, S, S) logits."""
        x = self.conv4(self.conv3(shared))
        return self.conv5(self.pixel_shuffle(x))

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, K, 2R, 2R): pixel-wise sum of the two paths."""
        shared = self.shared_features(x)
        return self.fc_path(shared) + self.conv_path(shared)
