"""Digits on canvases: deterministic, boxes on the ink, splits that do not share digits."""

from __future__ import annotations

import pytest
import torch

from edgequant.core.errors import UsageError
from edgequant.demo.canvases import NUM_CLASSES, canvas_loader, digit_canvases


def test_canvases_are_deterministic_and_boxes_sit_on_ink():
    images, targets = digit_canvases("test", 8, size=96)
    again, _ = digit_canvases("test", 8, size=96)
    assert torch.equal(images, again) and images.shape == (8, 3, 96, 96)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    for image, target in zip(images, targets, strict=True):
        boxes, labels = target["boxes"], target["labels"]
        assert 1 <= len(labels) <= 5 and labels.dtype == torch.int64
        assert int(labels.min()) >= 1 and int(labels.max()) < NUM_CLASSES  # 0 is the background
        assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.max()) <= 96
        for x1, y1, x2, y2 in boxes.int().tolist():
            assert float(image[0, y1:y2, x1:x2].max()) > 0.25  # ink inside every box
    background = images[:, 0].clone()
    for i, target in enumerate(targets):
        for x1, y1, x2, y2 in target["boxes"].int().tolist():
            background[i, y1:y2, x1:x2] = 0
    assert float(background.max()) < 0.25  # and none outside


def test_splits_differ_and_the_loader_batches_targets_as_a_list():
    train, _ = digit_canvases("train", 4)
    calibration, _ = digit_canvases("calibration", 4)
    assert not torch.equal(train, calibration)
    images, targets = next(iter(canvas_loader("test", batch_size=3, count=5)))
    assert images.shape == (3, 3, 128, 128) and isinstance(targets, list) and len(targets) == 3


def test_bad_arguments():
    with pytest.raises(UsageError, match="split must be one of train, calibration, test"):
        digit_canvases("val")
    with pytest.raises(UsageError, match="at least 48"):
        digit_canvases("train", 2, size=32)
