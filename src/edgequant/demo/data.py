"""scikit-learn's bundled digits as a small image-classification task (no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from ..core.errors import UsageError

NUM_CLASSES = 10
TEST_FRACTION = 0.2  # 360 of the 1797 images


def digits_tensors(split: str, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as (N, 3, size, size) floats normalised to [-1, 1], and labels.

    The 8x8 grey digits are upsampled bilinearly and repeated to 3 channels so that
    torchvision models run on them unchanged.
    """
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels.numpy())
    chosen = torch.as_tensor(train_idx if split == "train" else test_idx)
    x = images[chosen].unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return x.repeat(1, 3, 1, 1).contiguous(), labels[chosen]


def digits_loader(
    split: str, batch_size: int = 64, size: int = 32, shuffle: bool | None = None, limit: int | None = None
) -> DataLoader:
    """A DataLoader over one split; shuffles the training split unless told otherwise."""
    x, y = digits_tensors(split, size)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    shuffle = split == "train" if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)
