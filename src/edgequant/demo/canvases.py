"""Digits on canvases: a small object-detection task built from scikit-learn's digits (no download).

Each canvas is a grey square with background noise and 1 to 5 digits pasted at random
sizes and positions (some overlap). Targets are torchvision's detection format: per
image a dict of `boxes` (float, x1 y1 x2 y2 in pixels, the digit's inked extent) and
`labels` (int64, digit + 1: label 0 is the background class SSD reserves, so every
detector takes ``num_classes=NUM_CLASSES``).

Splits are fixed: ``train`` and ``calibration`` canvases use the digits of the
classification training split (different canvases), ``test`` canvases the held-out
digits only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou

from ..core.errors import UsageError
from .data import digits_tensors

NUM_CLASSES = 11  # background + the ten digits
SPLITS = {"train": ("train", 0), "calibration": ("train", 1), "test": ("test", 2)}
DEFAULT_COUNTS = {"train": 512, "calibration": 128, "test": 128}
MAX_OVERLAP = 0.2  # IoU of a new digit with any placed one
Target = dict[str, torch.Tensor]


def _digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors(split, size=8)
    return (x[:, 0] + 1) / 2, y  # back to [0, 1], one channel


def _paste(canvas: torch.Tensor, digit: torch.Tensor, size: int, left: int, top: int) -> list[float]:
    patch = F.interpolate(digit[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    patch = patch.clamp(0, 1)
    region = canvas[top : top + size, left : left + size]
    torch.maximum(region, patch, out=region)
    ink = (patch > 0.25).nonzero()
    (y1, x1), (y2, x2) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
    return [left + x1, top + y1, left + x2 + 1, top + y2 + 1]


def digit_canvases(
    split: str, count: int | None = None, size: int = 128, max_digits: int = 5
) -> tuple[torch.Tensor, list[Target]]:
    """`count` canvases of `size` x `size` as a (count, 3, size, size) batch in [0, 1], and their targets."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if size < 48:
        raise UsageError(f"canvas size must be at least 48 pixels (digits are pasted at 16 to size / 3); got {size}")
    digits_split, seed = SPLITS[split]
    count = DEFAULT_COUNTS[split] if count is None else count
    digits, classes = _digit_images(digits_split)
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        canvas = torch.rand(size, size, generator=g) * 0.15
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, max_digits + 1, (), generator=g))):
            for _attempt in range(10):  # some overlap, never a digit hidden under another
                side = int(torch.randint(16, max(17, size // 3), (), generator=g))
                left, top = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
                place = torch.tensor([[left, top, left + side, top + side]], dtype=torch.float32)
                if not boxes or float(box_iou(place, torch.tensor(boxes)).max()) <= MAX_OVERLAP:
                    break
            else:
                continue
            k = int(torch.randint(0, len(digits), (), generator=g))
            boxes.append(_paste(canvas, digits[k], side, left, top))
            labels.append(int(classes[k]) + 1)
        images.append(canvas.expand(3, size, size))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return torch.stack(images).contiguous(), targets


class CanvasDataset(Dataset):
    """(image, target) pairs of one split, as torchvision's detection references read them."""

    def __init__(self, split: str, count: int | None = None, size: int = 128) -> None:
        self.images, self.targets = digit_canvases(split, count, size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.images[index], self.targets[index]


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """Images stacked into one batch tensor (all canvases share a size), targets as a list."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def canvas_loader(
    split: str, batch_size: int = 16, count: int | None = None, size: int = 128, shuffle: bool | None = None
) -> DataLoader:
    """A DataLoader of (images, targets) batches; shuffles the training split unless told otherwise."""
    shuffle = split == "train" if shuffle is None else shuffle
    dataset, generator = CanvasDataset(split, count, size), torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
