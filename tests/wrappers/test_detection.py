"""Detectors through the usual wrappers: torchvision's output format, losses, TIDL's files and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

import edgequant as eq
from edgequant.core.errors import MetaArchWarning
from edgequant.demo.canvases import digit_canvases
from edgequant.export import meta_arch
from edgequant.export.prototxt import parse
from edgequant.export.runtime import run_onnx, session
from edgequant.wrappers.detection import DetectionModule

from ..helpers import tiny_detector

FAMILIES = ("ssd", "retinanet", "fcos")
SIZE = 64
# Score thresholds at which the random test detectors find some dozens of boxes per image, under every cap.
THRESHOLDS = {"ssd": 0.3, "retinanet": 0.05, "fcos": 0.35}


@pytest.fixture(scope="module")
def canvases() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return digit_canvases("calibration", 16, size=SIZE)


def _ptq(family: str, canvases, scheme: str = "int8_pow2", **kwargs) -> DetectionModule:
    images, targets = canvases
    qmodel = eq.PTQModule(tiny_detector(family, SIZE, **kwargs), (images[:4],), scheme)
    assert isinstance(qmodel, DetectionModule)
    batches = [(images[i : i + 4], targets[i : i + 4]) for i in range(0, 16, 4)]
    return qmodel.calibrate(batches, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_returns_the_float_detectors_detections_at_16_bit(family, canvases):
    images = canvases[0][:4]
    model = tiny_detector(family, SIZE, score_thresh=THRESHOLDS[family])
    qmodel = _ptq(family, canvases, "int16", score_thresh=THRESHOLDS[family])
    with torch.no_grad():
        want = model(list(images))
        got = qmodel(images)
    assert len(got) == len(want) == 4
    matched = total = 0
    for ours, theirs in zip(got, want, strict=True):
        assert set(ours) == {"boxes", "scores", "labels"} and ours["boxes"].shape[1] == 4
        total += len(theirs["scores"])
        if len(theirs["scores"]) and len(ours["scores"]):
            # Within a label (NMS runs per class, so a box can carry several), the nearest box; by
            # corner distance, as boxes clipped at the border can have no area.
            distance = (theirs["boxes"][:, None] - ours["boxes"][None]).abs().amax(dim=-1)
            distance[theirs["labels"][:, None] != ours["labels"][None, :]] = float("inf")
            matched += int((distance.min(dim=1).values < 0.5).sum())
    assert total > 0, "the test detector finds nothing: nothing compared"
    assert matched >= 0.9 * total, f"{matched} of {total} float detections found at 16 bit"


@pytest.mark.parametrize("family", ["ssd", pytest.param("retinanet", marks=pytest.mark.slow)])
def test_export_writes_the_meta_architecture_whose_decoding_reproduces_torchvision(family, canvases, tmp_path):
    qmodel = _ptq(family, canvases, score_thresh=THRESHOLDS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetaArchWarning)
        result = qmodel.export(tmp_path / "det.onnx")
    assert result.deploy.meta_arch == tmp_path / "det.meta_arch.prototxt"
    assert result.parity.max_abs_diff == 0.0  # int8_pow2 conv heads: bit for bit
    text = result.deploy.meta_arch.read_text()
    arch = parse(text, meta_arch.MetaArch)
    spec = meta_arch.head(arch)
    assert list(spec.box_input) == ["box_0", "box_1", "box_2"] and list(spec.class_input) == ["cls_0", "cls_1", "cls_2"]
    assert (spec.in_width, spec.in_height) == (SIZE, SIZE) and spec.detection_output_param.num_classes == 11
    options = result.options_path.read_text()
    assert f'"object_detection:meta_arch_type": {3 if family == "ssd" else 5}' in options
    assert '"object_detection:meta_layers_names_list": "det.meta_arch.prototxt"' in options
    assert result.detection_check is not None and "0 of 0" not in result.detection_check
    found = result.detection_check.split(" of ")[0].rsplit(" ", 1)[1]
    assert result.detection_check.startswith(f"TIDL post-processing from det.meta_arch.prototxt: {found} of {found} ")

    # Independently: the file's outputs, decoded from the prototxt alone, against eval of the wrapper.
    images = canvases[0][8:12]
    sess = session(str(result.path))
    outputs = run_onnx(sess, (qmodel.core_inputs(images),))
    decoded = meta_arch.decode(arch, dict(zip([o.name for o in sess.get_outputs()], outputs, strict=True)))
    with torch.no_grad():
        seen = qmodel(images)  # canvases at the network's size: no resize back
    for ours, theirs in zip(decoded, seen, strict=True):
        assert torch.equal(ours["labels"], theirs["labels"])
        assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-3)
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-5)

    # A wrong variance (SSD) or aspect-ratio order (RetinaNet) in the prototxt no longer reproduces them.
    if family == "ssd":
        for prior in spec.prior_box_param:
            prior.variance[0], prior.variance[2] = prior.variance[2], prior.variance[0]
    else:
        ratios = list(spec.anchor_param.aspect_ratio)
        spec.anchor_param.ClearField("aspect_ratio")
        spec.anchor_param.aspect_ratio.extend(ratios[::-1])
    wrong = meta_arch.decode(arch, dict(zip([o.name for o in sess.get_outputs()], outputs, strict=True)))
    assert any(
        len(a["boxes"]) != len(b["boxes"]) or not torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
        for a, b in zip(wrong, seen, strict=True)
    )


@pytest.mark.slow
def test_fcos_exports_its_heads_and_says_tidl_has_no_meta_architecture(canvases, tmp_path):
    qmodel = _ptq("fcos", canvases)
    with pytest.warns(MetaArchWarning, match="no meta architecture for FCOS"):
        result = qmodel.export(tmp_path / "fcos.onnx")
    assert result.deploy.meta_arch is None and result.detection_check is None
    names = [o.name for o in session(str(result.path)).get_outputs()]
    assert names == [f"{k}_{i}" for i in range(3) for k in ("box", "cls", "ctr")]


@pytest.mark.slow
def test_anchors_tidl_cannot_express_are_reported(canvases, tmp_path):
    # torchvision rounds anchor corners to whole pixels; ratio 2 makes half-extents irrational.
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    images = canvases[0]
    model = tiny_detector("retinanet", SIZE)
    model.anchor_generator = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3)
    qmodel = eq.PTQModule(model, (images[:4],)).calibrate([images[:8]], progress=False)
    with pytest.warns(MetaArchWarning, match=r"anchors TIDL builds from the prototxt differ .* rounds anchor corners"):
        qmodel.export(tmp_path / "r.onnx")


@pytest.mark.slow
def test_qat_step_computes_torchvisions_losses_and_trains_the_backbone(canvases, tmp_path):
    images, targets = canvases
    model = tiny_detector("retinanet", SIZE, warm=images)  # BN statistics of these images, as after training
    with torch.no_grad():
        model.train()
        float_losses = model(list(images[:4]), targets[:4])
    qmodel = eq.QATModule(model, (images[:4],), "int16")
    qmodel.train()
    losses = qmodel(images[:4], targets[:4])
    assert set(losses) == set(float_losses) == {"classification", "bbox_regression"}
    for key, value in losses.items():
        value, want = float(value), float(float_losses[key])
        assert np.isfinite(value) and abs(value - want) < 0.05 * want, (key, value, want)
    sum(losses.values()).backward()
    grads = [p.grad for p in qmodel.parameters() if p.grad is not None]
    assert len(grads) == len(list(qmodel.parameters())) and all(bool(g.abs().sum() > 0) for g in grads[:3])
    qmodel.eval()
    with torch.no_grad():
        detections = qmodel(images[:2])
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    result = qmodel.export(tmp_path / "qat.onnx")  # the trained network, with its meta architecture
    assert result.deploy.meta_arch is not None and result.detection_check is not None


@pytest.mark.slow
def test_bad_input_gets_one_line_errors(canvases):
    images, targets = canvases
    qmodel = _ptq("retinanet", canvases)
    with pytest.raises(eq.EdgequantError, match="targets are for training"):
        qmodel(images[:2], targets[:2])
    # The detector's transform resizes (min_size=max_size=64) and pads to a multiple of 32: a wide image
    # becomes a 32x64 batch, which the network was not captured for.
    with pytest.raises(eq.InputShapeError, match=r"images of size 64x200 become a batch .* takes 64x64"):
        qmodel(torch.rand(2, 3, 64, 200))
    with pytest.raises(eq.InputShapeError, match="64x200, 70x200"):  # a list of images, as torchvision takes them
        qmodel([torch.rand(3, 64, 200), torch.rand(3, 70, 200)])
    assert len(qmodel([images[0], torch.rand(3, 64, 100)])) == 2  # resized and padded to 64x64: fine
    with pytest.raises(eq.EdgequantError, match="a PTQ detector is calibrated, not trained"):
        qmodel.train()(images[:2], targets[:2])
    with pytest.raises(eq.EdgequantError, match="two-stage detector"):
        eq.PTQModule(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None), (images[:2],))
    with pytest.raises(eq.EdgequantError, match=r"example_inputs=\(images,\)"):
        eq.PTQModule(tiny_detector("ssd", SIZE), (images[:2], images[:2]))
    qat = eq.QATModule(tiny_detector("ssd", SIZE), (images[:2],))
    with pytest.raises(eq.EdgequantError, match="needs targets"):
        qat.train()(images[:2])
    assert np.isfinite(float(sum(qat(images[:2], targets[:2]).values())))
