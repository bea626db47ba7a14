"""The canvas detectors: torchvision classes whose anchors TIDL's prototxt expresses exactly."""

from __future__ import annotations

import warnings

import pytest
import torch

import edgequant as eq
from edgequant.core.errors import UsageError
from edgequant.demo.canvases import NUM_CLASSES, digit_canvases
from edgequant.demo.detection import DETECTORS, build_detector


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ssdlite", "retinanet"])
def test_canvas_detectors_export_with_a_prototxt_that_reproduces_them(family, tmp_path):
    images, _ = digit_canvases("calibration", 8)
    model = build_detector(family).eval()
    cls_logits = model.head.classification_head
    cls_logits = cls_logits.module_list[-1] if family == "ssdlite" else cls_logits.cls_logits
    with torch.no_grad():  # untrained scores all sit at the prior: spread them, as training would
        torch.manual_seed(0)
        for parameter in cls_logits.parameters():
            parameter.normal_(-3.0 if family == "retinanet" else 0.0, 1.0)
    model.score_thresh = 0.05
    qmodel = eq.PTQModule(model, (images[:4],)).calibrate([images], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", eq.MetaArchWarning)  # no anchor TIDL cannot build
        warnings.simplefilter("ignore", eq.TidlFallbackWarning)
        result = qmodel.export(tmp_path / f"{family}.onnx")
    assert result.detection_check is not None and " 0 of " not in result.detection_check


@pytest.mark.slow
def test_builders_run_at_the_canvas_size():
    for family in DETECTORS:
        model = build_detector(family, size=128).eval()
        with torch.no_grad():
            (found,) = model([torch.rand(3, 128, 128)])
        assert set(found) == {"boxes", "scores", "labels"}
        assert model.transform.min_size == (128,) or model.transform.fixed_size == (128, 128)
    assert build_detector("retinanet").head.classification_head.num_classes == NUM_CLASSES


def test_unknown_detector_names_are_refused():
    with pytest.raises(UsageError, match="unknown detector 'yolo'; choose from ssdlite, retinanet, fcos"):
        build_detector("yolo")
