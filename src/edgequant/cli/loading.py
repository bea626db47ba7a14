"""Turn command-line words into a model, its weights and its data.

The command line names a model as ``torchvision:NAME`` or ``package.module:factory``
(also ``path/to/file.py:factory``), weights as a checkpoint file, and data as an image
folder in torchvision's ImageFolder layout or the word ``digits``. Each failure raises
an error that says what was given, what is wrong with it and what to do.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..core.errors import UsageError
from ..demo.data import NUM_CLASSES as DIGITS_CLASSES
from ..demo.data import digits_tensors
from ..wrappers.checkpoint import missing_and_unexpected, strip_wrapper_prefixes

DIGITS = "digits"
DIGITS_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
# Keys under which training scripts commonly nest the state_dict in a checkpoint.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
MAX_LISTED = 8


class ModelSpecError(UsageError):
    """A MODEL argument that does not name a model we can build."""


class WeightsError(UsageError):
    """A checkpoint that cannot be loaded into the model."""


class DataError(UsageError):
    """A data argument that yields no usable images."""


def _import_module(name: str) -> object:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ModelSpecError(f"model file {name} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    # A console script does not put the working directory on sys.path; `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise ModelSpecError(
                f"cannot import module {name!r}: no module named {error.name!r}; run from the folder that "
                "holds your package, install it, or add it to PYTHONPATH"
            ) from None
        raise


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = torchvision.models.list_models()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise ModelSpecError(f"torchvision has no model {name!r}; {hint}") from None
    kwargs: dict[str, object] = {"weights": None}
    # Segmentation and detection builders download backbone weights unless told not to.
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return builder(**kwargs)


def _factory_model(spec: str, module_name: str, attr: str, num_classes: int | None) -> nn.Module:
    target = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(target).__name__}, not a model factory")
    try:
        model = target() if num_classes is None else target(num_classes=num_classes)
    except TypeError as error:
        if num_classes is not None and "num_classes" in str(error):
            raise ModelSpecError(
                f"model spec {spec!r}: {attr}() takes no num_classes argument; drop --num-classes"
            ) from None
        raise
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, not a torch nn.Module")
    return model


def is_model_file(spec: str) -> bool:
    """Whether a MODEL argument names a file holding a whole model (``adapted.pt``)."""
    return spec.endswith((".pt", ".pth")) and ":" not in spec


def _pickled_model(path: Path) -> nn.Module:
    """A whole model saved with torch.save(model, path); only load files you trust (it runs pickle)."""
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{path} holds a {type(model).__name__}, not a whole model; a state_dict goes with --weights and "
            "a MODEL such as torchvision:NAME"
        )
    return model.eval()


def resolve_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build the model a MODEL argument names, in eval mode, never downloading weights.

    ``torchvision:NAME`` builds a torchvision model with random weights and
    ``num_classes`` outputs (torchvision's default when None). ``module:factory`` imports
    the module (``path/to/file.py`` works too) and calls ``factory()``, passing
    ``num_classes`` only when it is given; the attribute may also be a model instance.
    A ``.pt`` file holding a whole pickled model (as `edgequant adapt` writes) is loaded.
    """
    if is_model_file(spec):
        return _pickled_model(Path(spec))
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r} should look like torchvision:resnet18 or package.module:factory")
    if module_name == "torchvision":
        model = _torchvision_model(attr, num_classes)
    else:
        model = _factory_model(spec, module_name, attr, num_classes)
    return model.eval()


def _state_dict_of(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in NESTED_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"checkpoint {path} holds no state_dict; save one with torch.save(model.state_dict(), path)")
    return strip_wrapper_prefixes(checkpoint)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into `model` strictly; a mismatch names the keys that differ.

    Accepts a plain state_dict, one nested under a common key ("state_dict", "model",
    ...), and keys prefixed by DistributedDataParallel ("module.").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"cannot read checkpoint {path} as weights ({reason}); save it with torch.save(model.state_dict(), path)"
        ) from None
    state = _state_dict_of(checkpoint, path)
    expected = model.state_dict()
    missing, unexpected = missing_and_unexpected(expected, state)
    mismatched = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise WeightsError(
            f"checkpoint {path} does not match the model; "
            + "; ".join(problems)
            + " (check the model spec and --num-classes)"
        )
    model.load_state_dict(state)
    return model.eval()


@dataclass(frozen=True)
class ImageData:
    """A loader over labelled images, and how many classes its labels index."""

    loader: DataLoader
    num_classes: int
    description: str

    @property
    def size(self) -> int:
        return len(self.loader.dataset)


def _subset(dataset: Dataset, limit: int | None) -> Dataset:
    """At most `limit` samples, drawn at random (with a fixed seed) so that every class can appear."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise UsageError(f"the sample limit must be at least 1, got {limit}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(order[:limit].tolist()))


RESIZE_MODES = ("crop", "none")


class _AtLeast:
    """Refuse an image smaller than the crop: with resize="none", CenterCrop would pad it with zeros."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        if min(width, height) < self.size:
            raise DataError(
                f"an image is {width}x{height}, smaller than --input-size {self.size}; with --resize none the "
                "images must be at least that size (or use --resize crop)"
            )
        return image


def image_folder_loader(
    root: str | os.PathLike,
    image_size: int = DEFAULT_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 32,
    limit: int | None = None,
    shuffle: bool = False,
    resize: str = "crop",
) -> ImageData:
    """Images from ``root/<class>/<image>``, center-cropped to ``image_size`` and normalized.

    ``resize="crop"`` first resizes the short side to ``round(image_size * 8/7)``, the
    usual ImageNet evaluation (a 224 crop of a 256 image); ``"none"`` leaves images at
    their own size, for data already at the input size (smaller images raise).
    """
    from torchvision import transforms

    if resize not in RESIZE_MODES:
        raise UsageError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    steps = [transforms.Resize(round(image_size * 8 / 7))] if resize == "crop" else [_AtLeast(image_size)]
    transform = transforms.Compose(
        [
            *steps,
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )
    layout = f"expected the ImageFolder layout {root}/<class name>/<image>.jpg"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        loose = sorted(p.name for p in root.iterdir() if p.is_file())
        found = f"only files ({_listed(loose)})" if loose else "nothing"
        raise DataError(f"data folder {root} has no class folders, {found}; {layout}")
    try:
        dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError:
        raise DataError(
            f"data folder {root} has class folders ({_listed(classes)}) but no images in them; {layout}"
        ) from None
    dataset = _subset(dataset, limit)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
    classes = len(getattr(dataset, "dataset", dataset).classes)
    return ImageData(loader, classes, f"{root} ({len(dataset)} images, {classes} classes)")


def digits_data(
    split: str, image_size: int = DIGITS_SIZE, batch_size: int = 64, limit: int | None = None, shuffle: bool = False
) -> ImageData:
    """The bundled digits split, normalized to [-1, 1] as in `edgequant.demo.data`."""
    x, y = digits_tensors(split, image_size)
    dataset = _subset(TensorDataset(x, y), limit)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
    return ImageData(loader, DIGITS_CLASSES, f"digits {split} split ({len(dataset)} images, 10 classes)")


def load_data(
    source: str,
    split: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    shuffle: bool = False,
    resize: str = "crop",
) -> ImageData:
    """Data for a DATA argument: ``digits`` (its ``split``: train or test) or an image folder.

    ``mean`` / ``std`` and ``resize`` apply to image folders only; the digits come normalized.
    """
    if source == DIGITS:
        if mean is not None or std is not None:
            raise UsageError("--mean / --std apply to image folders; the digits come normalized to [-1, 1]")
        return digits_data(split, image_size or DIGITS_SIZE, batch_size, limit, shuffle)
    return image_folder_loader(
        source,
        image_size or DEFAULT_SIZE,
        mean or IMAGENET_MEAN,
        std or IMAGENET_STD,
        batch_size,
        limit,
        shuffle,
        resize,
    )
