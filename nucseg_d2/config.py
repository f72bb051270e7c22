"""Config keys added by nucseg-d2. Call ``add_nucseg_config(cfg)`` on a fresh ``get_cfg()``."""
import math
import os
import re

import yaml

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

# The nuclei metrics reported unless told otherwise (names from nucseg_d2.evaluation.metrics).
DEFAULT_METRICS = ("aji", "aji_plus", "paper_aji", "dice1", "pq")


def add_nucseg_config(cfg):
    """Add every nucseg-d2 key, with its default, to ``cfg`` (a copy of Detectron2's defaults)."""
    _C = cfg

    # ---------------------------------------------------------------- input / augmentation
    # Nuclei smaller than this many pixels, whole (1-3 px specks in TNBC's labels) or cut by a
    # crop, become background in both the instance targets and sem_seg, so the two never disagree.
    _C.INPUT.MIN_FRAGMENT_AREA = 8
    # Nuclei images are analysed at their native magnification: no test-time resize (Detectron2's
    # default, 800, would rescale every image). A positive value resizes the shortest edge to it
    # in evaluation and prediction alike.
    _C.INPUT.MIN_SIZE_TEST = 0
    _C.INPUT.AUG = CN()
    _C.INPUT.AUG.HFLIP = True  # random horizontal flip (p = 0.5)
    _C.INPUT.AUG.VFLIP = True  # random vertical flip (p = 0.5)
    _C.INPUT.AUG.ROT90 = True  # random rotation by 0/90/180/270 degrees
    # Probability of resizing the whole image (before the crop) by a factor drawn log-uniformly from
    # SCALE_RANGE: nuclei at other sizes than the scanner's. Off by default (the paper does not).
    _C.INPUT.AUG.SCALE_PROB = 0.0
    _C.INPUT.AUG.SCALE_RANGE = (0.8, 1.25)  # (low, high) resize factors, 0.25 <= low <= high <= 4
    _C.INPUT.AUG.GAUSSIAN_BLUR_PROB = 0.0  # probability of a Gaussian blur
    _C.INPUT.AUG.GAUSSIAN_BLUR_SIGMA = (0.5, 1.5)  # blur sigma range in pixels
    _C.INPUT.AUG.GAUSSIAN_NOISE_PROB = 0.0  # probability of additive Gaussian noise
    _C.INPUT.AUG.GAUSSIAN_NOISE_STD = (2.0, 10.0)  # noise std range, in 0-255 intensity units
    _C.INPUT.AUG.EMBOSS_PROB = 0.0  # probability of an emboss filter
    _C.INPUT.AUG.EMBOSS_STRENGTH = (0.2, 0.5)  # blend weight of the embossed image
    _C.INPUT.AUG.SHARPEN_PROB = 0.0  # probability of a sharpen filter
    _C.INPUT.AUG.SHARPEN_STRENGTH = (0.2, 0.5)  # blend weight of the sharpened image
    _C.INPUT.AUG.CHANNEL_SHUFFLE_PROB = 0.0  # probability of a random RGB channel permutation
    _C.INPUT.AUG.STAIN_JITTER_PROB = 0.0  # probability of H&E stain jitter in HED space
    _C.INPUT.AUG.STAIN_JITTER_SCALE = 0.05  # HED channel scale ~ U(1 - s, 1 + s)
    _C.INPUT.AUG.STAIN_JITTER_SHIFT = 0.01  # HED channel shift ~ U(-s, s)

    # ---------------------------------------------------------------- data sets
    # Number of folds for the k-fold-by-patient TNBC data sets (tnbc_cv{K}_fold{i}_train/_test);
    # train_net.py registers them for this K (K = 5 is registered on import).
    _C.DATASETS.TNBC_NUM_FOLDS = 5
    # The user's own data sets, registered by train_net.py (nucseg_d2.data.register_config_datasets)
    # before DATASETS.TRAIN / TEST are read: a list of [name, image_dir, label_dir] or
    # [name, image_dir, label_dir, label_format] (label_format as register_nuclei_folder takes it).
    # Relative folders are read from the working directory; train_net.py saves them absolute.
    _C.DATASETS.NUCLEI_FOLDERS = []

    # ---------------------------------------------------------------- training
    _C.SOLVER.NUCLEI = CN()
    # Seconds of training after which the run stops early, saves model_<iteration> (model_final is
    # kept for a finished schedule) and evaluates it (nucseg_d2.engine.TrainingTimeLimit); 0 = train
    # the whole schedule. For commands with a hard wall-clock limit (the GPU device's 10 minutes);
    # the log names where it stopped.
    _C.SOLVER.NUCLEI.TIME_LIMIT_S = 0  # whole seconds

    # ---------------------------------------------------------------- post-processing
    # Instances -> label map, shared by evaluator and predictor (defaults of the paper's code).
    _C.TEST.NUCLEI = CN()
    # Keep detections scoring above this. Only those above MODEL.ROI_HEADS.SCORE_THRESH_TEST (0.05)
    # exist, so any value up to that keeps them all.
    _C.TEST.NUCLEI.SCORE_THRESH = 0.5
    _C.TEST.NUCLEI.MASK_THRESH = 0.5  # mask probabilities above this are foreground; in (0, 1)
    # Drop a mask more than this fraction covered by higher-scoring masks; else keep its free part.
    _C.TEST.NUCLEI.MAX_OVERLAP = 0.7
    # Metrics the NucleiEvaluator reports (names from nucseg_d2.evaluation.metrics).
    _C.TEST.NUCLEI.METRICS = list(DEFAULT_METRICS)
    # Also run Detectron2's COCOEvaluator (mask AP) beside the nuclei metrics.
    _C.TEST.NUCLEI.COCO_AP = False
    # µm per pixel of the training images (TNBC and Kumar are 40x scans, about 0.25). nucseg-predict
    # warns when an input's recorded resolution lies more than 10 % from it and --mpp is not given:
    # nuclei at another scale than trained on are found worse, silently. 0: unknown, no warning.
    _C.TEST.NUCLEI.TRAINING_MPP = 0.25

    # ---------------------------------------------------------------- model
    _C.MODEL.NUCSEG = CN()
    # Return full-image pred_masks at inference (for COCOEvaluator/Visualizer) instead of compact
    # box-relative pred_mask_probs; costs H*W bytes per detection.
    _C.MODEL.NUCSEG.PASTE_FULL_MASKS = False
    # Feature fusion (paper Sec. 3.1): paste positive-ROI mask logits into a 2-channel map made
    # from P2 and train it with a second semantic loss (L_semseg2). Training only.
    _C.MODEL.NUCSEG.FUSION_ON = False
    _C.MODEL.NUCSEG.FUSION_IN_FEATURE = "p2"  # FPN level the fused map is made from
    # Where each ROI's mask logits are pasted in training: "predicted", its regressed box (paper
    # Eq. 1), or "proposal", the box the logits were pooled from and loss_mask scores them in.
    # The two differ by the box regression (several pixels early in training, see docs/MODEL.md).
    _C.MODEL.NUCSEG.FUSION_BOXES = "predicted"
    # Auxiliary semantic branch (paper Sec. 3.2) built from MODEL.SEM_SEG_HEAD (L_semseg1).
    _C.MODEL.NUCSEG.SEMANTIC_ON = False
    # Also return the semantic branch's map at inference (visualisation only; costs a forward).
    _C.MODEL.NUCSEG.RETURN_SEMANTIC = False
    # Weights of the seven terms of the total loss (paper Eq. 4; all 1 in the paper).
    _C.MODEL.NUCSEG.LOSS_WEIGHTS = CN()
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.RPN_CLS = 1.0  # L_rpn-obj
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.RPN_LOC = 1.0  # L_rpn-reg
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.CLS = 1.0  # L_det-cls
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.BOX_REG = 1.0  # L_det-reg
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.MASK = 1.0  # L_det-mask
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG1 = 1.0  # semantic branch
    _C.MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG2 = 1.0  # feature fusion

    # Dual-modal mask head (paper Table 1), used with ROI_MASK_HEAD.NAME "DualModalMaskHead";
    # ROI_MASK_HEAD.CONV_DIM (256) is the width of the shared convs, Conv1 and Conv3.
    _C.MODEL.ROI_MASK_HEAD.DUAL_MODAL = CN()
    _C.MODEL.ROI_MASK_HEAD.DUAL_MODAL.NUM_SHARED_CONV = 3  # "Conv x 3"
    _C.MODEL.ROI_MASK_HEAD.DUAL_MODAL.FC_CONV_DIM = 128  # Conv2, before the FC layer
    _C.MODEL.ROI_MASK_HEAD.DUAL_MODAL.SHUFFLE_CONV_DIM = 1024  # Conv4, 4x the pixel-shuffled width

    # GCN semantic head ("Large Kernel Matters", Peng et al. 2017), SEM_SEG_HEAD.NAME
    # "GCNSemSegHead" on res2-res5; the paper uses k = 5 for memory.
    _C.MODEL.SEM_SEG_HEAD.GCN_KERNEL_SIZE = 5
    _C.MODEL.SEM_SEG_HEAD.GCN_CHANNELS = 64  # channels of every GCN / refinement block


class NucleiConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file/key and why."""


def merge_config_file(cfg, path: str):
    """``cfg.merge_from_file`` with errors that name the file and the offending key."""
    if not os.path.isfile(path):
        raise NucleiConfigError(f"config file not found: {path}")
    try:
        cfg.merge_from_file(path)
    except KeyError as e:
        raise NucleiConfigError(f"{path}: unknown config key {e}") from e
    except yaml.YAMLError as e:
        # One line: command-line tools print the last line of an error only.
        problem = re.sub(r"\s+", " ", str(e)).strip()
        raise NucleiConfigError(f"{path}: not valid YAML: {problem}") from e
    except OSError as e:
        raise NucleiConfigError(f"{path}: cannot read it or a _BASE_ file it names: {e}") from e
    except TypeError as e:
        if "NoneType" in str(e):  # yaml.safe_load of an empty file gives None
            raise NucleiConfigError(f"{path}: the config file or a _BASE_ file it names is empty") from e
        raise NucleiConfigError(f"{path}: {e}") from e
    except (ValueError, AssertionError) as e:
        raise NucleiConfigError(f"{path}: {e}") from e


def validate_nucseg_config(cfg):
    """Reject values the code would otherwise misuse silently; raises NucleiConfigError."""
    aug = cfg.INPUT.AUG
    for key in ("GAUSSIAN_BLUR_PROB", "GAUSSIAN_NOISE_PROB", "EMBOSS_PROB", "SHARPEN_PROB",
                "CHANNEL_SHUFFLE_PROB", "STAIN_JITTER_PROB", "SCALE_PROB"):
        value = aug[key]
        if not 0.0 <= value <= 1.0:
            raise NucleiConfigError(f"INPUT.AUG.{key} must be a probability in [0, 1], got {value}")
    for key in ("GAUSSIAN_BLUR_SIGMA", "GAUSSIAN_NOISE_STD", "EMBOSS_STRENGTH", "SHARPEN_STRENGTH"):
        value = aug[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and 0 <= value[0] <= value[1]):
            raise NucleiConfigError(f"INPUT.AUG.{key} must be a range (low, high) with 0 <= low <= high, got {value}")
    scale_range = aug.SCALE_RANGE
    # Above 4 a 1000² Kumar image becomes 4000² (48 MB) for every training sample. At 1/4 a nucleus
    # 16 px across (40x) is 4 px across (about 13 px², kept) and one of 8 px falls under the default
    # MIN_FRAGMENT_AREA (8 px²); below it ever more nuclei vanish from the targets.
    if not (isinstance(scale_range, (list, tuple)) and len(scale_range) == 2
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in scale_range)
            and 0.25 <= scale_range[0] <= scale_range[1] <= 4):
        raise NucleiConfigError(
            f"INPUT.AUG.SCALE_RANGE must be resize factors (low, high) with 0.25 <= low <= high <= 4, "
            f"got {scale_range}")
    if not 0.0 <= aug.STAIN_JITTER_SCALE < 1.0:
        # The HED scale is drawn from U(1 - s, 1 + s): s >= 1 could flip a stain's sign.
        raise NucleiConfigError(f"INPUT.AUG.STAIN_JITTER_SCALE must be in [0, 1), got {aug.STAIN_JITTER_SCALE}")
    if aug.STAIN_JITTER_SHIFT < 0:
        raise NucleiConfigError(f"INPUT.AUG.STAIN_JITTER_SHIFT must be >= 0, got {aug.STAIN_JITTER_SHIFT}")
    if cfg.INPUT.MIN_FRAGMENT_AREA < 0:
        raise NucleiConfigError(f"INPUT.MIN_FRAGMENT_AREA must be >= 0, got {cfg.INPUT.MIN_FRAGMENT_AREA}")
    if cfg.SOLVER.NUCLEI.TIME_LIMIT_S < 0:
        raise NucleiConfigError(
            f"SOLVER.NUCLEI.TIME_LIMIT_S must be >= 0 (0 = no limit), got {cfg.SOLVER.NUCLEI.TIME_LIMIT_S}")
    nuclei = cfg.TEST.NUCLEI
    for key in ("SCORE_THRESH", "MAX_OVERLAP"):
        if not 0.0 <= nuclei[key] <= 1.0:
            raise NucleiConfigError(f"TEST.NUCLEI.{key} must be in [0, 1], got {nuclei[key]}")
    if not (math.isfinite(nuclei.TRAINING_MPP) and nuclei.TRAINING_MPP >= 0):
        raise NucleiConfigError(
            f"TEST.NUCLEI.TRAINING_MPP must be a µm per pixel >= 0 (0 = unknown), got {nuclei.TRAINING_MPP}")
    if not 0.0 < nuclei.MASK_THRESH < 1.0:
        # Pixels are kept above it: at 1 every mask is empty, and at 0 every pixel of the box (or,
        # pasted full-size by Detectron2, which keeps >= it, of the whole image) is kept.
        raise NucleiConfigError(f"TEST.NUCLEI.MASK_THRESH must be in (0, 1), got {nuclei.MASK_THRESH}")
    if not 0.0 <= cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST <= 1.0:
        raise NucleiConfigError(
            f"MODEL.ROI_HEADS.SCORE_THRESH_TEST must be in [0, 1], got {cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST}")
    if cfg.TEST.DETECTIONS_PER_IMAGE <= 0:
        # Every evaluation and prediction would be empty.
        raise NucleiConfigError(f"TEST.DETECTIONS_PER_IMAGE must be > 0, got {cfg.TEST.DETECTIONS_PER_IMAGE}")
    if nuclei.COCO_AP and not cfg.MODEL.NUCSEG.PASTE_FULL_MASKS:
        # COCOEvaluator reads full-image pred_masks; NucleiRCNN otherwise returns only compact
        # box-relative pred_mask_probs, and COCOEvaluator would silently report box AP only.
        raise NucleiConfigError(
            "TEST.NUCLEI.COCO_AP: True needs MODEL.NUCSEG.PASTE_FULL_MASKS: True (Detectron2's "
            "COCOEvaluator reads full-image pred_masks, which the model returns only when pasting "
            "is on); set MODEL.NUCSEG.PASTE_FULL_MASKS True or TEST.NUCLEI.COCO_AP False"
        )
    if cfg.INPUT.MIN_SIZE_TEST < 0 or cfg.INPUT.MAX_SIZE_TEST <= 0:
        raise NucleiConfigError(
            f"INPUT.MIN_SIZE_TEST must be >= 0 (0 = native resolution) and INPUT.MAX_SIZE_TEST > 0, "
            f"got {cfg.INPUT.MIN_SIZE_TEST} and {cfg.INPUT.MAX_SIZE_TEST}"
        )
    if cfg.INPUT.CROP.ENABLED and min(cfg.INPUT.CROP.SIZE) <= 0:
        raise NucleiConfigError(f"INPUT.CROP.SIZE must be positive, got {cfg.INPUT.CROP.SIZE}")
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE.startswith("relative") and max(cfg.INPUT.CROP.SIZE) > 1:
        raise NucleiConfigError(f"INPUT.CROP.SIZE must be fractions in (0, 1] with INPUT.CROP.TYPE "
                                f"{cfg.INPUT.CROP.TYPE}, got {cfg.INPUT.CROP.SIZE} (pixel sizes need 'absolute')")
    _validate_model_branches(cfg)
    from .data.datasets import tnbc_patient_folds

    try:
        tnbc_patient_folds(cfg.DATASETS.TNBC_NUM_FOLDS)  # reads only the shipped split file
    except ValueError as e:
        raise NucleiConfigError(f"DATASETS.TNBC_NUM_FOLDS: {e}") from e
    _validate_nuclei_folders(cfg.DATASETS.NUCLEI_FOLDERS)
    from .evaluation.metrics import ALL_METRICS

    unknown = [m for m in nuclei.METRICS if m not in ALL_METRICS]
    if unknown:
        raise NucleiConfigError(f"TEST.NUCLEI.METRICS: unknown metrics {unknown}; known: {sorted(ALL_METRICS)}")


def _validate_nuclei_folders(folders):
    """Each entry [name, image_dir, label_dir(, label_format)], strings, a known format, a name
    that is neither a built-in data set nor given twice (whether the folders exist is checked when
    they are registered, nucseg_d2.data.register_config_datasets)."""
    from .data.datasets import NUCLEI_DATASET_NAMES
    from .data.readers import LABEL_FORMATS

    names = set()
    for index, entry in enumerate(folders):
        where = f"DATASETS.NUCLEI_FOLDERS[{index}]"
        if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4) \
                or not all(isinstance(part, str) and part for part in entry):
            raise NucleiConfigError(
                f"{where}: expected [name, image_dir, label_dir] or [name, image_dir, label_dir, label_format] "
                f"of non-empty strings, got {entry!r}")
        name = entry[0]
        if len(entry) == 4 and entry[3] not in LABEL_FORMATS:
            raise NucleiConfigError(f"{where}: label_format must be one of {LABEL_FORMATS}, got {entry[3]!r}")
        if name in NUCLEI_DATASET_NAMES:
            raise NucleiConfigError(f"{where}: {name!r} is a built-in data set; give the folder another name")
        if name in names:
            raise NucleiConfigError(f"{where}: data set {name!r} is given twice")
        names.add(name)


def _validate_model_branches(cfg):
    """Loss weights >= 0, and other than 1 only in a model that applies them; the semantic branch
    and feature fusion on only in a model that builds them (PanopticNucleiRCNN or a subclass),
    with 2 semantic classes."""
    nucseg = cfg.MODEL.NUCSEG
    negative = {key: value for key, value in nucseg.LOSS_WEIGHTS.items() if value < 0}
    if negative:
        raise NucleiConfigError(f"MODEL.NUCSEG.LOSS_WEIGHTS must be >= 0, got {negative}")
    from detectron2.modeling import META_ARCH_REGISTRY

    from .modeling.meta_arch import FUSION_BOX_FIELDS, PanopticNucleiRCNN

    if nucseg.FUSION_BOXES not in FUSION_BOX_FIELDS:
        raise NucleiConfigError(
            f"MODEL.NUCSEG.FUSION_BOXES must be one of {sorted(FUSION_BOX_FIELDS)}, got {nucseg.FUSION_BOXES!r}")
    architecture = cfg.MODEL.META_ARCHITECTURE
    # An unregistered name is left for build_model to name.
    not_panoptic = architecture in META_ARCH_REGISTRY and not issubclass(
        META_ARCH_REGISTRY.get(architecture), PanopticNucleiRCNN)
    reweighted = {key: value for key, value in nucseg.LOSS_WEIGHTS.items() if value != 1.0}
    if not_panoptic and reweighted:
        # Only PanopticNucleiRCNN weighs its losses: elsewhere the weights would be silently ignored.
        raise NucleiConfigError(
            f"MODEL.NUCSEG.LOSS_WEIGHTS {reweighted}: MODEL.META_ARCHITECTURE {architecture} does not apply them; "
            "use PanopticNucleiRCNN (configs/Base-Panoptic-Nuclei.yaml) or leave them at 1.0"
        )
    # A weight on a branch that is off would be as silently ignored.
    weight_of_branch = {"SEMSEG1": "SEMANTIC_ON", "SEMSEG2": "FUSION_ON"}
    idle = {key: value for key, value in reweighted.items()
            if key in weight_of_branch and not nucseg[weight_of_branch[key]]}
    if idle:
        switches = " and ".join(f"MODEL.NUCSEG.{weight_of_branch[key]}" for key in idle)
        raise NucleiConfigError(f"MODEL.NUCSEG.LOSS_WEIGHTS {idle}: {switches} False, so nothing applies them")
    # So would the box choice of fusion that is off, or the semantic map of a branch that is off.
    if nucseg.FUSION_BOXES != "predicted" and not nucseg.FUSION_ON:
        raise NucleiConfigError(
            f"MODEL.NUCSEG.FUSION_BOXES {nucseg.FUSION_BOXES!r}: MODEL.NUCSEG.FUSION_ON False, so nothing is pasted")
    if nucseg.FUSION_IN_FEATURE != "p2" and not nucseg.FUSION_ON:
        raise NucleiConfigError(f"MODEL.NUCSEG.FUSION_IN_FEATURE {nucseg.FUSION_IN_FEATURE!r}: "
                                "MODEL.NUCSEG.FUSION_ON False, so no fused map is made")
    if nucseg.RETURN_SEMANTIC and (not_panoptic or not nucseg.SEMANTIC_ON):
        raise NucleiConfigError(
            "MODEL.NUCSEG.RETURN_SEMANTIC True needs the semantic branch: MODEL.NUCSEG.SEMANTIC_ON True in "
            f"PanopticNucleiRCNN (now {architecture}, SEMANTIC_ON {nucseg.SEMANTIC_ON})")
    if architecture in META_ARCH_REGISTRY and not not_panoptic:
        # Eq. 4's weights are MODEL.NUCSEG.LOSS_WEIGHTS: a head's own weight would multiply the
        # same loss a second time.
        own = {"MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
               "MODEL.RPN.LOSS_WEIGHT": cfg.MODEL.RPN.LOSS_WEIGHT,
               "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT,
               "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT}
        doubled = {key: value for key, value in own.items() if value != 1.0}
        if doubled:
            raise NucleiConfigError(
                f"{doubled}: {architecture} weighs its losses by MODEL.NUCSEG.LOSS_WEIGHTS (Eq. 4), which these "
                "would multiply again; set the weight there and leave these at 1.0")
    _refuse_settings_of_heads_not_built(cfg, architecture, not_panoptic)
    branches_on = [key for key in ("SEMANTIC_ON", "FUSION_ON") if nucseg[key]]
    if not branches_on:
        return
    if not_panoptic:
        raise NucleiConfigError(
            f"MODEL.NUCSEG.{' and '.join(branches_on)}: True, but MODEL.META_ARCHITECTURE {architecture} "
            "builds neither branch; use PanopticNucleiRCNN (configs/Base-Panoptic-Nuclei.yaml) or set them False"
        )
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != 2:
        raise NucleiConfigError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be 2 (background, nucleus) with MODEL.NUCSEG."
            f"{' and '.join(branches_on)} on, got {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}"
        )
    if cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE in (0, 1):
        # The padding would then read as background or nucleus, and that class would never be scored.
        raise NucleiConfigError(
            f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE must not be a class (0 background, 1 nucleus) with MODEL.NUCSEG."
            f"{' and '.join(branches_on)} on, got {cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE}; Detectron2's default is 255"
        )


def _refuse_settings_of_heads_not_built(cfg, architecture, not_panoptic):
    """ROI_MASK_HEAD.DUAL_MODAL.* other than nucseg-d2's defaults with another mask head, and
    SEM_SEG_HEAD.GCN_* with no GCN semantic head built: nothing would read them."""
    from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, PanopticFPN, SemanticSegmentor
    from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

    from .modeling.gcn_head import GCNSemSegHead
    from .modeling.mask_head import DualModalMaskHead

    defaults = get_cfg()
    add_nucseg_config(defaults)

    def built(registry, name, cls):
        # An unregistered name is left for build_model to name.
        return name not in registry or issubclass(registry.get(name), cls)

    def refuse(unread, default_node, why):
        at_defaults = {key: default_node[key.rsplit(".", 1)[1]] for key in unread}
        raise NucleiConfigError(f"{unread}: {why}, so nothing reads them; leave them at their defaults {at_defaults}")

    mask_head = cfg.MODEL.ROI_MASK_HEAD.NAME
    dual_defaults = defaults.MODEL.ROI_MASK_HEAD.DUAL_MODAL
    unread = {f"MODEL.ROI_MASK_HEAD.DUAL_MODAL.{key}": value
              for key, value in cfg.MODEL.ROI_MASK_HEAD.DUAL_MODAL.items() if value != dual_defaults[key]}
    if unread and not cfg.MODEL.MASK_ON:
        refuse(unread, dual_defaults, "MODEL.MASK_ON False: no mask head is built")
    if unread and not built(ROI_MASK_HEAD_REGISTRY, mask_head, DualModalMaskHead):
        refuse(unread, dual_defaults, f"MODEL.ROI_MASK_HEAD.NAME {mask_head} is not the dual-modal head")

    sem_seg_defaults = defaults.MODEL.SEM_SEG_HEAD
    unread = {f"MODEL.SEM_SEG_HEAD.{key}": cfg.MODEL.SEM_SEG_HEAD[key] for key in ("GCN_KERNEL_SIZE", "GCN_CHANNELS")
              if cfg.MODEL.SEM_SEG_HEAD[key] != sem_seg_defaults[key]}
    if not unread:
        return
    # Detectron2's semantic and panoptic models build SEM_SEG_HEAD.NAME too.
    model_class = META_ARCH_REGISTRY.get(architecture) if architecture in META_ARCH_REGISTRY else None
    builds_a_semantic_head = model_class is None or issubclass(model_class, (SemanticSegmentor, PanopticFPN)) \
        or (not not_panoptic and cfg.MODEL.NUCSEG.SEMANTIC_ON)
    if not builds_a_semantic_head:
        refuse(unread, sem_seg_defaults, f"MODEL.META_ARCHITECTURE {architecture} with MODEL.NUCSEG.SEMANTIC_ON "
                                         f"{cfg.MODEL.NUCSEG.SEMANTIC_ON} builds no semantic head")
    sem_seg_head = cfg.MODEL.SEM_SEG_HEAD.NAME
    if not built(SEM_SEG_HEADS_REGISTRY, sem_seg_head, GCNSemSegHead):
        refuse(unread, sem_seg_defaults, f"MODEL.SEM_SEG_HEAD.NAME {sem_seg_head} is not the GCN head")


def check_run_inputs(cfg, eval_only: bool = False, resume: bool = False):
    """Before a model is built or a file written: the data sets are registered, a training's
    sizes are positive and AMP has a GPU, an OUTPUT_DIR holding a trained run is written over only
    by --resume, and the weights exist (an evaluation without any would score an untrained model
    and overwrite earlier results)."""
    from .data.datasets import unregistered_datasets_message

    for key in ("TEST",) if eval_only else ("TRAIN", "TEST"):  # evaluation never loads TRAIN
        unknown = unregistered_datasets_message(cfg.DATASETS[key])
        if unknown:
            raise NucleiConfigError(f"DATASETS.{key}: {unknown}")
    if not eval_only and cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        # Detectron2's AMPTrainer would assert this only after building the model and the data.
        raise NucleiConfigError(f"SOLVER.AMP.ENABLED needs a CUDA device; MODEL.DEVICE is {cfg.MODEL.DEVICE}")
    if not eval_only:
        if not cfg.DATASETS.TRAIN:
            raise NucleiConfigError("DATASETS.TRAIN is empty: name the data set(s) to train on")
        for key in ("SOLVER.IMS_PER_BATCH", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.MAX_ITER"):
            section, name = key.split(".")
            if cfg[section][name] <= 0:
                raise NucleiConfigError(f"{key} must be > 0, got {cfg[section][name]}")
    trained = [name for name in ("last_checkpoint", "model_final.pth")
               if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, name))]
    if trained and not resume:
        # Detectron2 would overwrite the run's config.yaml at once, then its checkpoints (training)
        # or its inference/ results (an evaluation).
        if eval_only:
            raise NucleiConfigError(
                f"OUTPUT_DIR {cfg.OUTPUT_DIR} holds a trained run ({trained[0]}), whose config.yaml and "
                "inference/ results an --eval-only there would replace: give the evaluation its own OUTPUT_DIR "
                f"(e.g. {os.path.join(cfg.OUTPUT_DIR, 'eval')})")
        raise NucleiConfigError(
            f"OUTPUT_DIR {cfg.OUTPUT_DIR} holds a trained run ({trained[0]}), whose checkpoints and config.yaml "
            "training anew there would replace: --resume continues it; another OUTPUT_DIR (or deleting this "
            "one) trains anew")
    resumes = resume and "last_checkpoint" in trained
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not resumes and not os.path.isfile(weights):
        raise NucleiConfigError(f"MODEL.WEIGHTS: {weights}: file not found")
    if eval_only and not weights and not resumes:
        raise NucleiConfigError(
            "--eval-only needs trained weights: MODEL.WEIGHTS path/to/model_final.pth (or --resume with a "
            f"checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR}); without, an untrained model would be scored"
        )


def build_nuclei_cfg(config, opts=()):
    """An unfrozen, validated config: a YAML path merged onto Detectron2's and nucseg-d2's
    defaults, or a copy of a CfgNode; then ``opts`` ("KEY", "VALUE", ...) overrides on top."""
    if isinstance(config, CN):
        cfg = config.clone()
        cfg.defrost()
    else:
        cfg = get_cfg()
        add_nucseg_config(cfg)
        merge_config_file(cfg, os.fspath(config))
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise NucleiConfigError(f"config overrides {list(opts)}: {e}") from e
    try:
        validate_nucseg_config(cfg)
    except NucleiConfigError as e:
        if isinstance(config, CN):
            raise
        # A run's saved config.yaml may hold what a newer check refuses: name the file.
        raise NucleiConfigError(f"{os.fspath(config)}: {e}") from e
    return cfg
