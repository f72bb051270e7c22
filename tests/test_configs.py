"""Every config under configs/ builds its model and runs a training and an inference forward on CPU."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nucseg_d2 import add_nucseg_config
from nucseg_d2.config import (
    NucleiConfigError, build_nuclei_cfg, check_run_inputs, merge_config_file, validate_nucseg_config,
)
from model_inputs import synthetic_training_input

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _load(path):
    cfg = get_cfg()
    add_nucseg_config(cfg)
    merge_config_file(cfg, str(path))
    cfg.MODEL.DEVICE = "cpu"
    validate_nucseg_config(cfg)
    return cfg


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    expected = {"Base-Nuclei-RCNN-FPN.yaml", "Base-Panoptic-Nuclei.yaml", "demo.yaml"}
    for dataset in ("tnbc", "kumar"):
        expected |= {f"{dataset}{suffix}.yaml" for suffix in ("", "_maskrcnn", "_ab1", "_ab2", "_ab3", "_R101")}
    assert expected <= names


def test_each_data_set_keeps_the_proposal_budget_chosen_on_its_validation_split():
    # docs/RESULTS.md, "Proposal budget": 4,000 on kumar_val, 2,000 on tnbc_val; every variant of a
    # data set's config is compared with the others at the same budget.
    for path in CONFIGS:
        dataset = path.name.split("_")[0].split(".")[0]
        if dataset in ("tnbc", "kumar"):
            rpn = _load(path).MODEL.RPN
            budget = {"tnbc": 2000, "kumar": 4000}[dataset]
            assert (rpn.PRE_NMS_TOPK_TEST, rpn.POST_NMS_TOPK_TEST) == (budget, budget), path.name


def test_ablation_configs_switch_exactly_their_component():
    def components(name):
        cfg = _load(CONFIGS[0].parent / name)
        panoptic = cfg.MODEL.META_ARCHITECTURE == "PanopticNucleiRCNN"
        return (panoptic and cfg.MODEL.NUCSEG.FUSION_ON, panoptic and cfg.MODEL.NUCSEG.SEMANTIC_ON,
                cfg.MODEL.ROI_MASK_HEAD.NAME == "DualModalMaskHead")

    for dataset in ("tnbc", "kumar"):
        assert components(f"{dataset}_maskrcnn.yaml") == (False, False, False)
        assert components(f"{dataset}_ab1.yaml") == (True, False, False)
        assert components(f"{dataset}_ab3.yaml") == (False, True, False)
        assert components(f"{dataset}_ab2.yaml") == (True, True, False)
        assert components(f"{dataset}.yaml") == (True, True, True)


def test_build_nuclei_cfg_from_file_or_node_with_overrides():
    demo = CONFIGS[0].parent / "demo.yaml"
    cfg = build_nuclei_cfg(demo, ["SOLVER.MAX_ITER", "7"])
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.MODEL.META_ARCHITECTURE == _load(demo).MODEL.META_ARCHITECTURE
    cfg.freeze()
    copy = build_nuclei_cfg(cfg, ["SOLVER.MAX_ITER", "9"])
    assert copy.SOLVER.MAX_ITER == 9 and cfg.SOLVER.MAX_ITER == 7  # the given node is not changed
    with pytest.raises(NucleiConfigError, match="overrides.*NOT_A_KEY"):
        build_nuclei_cfg(demo, ["SOLVER.NOT_A_KEY", "1"])
    with pytest.raises(NucleiConfigError, match="TEST.NUCLEI.SCORE_THRESH"):
        build_nuclei_cfg(demo, ["TEST.NUCLEI.SCORE_THRESH", "2.0"])
    with pytest.raises(NucleiConfigError, match="not found.*nope.yaml"):
        build_nuclei_cfg("nope.yaml")


@pytest.mark.parametrize(
    "config, overrides, problem",
    [
        ("tnbc.yaml", ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1"], "NUM_CLASSES must be 2 .* got 1"),
        ("tnbc_maskrcnn.yaml", ["MODEL.NUCSEG.FUSION_ON", "True"], "FUSION_ON: True, but .*NucleiRCNN"),
        ("tnbc.yaml", ["MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG1", "-1.0"], r"LOSS_WEIGHTS must be >= 0, got \{'SEMSEG1'"),
        ("tnbc_maskrcnn.yaml", ["MODEL.NUCSEG.LOSS_WEIGHTS.MASK", "2.0"],
         r"LOSS_WEIGHTS \{'MASK': 2.0\}: MODEL.META_ARCHITECTURE NucleiRCNN does not apply them"),
        ("tnbc_ab3.yaml", ["MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG2", "0.5"],
         r"LOSS_WEIGHTS \{'SEMSEG2': 0.5\}: MODEL.NUCSEG.FUSION_ON False, so nothing applies them"),
        ("tnbc.yaml", ["INPUT.CROP.TYPE", "relative"], "fractions in \\(0, 1\\] with INPUT.CROP.TYPE relative"),
        ("tnbc.yaml", ["DATASETS.TNBC_NUM_FOLDS", "1"], r"TNBC_NUM_FOLDS: .* 2\.\.\d+, got 1"),
        ("tnbc.yaml", ["DATASETS.TNBC_NUM_FOLDS", "20"], r"TNBC_NUM_FOLDS: .* 2\.\.\d+, got 20"),
        ("tnbc.yaml", ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "SEMANTIC_ON and FUSION_ON: True, but .*GeneralizedRCNN"),
        ("tnbc.yaml", ["INPUT.AUG.GAUSSIAN_BLUR_SIGMA", "(0.5,)"],
         r"GAUSSIAN_BLUR_SIGMA must be a range .* got \(0.5,\)"),
        ("tnbc.yaml", ["INPUT.AUG.SHARPEN_STRENGTH", "(0.1, 0.2, 0.3)"], "SHARPEN_STRENGTH must be a range"),
        ("tnbc.yaml", ["INPUT.AUG.STAIN_JITTER_SCALE", "1.5"], r"STAIN_JITTER_SCALE must be in \[0, 1\), got 1.5"),
        ("tnbc.yaml", ["INPUT.AUG.STAIN_JITTER_SHIFT", "-0.1"], "STAIN_JITTER_SHIFT must be >= 0"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_PROB", "1.5"], r"SCALE_PROB must be a probability in \[0, 1\], got 1.5"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "(0.0, 1.25)"],
         r"SCALE_RANGE must be resize factors .* got \(0.0, 1.25\)"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "(0.2, 1.25)"], r"0.25 <= low <= high .* got \(0.2, 1.25\)"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "('a', 1.25)"], "SCALE_RANGE must be resize factors"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "(1.25, 0.8)"], "SCALE_RANGE must be resize factors"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "(1.25,)"], "SCALE_RANGE must be resize factors"),
        ("tnbc.yaml", ["INPUT.AUG.SCALE_RANGE", "(0.8, 1e9)"],
         r"SCALE_RANGE .* <= high <= 4, got \(0.8, 1000000000.0\)"),
        # Kept above the threshold: 0 keeps a whole box (whole image when pasted full-size), 1 nothing.
        ("tnbc.yaml", ["TEST.NUCLEI.MASK_THRESH", "0.0"], r"MASK_THRESH must be in \(0, 1\), got 0.0"),
        ("tnbc.yaml", ["TEST.NUCLEI.MASK_THRESH", "1.0"], r"MASK_THRESH must be in \(0, 1\), got 1.0"),
        ("tnbc.yaml", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.5"], r"SCORE_THRESH_TEST must be in \[0, 1\]"),
        ("tnbc.yaml", ["TEST.DETECTIONS_PER_IMAGE", "0"], "DETECTIONS_PER_IMAGE must be > 0, got 0"),
        ("tnbc.yaml", ["TEST.NUCLEI.TRAINING_MPP", "-0.25"], r"TRAINING_MPP must be a µm per pixel >= 0 .* got -0.25"),
        # PanopticNucleiRCNN weighs by LOSS_WEIGHTS; the heads' own weights would apply twice.
        ("tnbc.yaml", ["MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", "0.5"],
         r"\{'MODEL.SEM_SEG_HEAD.LOSS_WEIGHT': 0.5\}: PanopticNucleiRCNN .* MODEL.NUCSEG.LOSS_WEIGHTS"),
        ("tnbc_ab3.yaml", ["MODEL.RPN.LOSS_WEIGHT", "2.0"], r"'MODEL.RPN.LOSS_WEIGHT': 2.0\}: PanopticNucleiRCNN"),
        ("tnbc_ab3.yaml", ["MODEL.NUCSEG.FUSION_IN_FEATURE", "p3"], "FUSION_IN_FEATURE 'p3': .*FUSION_ON False"),
        # Sizes of heads that are not built would be ignored.
        ("tnbc_ab2.yaml", ["MODEL.ROI_MASK_HEAD.DUAL_MODAL.SHUFFLE_CONV_DIM", "256"],
         "DUAL_MODAL.SHUFFLE_CONV_DIM': 256}: MODEL.ROI_MASK_HEAD.NAME MaskRCNNConvUpsampleHead is not the dual"),
        ("tnbc_ab1.yaml", ["MODEL.SEM_SEG_HEAD.GCN_KERNEL_SIZE", "7"],
         r"GCN_KERNEL_SIZE': 7}: MODEL.META_ARCHITECTURE PanopticNucleiRCNN with MODEL.NUCSEG.SEMANTIC_ON False "
         r"builds no semantic head, so nothing reads them; leave them at their defaults \{'MODEL.SEM_SEG_HEAD."
         r"GCN_KERNEL_SIZE': 5\}"),
        ("tnbc_maskrcnn.yaml", ["MODEL.SEM_SEG_HEAD.GCN_CHANNELS", "32"], r"GCN_CHANNELS': 32}: .*NucleiRCNN"),
        ("tnbc.yaml", ["MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead", "MODEL.SEM_SEG_HEAD.GCN_CHANNELS", "32"],
         "SemSegFPNHead is not the GCN head"),
        ("tnbc.yaml", ["MODEL.MASK_ON", "False", "MODEL.ROI_MASK_HEAD.DUAL_MODAL.FC_CONV_DIM", "64"],
         "MODEL.MASK_ON False: no mask head is built"),
    ],
)
def test_values_the_model_would_misuse_are_rejected_naming_the_key(config, overrides, problem):
    with pytest.raises(NucleiConfigError, match=problem):
        build_nuclei_cfg(CONFIGS[0].parent / config, overrides)


def test_gcn_sizes_pass_in_detectron2_models_that_build_the_gcn_head():
    # PanopticFPN and SemanticSegmentor build SEM_SEG_HEAD.NAME: the GCN head reads its sizes there.
    for architecture in ("PanopticFPN", "SemanticSegmentor"):
        cfg = build_nuclei_cfg(CONFIGS[0].parent / "tnbc_maskrcnn.yaml", [
            "MODEL.META_ARCHITECTURE", architecture, "MODEL.SEM_SEG_HEAD.NAME", "GCNSemSegHead",
            "MODEL.SEM_SEG_HEAD.GCN_KERNEL_SIZE", "7"])
        assert cfg.MODEL.SEM_SEG_HEAD.GCN_KERNEL_SIZE == 7


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "results").glob("*/config.yaml")),
                         ids=lambda path: path.parent.name)
def test_published_runs_saved_configs_still_validate(path):
    # They are resumed, evaluated and predicted with (cpu_train_eval.sh, --eval-only, NucleiPredictor).
    build_nuclei_cfg(path)


def test_loss_weights_other_than_one_pass_with_the_model_that_applies_them():
    cfg = build_nuclei_cfg(CONFIGS[0].parent / "tnbc.yaml", ["MODEL.NUCSEG.LOSS_WEIGHTS.MASK", "2.0",
                                                             "MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG1", "0.5"])
    assert (cfg.MODEL.NUCSEG.LOSS_WEIGHTS.MASK, cfg.MODEL.NUCSEG.LOSS_WEIGHTS.SEMSEG1) == (2.0, 0.5)


@pytest.mark.parametrize("text, problem", [
    ("MODEL:\n\tDEVICE: cpu\n", r"bad.yaml: not valid YAML: .*found character '\\t' that cannot start any token"),
    ("MODEL: {DEVICE: 'cpu\n", "bad.yaml: not valid YAML: "),
    ("", "bad.yaml: the config file or a _BASE_ file it names is empty"),
    ('_BASE_: "nope.yaml"\n', "bad.yaml: cannot read it or a _BASE_ file it names: .*nope.yaml"),
])
def test_unreadable_config_files_are_one_line_naming_the_file(tmp_path, text, problem):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(NucleiConfigError, match=problem) as caught:
        build_nuclei_cfg(tmp_path / "bad.yaml")
    assert "\n" not in str(caught.value)


def test_run_inputs_are_checked_before_a_model_is_built(tmp_path):
    demo = CONFIGS[0].parent / "demo.yaml"
    cfg = build_nuclei_cfg(demo, ["OUTPUT_DIR", str(tmp_path)])
    check_run_inputs(cfg)  # the demo's data sets are registered, it trains from scratch
    with pytest.raises(NucleiConfigError, match=r"DATASETS.TEST: unknown data set 'tnbc_tset'; nuclei.*tnbc_test"):
        check_run_inputs(build_nuclei_cfg(cfg, ["DATASETS.TEST", "('tnbc_tset',)"]))
    misnamed_train = build_nuclei_cfg(cfg, ["DATASETS.TRAIN", "('tnbc_tarin',)", "MODEL.WEIGHTS", "detectron2://x.pkl"])
    with pytest.raises(NucleiConfigError, match="DATASETS.TRAIN: .*'tnbc_tarin'"):
        check_run_inputs(misnamed_train)
    check_run_inputs(misnamed_train, eval_only=True)  # evaluation never loads TRAIN; URLs are not files
    with pytest.raises(NucleiConfigError, match="MODEL.WEIGHTS: .*nope.pth: file not found"):
        check_run_inputs(build_nuclei_cfg(cfg, ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")]))
    with pytest.raises(NucleiConfigError, match="--eval-only needs trained weights"):
        check_run_inputs(cfg, eval_only=True)
    for key, value in [("SOLVER.IMS_PER_BATCH", "0"), ("SOLVER.CHECKPOINT_PERIOD", "0"), ("SOLVER.MAX_ITER", "-1")]:
        with pytest.raises(NucleiConfigError, match=f"{key} must be > 0, got {value}"):
            check_run_inputs(build_nuclei_cfg(cfg, [key, value]))
    with pytest.raises(NucleiConfigError, match="DATASETS.TRAIN is empty"):
        check_run_inputs(build_nuclei_cfg(cfg, ["DATASETS.TRAIN", "()"]))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check_run_inputs(cfg, eval_only=True, resume=True)  # --resume evaluates the last checkpoint
    check_run_inputs(cfg, resume=True)  # and continues the training


@pytest.mark.parametrize("saved", ["last_checkpoint", "model_final.pth"])
def test_a_trained_run_is_not_overwritten_without_resume(tmp_path, saved):
    cfg = build_nuclei_cfg(CONFIGS[0].parent / "demo.yaml",
                           ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / saved)])
    (tmp_path / saved).write_text("trained")
    with pytest.raises(NucleiConfigError, match=f"holds a trained run \\({saved}\\).* --resume continues it"):
        check_run_inputs(build_nuclei_cfg(cfg, ["MODEL.WEIGHTS", ""]))
    with pytest.raises(NucleiConfigError, match="--eval-only there would replace.*its own OUTPUT_DIR"):
        check_run_inputs(cfg, eval_only=True)
    check_run_inputs(build_nuclei_cfg(cfg, ["OUTPUT_DIR", str(tmp_path / "eval")]), eval_only=True)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds_and_runs_forward(path):
    cfg = _load(path)
    cfg.TEST.DETECTIONS_PER_IMAGE = 50
    model = build_model(cfg)
    inputs = [synthetic_training_input(3, 64, 64)]
    model.train()
    with EventStorage(0):
        losses = model(inputs)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    if cfg.MODEL.META_ARCHITECTURE == "PanopticNucleiRCNN":
        expected |= {"loss_sem_seg"} if cfg.MODEL.NUCSEG.SEMANTIC_ON else set()
        expected |= {"loss_fusion"} if cfg.MODEL.NUCSEG.FUSION_ON else set()
    assert set(losses) == expected
    model.eval()
    with torch.no_grad():
        outputs = model([{k: inputs[0][k] for k in ("image", "height", "width")}])
    assert outputs[0]["instances"].image_size == (64, 64)
