"""Float training and evaluation on the digits task, with a checkpoint cache.

Used by the demo, the benchmarks and the tests, so that all of them start from the
same digits-trained models without downloading weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..core.files import atomic_path
from ..export.runtime import run_onnx, session
from ..surgery.distill import recompute_bn_statistics
from .data import NUM_CLASSES, digits_loader


def cache_dir() -> Path:
    """Where trained float checkpoints live: $EDGEQUANT_CACHE or ~/.cache/edgequant."""
    root = os.environ.get("EDGEQUANT_CACHE") or Path.home() / ".cache" / "edgequant"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_model(name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A randomly initialised torchvision classifier, or timm's with a ``timm:`` prefix (never downloaded)."""
    torch.manual_seed(seed)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UsageError(f"{name} needs timm: pip install -e '.[zoo]'") from None
        if name[5:] not in timm.list_models():
            raise UsageError(f"unknown timm model {name[5:]!r}")
        return timm.create_model(name[5:], pretrained=False, num_classes=num_classes)
    try:
        factory = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UsageError(f"unknown torchvision model {name!r}") from None
    return factory(weights=None, num_classes=num_classes)


def train_epochs(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    desc: str = "train",
) -> None:
    """A plain classification loop; `model` may be a float model or a QATModule."""
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        for x, y in tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()


@torch.no_grad()
def accuracy(model: nn.Module | Callable, loader: Iterable) -> float:
    """Top-1 accuracy in percent."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def onnx_accuracy(path: str | os.PathLike, loader: Iterable) -> float:
    """Top-1 accuracy in percent of an ONNX file, run in onnxruntime."""
    sess = session(str(path))
    correct = total = 0
    for x, y in loader:
        (logits,) = run_onnx(sess, (x,))[:1]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


# Per-model peak learning rate of the default recipe; regnet prefers a gentler one.
_PEAK_LR = {"regnet_x_400mf": 0.02}
FLOAT_EPOCHS = 15
# Part of the default recipe's cache key: bump it whenever that recipe changes.
RECIPE = "r2"


@dataclass(frozen=True)
class FloatRecipe:
    """How a float digits model is trained: the recipes users really run, as data.

    Quantization results depend on the checkpoint as much as on the method, so the
    benchmarks measure populations of checkpoints trained in several of these ways.
    ``lr`` None takes the default per-model peak learning rate.
    """

    name: str
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adam"
    lr: float | None = None
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    one_cycle: bool = True
    epochs: int = FLOAT_EPOCHS
    seed: int = 0

    def peak_lr(self, model_name: str) -> float:
        return self.lr if self.lr is not None else _PEAK_LR.get(model_name, 0.05)

    def cache_name(self, model_name: str) -> str:
        if self.name == "default":  # the file name checkpoints have always had
            return f"{model_name.replace(':', '_')}_digits_e{self.epochs}_{RECIPE}.pt"
        length = "" if self.epochs == FLOAT_EPOCHS else f"_e{self.epochs}"
        return f"{model_name.replace(':', '_')}_digits_{self.name}{length}_{RECIPE}.pt"


DEFAULT_RECIPE = FloatRecipe("default")
# The population of the benchmarks: each recipe is one a user might have trained with.
RECIPES: dict[str, FloatRecipe] = {
    r.name: r
    for r in (
        DEFAULT_RECIPE,
        # Ten times the peak learning rate: kills channels (dead ReLUs, BN variance 0).
        FloatRecipe("high_lr", lr=0.5),
        # Adam without weight decay: outlier weights, wide per-tensor ranges.
        FloatRecipe("adam_no_wd", optimizer="adam", lr=1e-3, weight_decay=0.0, label_smoothing=0.0),
        # A short run: weights far from converged (3 epochs left mnasnet at chance).
        FloatRecipe("short", epochs=6),
        # Another seed, no label smoothing: more confident logits.
        FloatRecipe("seed1_no_ls", label_smoothing=0.0, seed=1),
    )
}


def _shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to `pixels`, the only augmentation the digits need."""
    padded = torch.nn.functional.pad(x, (pixels,) * 4, mode="replicate")
    i, j = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, i : i + x.shape[2], j : j + x.shape[3]]


class Shifted:
    """A digits loader whose images are randomly shifted each pass: the augmentation of float training."""

    def __init__(self, loader: DataLoader, seed: int = 0) -> None:
        self.loader = loader
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield _shift(x, self.generator), y


def float_digits_model(
    name: str, epochs: int = FLOAT_EPOCHS, progress: bool = True, recipe: FloatRecipe | str = DEFAULT_RECIPE
) -> nn.Module:
    """A torchvision model trained on digits; trained once, then loaded from the cache.

    The default recipe follows docs/guidelines.md: SGD with momentum, weight decay 5e-4
    on all parameters, one-cycle learning rate, light label smoothing and random shifts;
    `epochs` overrides its length. Other recipes (`RECIPES`) train as they say.
    """
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    if recipe == DEFAULT_RECIPE:
        recipe = replace(recipe, epochs=epochs)
    path = cache_dir() / recipe.cache_name(name)
    model = build_model(name, seed=recipe.seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    loader = digits_loader("train", batch_size=64)
    lr = recipe.peak_lr(name)
    if recipe.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=recipe.weight_decay, nesterov=True
        )
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=recipe.epochs, steps_per_epoch=len(loader))
        if recipe.one_cycle
        else None
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    desc = f"float {name}" + ("" if recipe == DEFAULT_RECIPE else f" ({recipe.name})")
    for _ in tqdm(range(recipe.epochs), desc=desc, disable=None if progress else True):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(_shift(x, generator)), y).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    # Exact statistics: mobilenet_v3's BN momentum of 0.01 ends a short run far from the data's.
    recompute_bn_statistics(model, (x for x, _ in loader))
    model.eval()
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model
