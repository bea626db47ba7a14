"""Detectors: torchvision's SSD, RetinaNet and FCOS with a quantized network and float post-processing.

The engine runs a detector in two parts: the network, from the normalized image batch
to the raw outputs of the head convolutions (per pyramid level, box regression and
class logits, shape (N, anchors * K, H, W)), and its own post-processing (anchor
decoding, score threshold, NMS) that reads those outputs. edgequant quantizes the
first part, `DetectionCore`, and keeps the rest in float, as torchvision computes it:
the wrapper runs torchvision's own `forward` with the backbone and head swapped for
the quantized core, so eval returns torchvision's list of dicts (boxes, scores,
labels) and training with targets returns torchvision's loss dict.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from google.protobuf.message import Message
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_convert

from ..core.errors import InputShapeError, MetaArchWarning, UsageError
from ..export import meta_arch
from ..export.meta_arch import CENTER_SIZE, DETECTION_OUTPUTS, SIGMOID, SOFTMAX, MetaArch
from ..export.runtime import run_onnx, session

if TYPE_CHECKING:
    from ..export.onnx import ExportResult

# The PTQ or QAT wrapper of a detector's network (base.QuantWrapper, which imports this module).
QuantWrapper = nn.Module

# Per family, the head outputs in the core's order: (ONNX name, torchvision's head_outputs key,
# values per anchor; None: the number of classes).
OUTPUTS: dict[str, tuple[tuple[str, str, int | None], ...]] = {
    "ssd": (("box", "bbox_regression", 4), ("cls", "cls_logits", None)),
    "retinanet": (("box", "bbox_regression", 4), ("cls", "cls_logits", None)),
    "fcos": (("box", "bbox_regression", 4), ("cls", "cls_logits", None), ("ctr", "bbox_ctrness", 1)),
}
_FAMILIES = ((SSD, "ssd"), (RetinaNet, "retinanet"), (FCOS, "fcos"))
# The export's check of the prototxt: TIDL's anchors and decoded detections against torchvision's.
ANCHOR_TOLERANCE = BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-5
# Quantized scores tie exactly, and NMS orders ties as its implementation does: a tied box can
# survive in one engine and not the other. Below this share of reproduced detections, export warns.
REPRODUCED = 0.99


def detector_family(model: nn.Module) -> str | None:
    """ "ssd", "retinanet" or "fcos" for a torchvision detector of those classes, else None.

    Two-stage detectors are refused here, with the reason, rather than failing in capture.
    """
    for cls, family in _FAMILIES:
        if isinstance(model, cls):
            return family
    if isinstance(model, GeneralizedRCNN):
        raise UsageError(
            f"{type(model).__name__} is a two-stage detector, which edgequant does not quantize (TIDL has no "
            "meta architecture for its region proposals): use torchvision's SSD, SSDlite, RetinaNet or FCOS"
        )
    return None


def _num_classes(detector: nn.Module, family: str) -> int:
    head = detector.head.classification_head
    if family == "ssd":
        return head.num_columns
    return head.num_classes


class DetectionCore(nn.Module):
    """The quantized part of a detector: normalized images -> raw head outputs per level.

    Returns a dict `box_0, cls_0, (ctr_0,) box_1, ...` of (N, anchors * K, H, W) tensors,
    the outputs of the last convolutions, which the engine's post-processing reads (the
    names become the ONNX output names). The detector's modules are shared, not copied.
    """

    def __init__(self, detector: nn.Module, family: str) -> None:
        super().__init__()
        self.family = family
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        levels = [features] if isinstance(features, torch.Tensor) else list(features.values())
        outputs: dict[str, torch.Tensor] = {}
        for i, feature in enumerate(levels):
            for name, value in zip((o[0] for o in OUTPUTS[self.family]), self._level(i, feature), strict=True):
                outputs[f"{name}_{i}"] = value
        return outputs

    def _level(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls_head, box_head = self.head.classification_head, self.head.regression_head
        if self.family == "ssd":
            return box_head.module_list[i](x), cls_head.module_list[i](x)
        if self.family == "retinanet":
            return box_head.bbox_reg(box_head.conv(x)), cls_head.cls_logits(cls_head.conv(x))
        feature = box_head.conv(x)  # FCOS: box and centerness share the regression tower
        return F.relu(box_head.bbox_reg(feature)), cls_head.cls_logits(cls_head.conv(x)), box_head.bbox_ctrness(feature)


class _QuantizedFeatures(nn.Module):
    """Stands in for the detector's backbone: runs the quantized core and hands each level's outputs on.

    torchvision reads only the height and width of each "feature" (anchors, level sizes), so
    a level's raw outputs travel concatenated along channels to `_HeadOutputs`.
    """

    def __init__(self, quantized: QuantWrapper, names: tuple[str, ...], levels: int) -> None:
        super().__init__()
        self.quantized = quantized
        self.names, self.levels = names, levels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = self.quantized(images)
        return OrderedDict(
            (str(i), torch.cat([out[f"{name}_{i}"] for name in self.names], dim=1)) for i in range(self.levels)
        )


class _HeadOutputs(nn.Module):
    """Stands in for the detector's head: the core's raw outputs in torchvision's (N, sum HWA, K) layout."""

    def __init__(self, head: nn.Module, outputs: tuple[tuple[str, int], ...], channels: list[list[int]]) -> None:
        super().__init__()
        self.outputs = outputs  # (torchvision key, values per anchor)
        self.channels = channels  # per level, the channels of each output
        self.__dict__["_head"] = head  # for its losses only: kept out of parameters() and state_dict()

    def compute_loss(self, *args: Any) -> Any:
        """The original head's losses (RetinaNet, FCOS), on the quantized outputs."""
        return self._head.compute_loss(*args)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        per_key: list[list[torch.Tensor]] = [[] for _ in self.outputs]
        for level, packed in zip(self.channels, features, strict=True):
            for i, (part, (_, k)) in enumerate(zip(packed.split(level, dim=1), self.outputs, strict=True)):
                n, _, h, w = part.shape
                # (N, A * K, H, W) -> (N, H * W * A, K), as torchvision's heads reshape.
                per_key[i].append(part.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        return {key: torch.cat(parts, dim=1) for (key, _), parts in zip(self.outputs, per_key, strict=True)}


def images_of(batch: object) -> Any:
    """The images of a detection batch: a tensor or list of images, or the first item of (images, targets)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor) and first.dim() == 3:
            return batch  # a list of images
        if isinstance(first, torch.Tensor) or (isinstance(first, (tuple, list)) and first):
            return first
    raise UsageError(
        "detection batches must be images (a (N, 3, H, W) tensor or a list of (3, H, W) tensors) or "
        f"(images, targets) pairs; got {type(batch).__name__}"
    )


class DetectionModule(nn.Module):
    """A torchvision detector whose network runs quantized; made by `eq.PTQModule` / `eq.QATModule`.

    `forward(images, targets=None)` is torchvision's: in eval, a list of dicts (boxes,
    scores, labels); in train mode with targets (QAT), the loss dict. Calibration,
    export, checkpoints and `convert()` concern the quantized core, `self.quantized`.
    """

    def __init__(
        self,
        detector: nn.Module,
        family: str,
        quantized: QuantWrapper,
        trains: bool,
        levels: list[tuple[tuple[int, int], list[int]]],
    ) -> None:
        super().__init__()
        self.family = family
        self.trains = trains
        self.level_sizes = [size for size, _ in levels]
        channels = [counts for _, counts in levels]
        names = tuple(name for name, _, _ in OUTPUTS[family])
        self.num_classes = classes = _num_classes(detector, family)
        outputs = tuple((key, classes if k is None else k) for _, key, k in OUTPUTS[family])
        view = copy.copy(detector)  # torchvision's forward, our backbone and head
        view._modules = dict(detector._modules)
        view.backbone = _QuantizedFeatures(quantized, names, len(channels))
        view.head = _HeadOutputs(detector.head, outputs, channels)
        view.transform = copy.deepcopy(detector.transform)
        view.anchor_generator = copy.deepcopy(detector.anchor_generator)
        self.detector = view
        # Calibration and export see images as eval mode transforms them (no random resize).
        self.__dict__["_transform"] = copy.deepcopy(detector.transform).eval()

    @property
    def quantized(self) -> QuantWrapper:
        """The PTQ or QAT wrapper of the network (`DetectionCore`)."""
        return self.detector.backbone.quantized

    @property
    def scheme(self) -> Any:
        return self.quantized.scheme

    def core_inputs(self, images: Any) -> torch.Tensor:
        """The normalized, resized image batch the quantized network takes (the detector's transform, eval mode)."""
        return network_inputs(self._transform, images)

    def _core_batches(self, data: Iterable) -> Iterator[torch.Tensor]:
        for batch in data:
            yield self.core_inputs(images_of(batch))

    def forward(self, images: Any, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if self.training and not self.trains:
            raise UsageError(
                "a PTQ detector is calibrated, not trained: call calibrate(data) and evaluate in eval mode, "
                "or wrap the float detector with eq.QATModule to train it"
            )
        if self.training and targets is None:
            raise UsageError("in train mode a detector returns its losses and needs targets: forward(images, targets)")
        if not self.training and targets is not None:
            raise UsageError(
                "targets are for training: in eval mode the detector returns detections; "
                "call .train() for the loss dict"
            )
        if isinstance(images, torch.Tensor) and images.dim() != 4:
            raise UsageError(
                f"images must be a (N, 3, H, W) tensor or a list of (3, H, W) tensors; got {tuple(images.shape)}"
            )
        try:
            return self.detector(images, targets)
        except InputShapeError as error:
            sizes = sorted({tuple(x.shape[-2:]) for x in images})
            captured = tuple(self.quantized.example_inputs[0].shape[-2:])
            raise InputShapeError(
                f"images of size {', '.join(f'{h}x{w}' for h, w in sizes)} become a batch the quantized network was "
                f"not captured for (it takes {captured[0]}x{captured[1]} after the detector's transform): pass "
                "example_inputs at the size you deploy, and images of one size"
            ) from error

    def calibrate(self, data: Iterable, skip_nonfinite: bool = False, progress: bool = True) -> DetectionModule:
        """`PTQModule.calibrate` on the images of `data` ((images, targets) batches or images), transformed."""
        if self.trains:
            raise UsageError("a QAT detector starts from calibration_data=... at construction, not calibrate()")
        self.quantized.calibrate(list(self._core_batches(data)), skip_nonfinite, progress)
        return self.eval()

    def convert(self) -> Any:
        """The integer network (`DetectionCore`), as `PTQModule.convert`."""
        return self.quantized.convert()

    def export(
        self, path: str | os.PathLike, opset: int | None = None, device: str | None = None, batch: int = 1
    ) -> ExportResult:
        """The quantized network as QDQ ONNX (outputs `box_i`, `cls_i`, ...) and TIDL's files, checked.

        For SSD and RetinaNet the files include TIDL's meta-architecture prototxt, and the
        export decodes the file's head outputs (onnxruntime) with nothing but that prototxt
        and compares the detections with torchvision's post-processing of the same outputs
        (`result.detection_check`). FCOS has no TIDL meta architecture: its post-processing
        runs on the host, after the heads.
        """
        arch = self.meta_arch()
        if arch is None:
            warnings.warn(
                MetaArchWarning(
                    f"TIDL has no meta architecture for {self.family.upper()}: the exported model ends at the head "
                    "outputs and its post-processing (decoding, NMS) runs on the host"
                ),
                stacklevel=2,
            )
        else:
            self._warn_on_anchor_mismatch(arch)
        result = self.quantized.export(path, opset, device, batch, meta_arch=arch)
        if arch is None:
            return result
        return replace(result, detection_check=self._check_decoder(arch, result))

    def meta_arch(self) -> Message | None:
        """TIDL's meta-architecture message for this detector (None for FCOS, which TIDL lacks)."""
        if self.family == "fcos":
            return None
        view = self.detector
        height, width = self.quantized.example_inputs[0].shape[-2:]
        arch = MetaArch(name=self.family)
        spec = (arch.caffe_ssd if self.family == "ssd" else arch.tidl_retinanet).add()
        levels = range(len(self.level_sizes))
        spec.box_input.extend(f"box_{i}" for i in levels)
        spec.class_input.extend(f"cls_{i}" for i in levels)
        spec.output.extend(DETECTION_OUTPUTS)
        spec.in_width, spec.in_height = width, height
        post = spec.detection_output_param
        post.num_classes = self.num_classes
        post.share_location = True
        post.code_type = CENTER_SIZE
        post.confidence_threshold = view.score_thresh
        post.nms_param.nms_threshold = view.nms_thresh
        post.nms_param.top_k = view.topk_candidates
        post.keep_top_k = view.detections_per_img
        weights = view.box_coder.weights
        if self.family == "ssd":
            post.background_label_id = 0  # torchvision's SSD keeps class 0 for the background
            spec.score_converter = SOFTMAX
            generator = view.anchor_generator
            for k, (h, w) in enumerate(self.level_sizes):
                prior = spec.prior_box_param.add()
                prior.min_size.append(generator.scales[k] * width)
                prior.max_size.append(generator.scales[k + 1] * width)
                prior.aspect_ratio.extend(generator.aspect_ratios[k])
                prior.flip, prior.clip, prior.offset = True, False, 0.5
                prior.variance.extend(1.0 / v for v in weights)
                steps = generator.steps
                step_w, step_h = (steps[k], steps[k]) if steps else (width / w, height / h)
                if step_w == step_h:
                    prior.step = step_w
                else:
                    prior.step_w, prior.step_h = step_w, step_h
        else:
            post.background_label_id = -1  # sigmoid scores: no background class
            spec.score_converter = SIGMOID
            spec.x_scale, spec.y_scale, spec.width_scale, spec.height_scale = weights
            sizes = view.anchor_generator.sizes[0]
            stride = width // self.level_sizes[0][1]
            spec.anchor_param.aspect_ratio.extend(view.anchor_generator.aspect_ratios[0])
            spec.anchor_param.octave_base_scale = sizes[0] / stride
            spec.anchor_param.scales_per_octave = len(sizes)
        return arch

    def _torchvision_anchors(self, images: torch.Tensor) -> list[torch.Tensor]:
        """torchvision's anchors (x1 y1 x2 y2) for a batch of network inputs."""
        features = [images.new_zeros(1, 1, h, w) for h, w in self.level_sizes]
        image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
        return self.detector.anchor_generator(image_list, features)

    def _warn_on_anchor_mismatch(self, arch: Message) -> None:
        ours = torch.cat(meta_arch.anchors(arch, self.level_sizes))
        theirs = self._torchvision_anchors(self.quantized.example_inputs[0][:1])[0]
        diff = (box_convert(ours, "cxcywh", "xyxy") - theirs).abs().amax(dim=1)
        off = int((diff > ANCHOR_TOLERANCE).sum())
        if off:
            reason = (
                "torchvision clamps default boxes to the image (DefaultBoxGenerator(clip=True)); build it with "
                "clip=False"
                if self.family == "ssd"
                else "torchvision rounds anchor corners to whole pixels; anchor sizes whose half-extents are whole "
                "pixels (e.g. aspect ratios 0.25, 1, 4 with sizes divisible by 4) agree exactly"
            )
            warnings.warn(
                MetaArchWarning(
                    f"{off} of {len(diff)} anchors TIDL builds from the prototxt differ from torchvision's by up to "
                    f"{float(diff.max()):.3g} px, so the deployed detections can differ from eval's: {reason}"
                ),
                stacklevel=3,
            )

    def _check_decoder(self, arch: Message, result: ExportResult) -> str:
        inputs = self.quantized.parity_inputs()[0]
        sess = session(str(result.path))
        outputs = dict(zip((o.name for o in sess.get_outputs()), run_onnx(sess, (inputs,)), strict=True))
        decoded = meta_arch.decode(arch, outputs)
        reference = self.postprocess({k: torch.from_numpy(v) for k, v in outputs.items()}, inputs)
        found = sum(len(theirs["scores"]) for theirs in reference)
        matched = sum(_matches(ours, theirs) for ours, theirs in zip(decoded, reference, strict=True))
        agree = matched >= REPRODUCED * found
        text = (
            f"TIDL post-processing from {result.deploy.meta_arch.name}: {matched} of {found} torchvision detections "
            f"on {inputs.shape[0]} images reproduced (same label, box within {BOX_TOLERANCE:g} px, score within "
            f"{SCORE_TOLERANCE:g})"
        )
        if not agree:
            warnings.warn(MetaArchWarning(f"{text}: the deployed detections differ from eval's"), stacklevel=3)
        return text

    def postprocess(self, outputs: dict[str, torch.Tensor], images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's own post-processing of head outputs, in network-input pixels (no resize back)."""
        view = self.detector
        names = [name for name, _, _ in OUTPUTS[self.family]]
        features = [torch.cat([outputs[f"{n}_{i}"] for n in names], dim=1) for i in range(len(self.level_sizes))]
        head_outputs = view.head(features)
        anchors = self._torchvision_anchors(images)
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        if self.family == "ssd":
            return view.postprocess_detections(head_outputs, anchors, sizes)
        per_level = [h * w for h, w in self.level_sizes]
        per_level = [n * (head_outputs["cls_logits"].shape[1] // sum(per_level)) for n in per_level]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        return view.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], sizes)

    def save(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The quantized network's checkpoint (see `QuantWrapper.save`)."""
        return self.quantized.save(path, optimizer)

    def load(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> DetectionModule:
        """Load a checkpoint written by `save()`."""
        self.quantized.load(path, optimizer)
        return self


def _matches(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> int:
    """How many of `theirs` detections `ours` has too: same label, box and score within the tolerances."""
    if not len(theirs["scores"]) or not len(ours["scores"]):
        return 0
    close = (theirs["boxes"][:, None] - ours["boxes"][None]).abs().amax(dim=-1) <= BOX_TOLERANCE
    close &= (theirs["scores"][:, None] - ours["scores"][None]).abs() <= SCORE_TOLERANCE
    close &= theirs["labels"][:, None] == ours["labels"][None]
    return int(close.any(dim=1).sum())


@torch.no_grad()
def network_inputs(transform: nn.Module, images: Any) -> torch.Tensor:
    """The batch a detector's (eval-mode) transform makes of `images`: what its quantized network takes."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = [images]
    return transform(list(images))[0].tensors


def wrap_detector(cls: type, detector: nn.Module, family: str, *args: Any, **kwargs: Any) -> DetectionModule:
    """`cls(detector, example_inputs, ...)` for a torchvision detector: the wrapper of its core, in a DetectionModule.

    example_inputs are images at the deployment size (a (N, 3, H, W) tensor in [0, 1], as
    torchvision detectors take them); calibration data is mapped through the detector's
    transform like every later batch.
    """
    bound = inspect.signature(cls.__init__).bind(None, detector, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    example = arguments.get("example_inputs")
    if not isinstance(example, (tuple, list)) or len(example) != 1:
        raise UsageError("a detector takes example_inputs=(images,): one (N, 3, H, W) batch at the deployment size")
    images = images_of(example[0]) if not isinstance(example[0], torch.Tensor) else example[0]
    transform = copy.deepcopy(detector.transform).eval()
    core_images = network_inputs(transform, images)
    core = DetectionCore(detector, family)
    arguments["model"] = core
    arguments["example_inputs"] = (core_images,)
    if arguments.get("calibration_data") is not None:
        data = arguments["calibration_data"]
        arguments["calibration_data"] = [network_inputs(transform, images_of(batch)) for batch in data]
    quantized = cls(**arguments)
    trains = bool(getattr(cls, "trains", False))
    module = DetectionModule(detector, family, quantized, trains, _levels(core, core_images[:1]))
    return module if trains and quantized.training else module.eval()


@torch.no_grad()
def _levels(core: DetectionCore, images: torch.Tensor) -> list[tuple[tuple[int, int], list[int]]]:
    """Per level, (H, W) and the channels of each head output, from one float pass in eval mode."""
    modes = {m: m.training for m in core.modules()}
    core.eval()
    try:
        out = core(images)
    finally:
        for m, mode in modes.items():
            m.training = mode
    names = [name for name, _, _ in OUTPUTS[core.family]]
    return [
        (tuple(out[f"{names[0]}_{i}"].shape[-2:]), [out[f"{name}_{i}"].shape[1] for name in names])
        for i in range(len(out) // len(names))
    ]
