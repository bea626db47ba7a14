"""TIDL's detection post-processing ("meta architecture"): the prototxt it reads, and a decoder of it.

TIDL runs a detector's post-processing itself when the compile options name a
prototxt (`object_detection:meta_arch_type`, `object_detection:meta_layers_names_list`)
that lists the head outputs (`box_input`, `class_input`, one per level), the input size,
the anchors and the NMS settings. Formats: TI's docs/tidl_fsg_od_meta_arch.md and the
examples in edgeai-tidl-tools examples/models/prototxt/mmdet/. How TIDL turns the fields
into anchors is read from its importer (tidl_metaArch_import):

- ONNX SSD (`caffe_ssd`, type 3): per level, priors at ((j + offset) * step_w,
  (i + offset) * step_h): a square of `min_size`, a square of sqrt(min_size * max_size)
  (max_size truncated to an integer), then per aspect ratio r (and 1 / r with `flip`)
  a box of min_size * sqrt(r) by min_size / sqrt(r); `clip` is not applied. Boxes decode
  as CENTER_SIZE with the four `variance` values as multipliers.
- RetinaNet (`tidl_retinanet`, type 5): per level of stride s, for each aspect ratio r
  and scale i, an anchor of width size / sqrt(r) and height size * sqrt(r), size =
  s * octave_base_scale * 2^(i / scales_per_octave), centred at (j + x_offset) * s;
  boxes decode as CENTER_SIZE divided by x_scale, y_scale, width_scale, height_scale.

`decode()` runs that post-processing on head outputs (from onnxruntime) with nothing
but the prototxt, in torchvision's order of steps (score threshold, top-k, NMS per
class, keep_top_k), so that export can prove the file describes the model's own
post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from google.protobuf.message import Message
from torchvision.ops import batched_nms, box_convert

from .prototxt import F, message_classes

_OPT, _REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
_HEAD_FIELDS = [
    ("box_input", 1, F.TYPE_STRING, _REP, None),
    ("class_input", 2, F.TYPE_STRING, _REP, None),
    ("output", 3, F.TYPE_STRING, _REP, None),
    ("in_width", 4, F.TYPE_INT32, _OPT, None),
    ("in_height", 5, F.TYPE_INT32, _OPT, None),
]
_MESSAGES = {
    "TIDLMetaArch": [
        ("name", 1, F.TYPE_STRING, _OPT, None),
        ("caffe_ssd", 2, F.TYPE_MESSAGE, _REP, "TidlMaCaffeSsd"),
        ("tidl_retinanet", 3, F.TYPE_MESSAGE, _REP, "TidlMaRetinaNet"),
    ],
    "TidlMaCaffeSsd": [
        *_HEAD_FIELDS,
        ("prior_box_param", 6, F.TYPE_MESSAGE, _REP, "PriorBoxParameter"),
        ("detection_output_param", 7, F.TYPE_MESSAGE, _OPT, "DetectionOutputParameter"),
        ("score_converter", 8, F.TYPE_ENUM, _OPT, "ScoreConverter"),
    ],
    "TidlMaRetinaNet": [
        *_HEAD_FIELDS,
        *((name, 6 + i, F.TYPE_FLOAT, _OPT, None) for i, name in enumerate(("x_scale", "y_scale"))),
        *((name, 8 + i, F.TYPE_FLOAT, _OPT, None) for i, name in enumerate(("width_scale", "height_scale"))),
        ("score_converter", 10, F.TYPE_ENUM, _OPT, "ScoreConverter"),
        ("anchor_param", 11, F.TYPE_MESSAGE, _OPT, "RetinaNetAnchorParameter"),
        ("detection_output_param", 12, F.TYPE_MESSAGE, _OPT, "DetectionOutputParameter"),
        ("x_offset", 13, F.TYPE_FLOAT, _OPT, None),
        ("y_offset", 14, F.TYPE_FLOAT, _OPT, None),
    ],
    "PriorBoxParameter": [
        ("min_size", 1, F.TYPE_FLOAT, _REP, None),
        ("max_size", 2, F.TYPE_FLOAT, _REP, None),
        ("aspect_ratio", 3, F.TYPE_FLOAT, _REP, None),
        ("flip", 4, F.TYPE_BOOL, _OPT, None),
        ("clip", 5, F.TYPE_BOOL, _OPT, None),
        ("variance", 6, F.TYPE_FLOAT, _REP, None),
        ("step_h", 7, F.TYPE_FLOAT, _OPT, None),
        ("step_w", 8, F.TYPE_FLOAT, _OPT, None),
        ("offset", 9, F.TYPE_FLOAT, _OPT, None),
        ("step", 10, F.TYPE_FLOAT, _OPT, None),
    ],
    "RetinaNetAnchorParameter": [
        ("aspect_ratio", 1, F.TYPE_FLOAT, _REP, None),
        ("octave_base_scale", 2, F.TYPE_FLOAT, _OPT, None),
        ("scales_per_octave", 3, F.TYPE_INT32, _OPT, None),
    ],
    "DetectionOutputParameter": [
        ("num_classes", 1, F.TYPE_UINT32, _OPT, None),
        ("share_location", 2, F.TYPE_BOOL, _OPT, None),
        ("background_label_id", 3, F.TYPE_INT32, _OPT, None),
        ("nms_param", 4, F.TYPE_MESSAGE, _OPT, "NonMaximumSuppressionParameter"),
        ("code_type", 5, F.TYPE_ENUM, _OPT, "CodeType"),
        ("keep_top_k", 6, F.TYPE_INT32, _OPT, None),
        ("confidence_threshold", 7, F.TYPE_FLOAT, _OPT, None),
    ],
    "NonMaximumSuppressionParameter": [
        ("nms_threshold", 1, F.TYPE_FLOAT, _OPT, None),
        ("top_k", 2, F.TYPE_INT32, _OPT, None),
    ],
}
_ENUMS = {
    "ScoreConverter": {"IDENTITY": 0, "SIGMOID": 1, "SOFTMAX": 2},
    "CodeType": {"CORNER": 1, "CENTER_SIZE": 2, "CORNER_SIZE": 3},
}
_CLASSES = message_classes("tidl_meta_arch", _MESSAGES, _ENUMS)
CENTER_SIZE = _ENUMS["CodeType"]["CENTER_SIZE"]
SIGMOID, SOFTMAX = _ENUMS["ScoreConverter"]["SIGMOID"], _ENUMS["ScoreConverter"]["SOFTMAX"]
MetaArch = _CLASSES["TIDLMetaArch"]
# The prototxt's kinds and the `object_detection:meta_arch_type` TIDL knows them by.
META_ARCH_TYPES = {"caffe_ssd": 3, "tidl_retinanet": 5}
# Detection outputs TIDL appends after its post-processing (named in the prototxt's `output`).
DETECTION_OUTPUTS = ("boxes", "labels")
# torchvision clamps the decoded log-size change at log(1000 / 16) before exp(); so does decode().
_SIZE_CLIP = math.log(1000.0 / 16)


def head(arch: Message) -> Message:
    """The one detection head message of `arch` (its caffe_ssd or tidl_retinanet entry)."""
    for kind in META_ARCH_TYPES:
        entries = getattr(arch, kind)
        if len(entries) == 1:
            return entries[0]
    raise ValueError("a meta architecture holds exactly one caffe_ssd or tidl_retinanet entry")


def kind_of(arch: Message) -> str:
    """ "caffe_ssd" or "tidl_retinanet"."""
    return next(kind for kind in META_ARCH_TYPES if len(getattr(arch, kind)) == 1)


def anchors(arch: Message, level_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per level of (H, W), the anchors TIDL builds from `arch`, as (H * W * A, 4) cx, cy, w, h in pixels."""
    spec = head(arch)
    result = []
    for level, (h, w) in enumerate(level_sizes):
        if kind_of(arch) == "caffe_ssd":
            prior = spec.prior_box_param[level]
            step_w, step_h = (prior.step_w, prior.step_h) if prior.HasField("step_w") else (prior.step, prior.step)
            offset_x = offset_y = prior.offset
            sizes = _prior_sizes(prior)
        else:
            step_w, step_h = spec.in_width / w, spec.in_height / h
            offset_x, offset_y = spec.x_offset, spec.y_offset
            sizes = [(sw * step_w, sh * step_h) for sw, sh in _anchor_sizes(spec.anchor_param)]
        ys = (torch.arange(h, dtype=torch.float64) + offset_y) * step_h
        xs = (torch.arange(w, dtype=torch.float64) + offset_x) * step_w
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # location-major, as the heads
        wh = torch.tensor(sizes, dtype=torch.float64)
        result.append(torch.cat([centres.repeat_interleave(len(sizes), dim=0), wh.repeat(h * w, 1)], dim=1).float())
    return result


def _prior_sizes(prior: Message) -> list[tuple[float, float]]:
    ratios = [1.0]
    for r in prior.aspect_ratio:
        if all(abs(r - known) >= 1e-6 for known in ratios):
            ratios.append(r)
            if prior.flip:
                ratios.append(1.0 / r)
    sizes = []
    for i, min_size in enumerate(prior.min_size):
        sizes.append((min_size, min_size))
        if len(prior.max_size) > i:
            side = math.sqrt(min_size * int(prior.max_size[i]))  # TIDL's importer truncates max_size
            sizes.append((side, side))
        sizes += [(min_size * math.sqrt(r), min_size / math.sqrt(r)) for r in ratios if abs(r - 1.0) >= 1e-6]
    return sizes


def _anchor_sizes(param: Message) -> list[tuple[float, float]]:
    """(w, h) in strides, ratio-major (TIDL's anchorbox_order 0)."""
    scales = [param.octave_base_scale * 2.0 ** (i / param.scales_per_octave) for i in range(param.scales_per_octave)]
    return [(s / math.sqrt(r), s * math.sqrt(r)) for r in param.aspect_ratio for s in scales]


def _per_anchor(raw: np.ndarray, k: int) -> torch.Tensor:
    """(N, A * K, H, W) -> (N, H * W * A, K)."""
    t = torch.from_numpy(np.ascontiguousarray(raw))
    n, _, h, w = t.shape
    return t.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


def decode(arch: Message, outputs: Mapping[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
    """Detections per image (boxes x1 y1 x2 y2 in input pixels, scores, labels) from head outputs and `arch` alone."""
    spec = head(arch)
    post = spec.detection_output_param
    classes = post.num_classes
    levels = [(outputs[b], outputs[c]) for b, c in zip(spec.box_input, spec.class_input, strict=True)]
    sizes = [tuple(box.shape[-2:]) for box, _ in levels]
    level_anchors = anchors(arch, sizes)
    if kind_of(arch) == "caffe_ssd":
        weights = tuple(spec.prior_box_param[0].variance)
    else:
        weights = tuple(1.0 / v for v in (spec.x_scale, spec.y_scale, spec.width_scale, spec.height_scale))
    results = []
    for n in range(levels[0][0].shape[0]):
        boxes, scores, labels = [], [], []
        if kind_of(arch) == "caffe_ssd":
            deltas = torch.cat([_per_anchor(box[n : n + 1], 4)[0] for box, _ in levels])
            logits = torch.cat([_per_anchor(cls[n : n + 1], classes)[0] for _, cls in levels])
            decoded = _decode_boxes(deltas, torch.cat(level_anchors), weights, spec)
            probabilities = torch.softmax(logits, dim=-1)
            for label in range(classes):
                if label == post.background_label_id:
                    continue
                score = probabilities[:, label]
                keep = score > post.confidence_threshold
                score, box = score[keep], decoded[keep]
                score, order = score.topk(min(post.nms_param.top_k, score.numel()))
                boxes.append(box[order])
                scores.append(score)
                labels.append(torch.full_like(order, label))
        else:
            for (box, cls), level in zip(levels, level_anchors, strict=True):
                deltas, logits = _per_anchor(box[n : n + 1], 4)[0], _per_anchor(cls[n : n + 1], classes)[0]
                flat = torch.sigmoid(logits).flatten()
                index = torch.where(flat > post.confidence_threshold)[0]
                score, order = flat[index].topk(min(post.nms_param.top_k, index.numel()))
                index = index[order]
                anchor = torch.div(index, classes, rounding_mode="floor")
                boxes.append(_decode_boxes(deltas[anchor], level[anchor], weights, spec))
                scores.append(score)
                labels.append(index % classes)
        box, score, label = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(box, score, label, post.nms_param.nms_threshold)[: post.keep_top_k]
        results.append({"boxes": box[keep], "scores": score[keep], "labels": label[keep]})
    return results


def _decode_boxes(
    deltas: torch.Tensor, anchor: torch.Tensor, weights: tuple[float, ...], spec: Message
) -> torch.Tensor:
    """CENTER_SIZE decoding (multipliers `weights`), clipped to the input image."""
    wx, wy, ww, wh = (torch.tensor(v, dtype=torch.float32) for v in weights)
    cx = deltas[:, 0] * wx * anchor[:, 2] + anchor[:, 0]
    cy = deltas[:, 1] * wy * anchor[:, 3] + anchor[:, 1]
    w = torch.exp(torch.clamp(deltas[:, 2] * ww, max=_SIZE_CLIP)) * anchor[:, 2]
    h = torch.exp(torch.clamp(deltas[:, 3] * wh, max=_SIZE_CLIP)) * anchor[:, 3]
    boxes = box_convert(torch.stack([cx, cy, w, h], dim=1), "cxcywh", "xyxy")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, spec.in_width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, spec.in_height)
    return boxes
