"""meta_arch: TIDL's anchors from a prototxt, hand-computed, and decoding one detection by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgequant.export import meta_arch
from edgequant.export.prototxt import parse, to_text

SSD_TEXT = """
name: "ssd"
caffe_ssd {
  box_input: "box_0"
  class_input: "cls_0"
  output: "boxes"
  output: "labels"
  in_width: 64
  in_height: 64
  prior_box_param {
    min_size: 16.0
    max_size: 36.9
    aspect_ratio: 2.0
    flip: true
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 32.0
    offset: 0.5
  }
  detection_output_param {
    num_classes: 3
    background_label_id: 0
    nms_param { nms_threshold: 0.5 top_k: 10 }
    code_type: CENTER_SIZE
    keep_top_k: 5
    confidence_threshold: 0.5
  }
}
"""


def test_ssd_priors_follow_tidls_importer():
    arch = parse(SSD_TEXT, meta_arch.MetaArch)
    assert meta_arch.kind_of(arch) == "caffe_ssd" and meta_arch.META_ARCH_TYPES["caffe_ssd"] == 3
    (priors,) = meta_arch.anchors(arch, [(2, 2)])
    assert priors.shape == (2 * 2 * 4, 4)  # min, sqrt(min * max), ratio 2, ratio 1/2 per location
    # Location (row 0, col 1): centre (48, 16); max_size is truncated to 36 as TIDL's importer does.
    r = math.sqrt(2.0)
    want = [[48, 16, 16, 16], [48, 16, 24, 24], [48, 16, 16 * r, 16 / r], [48, 16, 16 / r, 16 * r]]
    assert torch.allclose(priors[4:8], torch.tensor(want, dtype=torch.float32))


def test_retinanet_anchors_scale_with_the_stride():
    arch = meta_arch.MetaArch(name="retinanet")
    spec = arch.tidl_retinanet.add(in_width=64, in_height=32)
    spec.anchor_param.aspect_ratio.extend([0.25, 1.0])
    spec.anchor_param.octave_base_scale = 4.0
    spec.anchor_param.scales_per_octave = 2
    level = meta_arch.anchors(arch, [(4, 8)])[0]  # stride 8 both ways
    assert level.shape == (4 * 8 * 4, 4)
    # Ratio-major: (0.25, 32), (0.25, 32 * 2^0.5), (1, 32), (1, 32 * 2^0.5); w = size / sqrt(r), h = size * sqrt(r).
    s = 32 * 2**0.5
    want = [[0, 0, 64, 16], [0, 0, 2 * s, s / 2], [0, 0, 32, 32], [0, 0, s, s]]
    assert torch.allclose(level[:4], torch.tensor(want, dtype=torch.float32))
    assert torch.equal(level[4 * 9, :2], torch.tensor([8.0, 8.0]))  # row 1, col 1: offset 0


def test_decode_finds_the_one_confident_box_by_hand():
    arch = parse(SSD_TEXT, meta_arch.MetaArch)
    boxes = np.zeros((1, 4 * 4, 2, 2), np.float32)
    classes = np.zeros((1, 4 * 3, 2, 2), np.float32)
    # Prior 1 (the sqrt(min * max) square, 24 px) at row 1, col 0: centre (16, 48). Shift x by +0.5 * 0.1 * 24.
    boxes[0, 1 * 4 + 0, 1, 0] = 0.5
    boxes[0, 1 * 4 + 2, 1, 0] = math.log(2.0) / 0.2  # width doubled
    classes[0, 1 * 3 + 2, 1, 0] = 5.0  # class 2, softmax(0, 0, 5)
    (found,) = meta_arch.decode(arch, {"box_0": boxes, "cls_0": classes})
    assert found["labels"].tolist() == [2]
    score = math.exp(5) / (2 + math.exp(5))
    assert found["scores"].item() == pytest.approx(score, rel=1e-6)
    cx, w = 16 + 0.05 * 24, 48.0
    want = [max(cx - w / 2, 0), 48 - 12, min(cx + w / 2, 64), 48 + 12]  # clipped to the image
    assert torch.allclose(found["boxes"][0], torch.tensor(want), atol=1e-4)


def test_text_round_trips():
    arch = parse(SSD_TEXT, meta_arch.MetaArch)
    again = parse(to_text(arch), meta_arch.MetaArch)
    assert again == arch and "score_converter" not in to_text(arch)
    with pytest.raises(ValueError, match="exactly one"):
        meta_arch.head(meta_arch.MetaArch(name="empty"))
