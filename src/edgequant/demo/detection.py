"""Detectors for the digits canvases: torchvision's SSDlite, RetinaNet and FCOS, trained once and cached.

The builders use torchvision's classes with small backbones (no downloaded weights) and
anchors TIDL's meta-architecture prototxt expresses exactly: SSD default boxes with
whole-pixel sizes and no clipping, RetinaNet anchors with whole-pixel half-extents.
Used by the benchmarks, the CLI and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection._utils import retrieve_out_channels
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..core.files import atomic_path
from ..diagnose.detection import mean_average_precision
from .canvases import NUM_CLASSES, canvas_loader
from .training import cache_dir

DETECTORS = ("ssdlite", "retinanet", "fcos")
CANVAS_SIZE = 128
DETECTION_EPOCHS = 24
# Part of the cache key: bump it whenever a builder or the training recipe changes.
DETECTION_RECIPE = "d1"


def build_detector(family: str, size: int = CANVAS_SIZE, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A randomly initialised detector for `size` x `size` canvases (no weights are downloaded)."""
    torch.manual_seed(seed)
    normalize = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    fixed = {"min_size": size, "max_size": size, **normalize}
    if family == "ssdlite":
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # as torchvision's ssdlite320 builder
        backbone = _mobilenet_extractor(mobilenet_v3_large(norm_layer=norm, reduced_tail=True), 6, norm)
        # Six levels of default boxes, whole-pixel sizes from 16 to 112 px (digits are 16-42 px).
        scales = [s / size for s in (16, 32, 48, 64, 80, 96, 112)]
        boxes = DefaultBoxGenerator([[2, 3]] * 6, scales=scales, clip=False)
        channels = retrieve_out_channels(backbone, (size, size))
        head = SSDLiteHead(channels, boxes.num_anchors_per_location(), num_classes, norm)
        return SSD(backbone, boxes, (size, size), num_classes, head=head, **normalize)
    if family not in DETECTORS:
        raise UsageError(f"unknown detector {family!r}; choose from {', '.join(DETECTORS)}")
    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    strides = (8, 16, 32, 64, 128)
    if family == "retinanet":
        # One square anchor of 3 strides per location: half-extents of whole pixels.
        anchors = AnchorGenerator(tuple((3 * s,) for s in strides), ((1.0,),) * len(strides))
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, **fixed)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **fixed)


def train_detector(model: nn.Module, loader: Iterable, epochs: int, lr: float, progress: bool = True) -> None:
    """torchvision's detection loop: SGD with momentum, warm-up then cosine decay; `model` may be a QAT wrapper."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for epoch in tqdm(range(epochs), desc="train detector", disable=None if progress else True):
        model.train()
        for images, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = sum(model(images, targets).values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            schedule.step()
        del epoch
    model.eval()


_LR = {"ssdlite": 0.05, "retinanet": 0.01, "fcos": 0.01}


def float_canvas_detector(family: str, epochs: int = DETECTION_EPOCHS, progress: bool = True) -> nn.Module:
    """A detector trained on the digits canvases; trained once, then loaded from the cache."""
    path = cache_dir() / f"{family}_canvases_e{epochs}_{DETECTION_RECIPE}.pt"
    model = build_detector(family)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train_detector(model, canvas_loader("train"), epochs, _LR[family], progress)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


@torch.no_grad()
def detection_map(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 (percent) of a detector, float or wrapped, over (images, targets) batches."""
    model.eval()
    found, truth = [], []
    for images, targets in loader:
        found += model(images if not isinstance(model, (SSD, RetinaNet, FCOS)) else list(images))
        truth += targets
    return mean_average_precision(found, truth)
