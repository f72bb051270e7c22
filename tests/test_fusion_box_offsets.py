"""scripts/fusion_box_offsets.py: every checkpoint is checked, strictly, before the slow batches."""
import importlib.util
from pathlib import Path

import torch
from detectron2.modeling import build_model

from nucseg_d2.predict.predictor import build_predict_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fusion_box_offsets.py"
spec = importlib.util.spec_from_file_location("fusion_box_offsets_script", SCRIPT)
fusion_box_offsets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusion_box_offsets)


def _no_batches(*args, **kwargs):
    raise AssertionError("training batches were built before every checkpoint was checked")


def _main(*weights):
    return fusion_box_offsets.main(["--config-file", str(CONFIGS / "demo.yaml"), "--weights", *weights])


def test_a_later_checkpoint_of_another_architecture_is_refused_before_any_measurement(
        tmp_path, untrained_demo_weights, capsys, monkeypatch):
    maskrcnn = build_model(build_predict_cfg(str(CONFIGS / "demo_maskrcnn.yaml"), ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": maskrcnn.state_dict()}, tmp_path / "maskrcnn.pth")
    monkeypatch.setattr(fusion_box_offsets, "fixed_batches", _no_batches)
    assert _main(untrained_demo_weights, str(tmp_path / "maskrcnn.pth")) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'maskrcnn.pth'}: checkpoint does not match the architecture of "
                          f"PanopticNucleiRCNN ({CONFIGS / 'demo.yaml'}); missing keys")


def test_a_missing_or_empty_checkpoint_is_refused_by_name(untrained_demo_weights, capsys, monkeypatch):
    monkeypatch.setattr(fusion_box_offsets, "fixed_batches", _no_batches)
    assert _main(untrained_demo_weights, "nowhere/model_0000274.pth") == 2
    assert capsys.readouterr().err == "error: nowhere/model_0000274.pth: checkpoint file not found\n"
    assert _main("") == 2
    assert capsys.readouterr().err == "error: no checkpoint given (--weights)\n"


def test_a_checkpoint_without_the_semantic_head_is_refused(tmp_path, untrained_demo_weights, capsys, monkeypatch):
    """The predictor's loader forgives it (inference never runs the head); loss_fusion measured here
    would come from a random semantic head and fusion."""
    state = torch.load(untrained_demo_weights)["model"]
    trimmed = {key: value for key, value in state.items() if not key.startswith(("sem_seg_head.", "feature_fusion."))}
    torch.save({"model": trimmed}, tmp_path / "no_semantic.pth")
    monkeypatch.setattr(fusion_box_offsets, "fixed_batches", _no_batches)
    assert _main(str(tmp_path / "no_semantic.pth")) == 2
    err = capsys.readouterr().err
    dropped = len(state) - len(trimmed)
    assert "no_semantic.pth: checkpoint does not match the architecture of" in err
    assert f"missing keys ({dropped}): feature_fusion.predictor.bias" in err
