"""Shared fixtures (digits batches, briefly trained digits models) and the slow marker; helpers live in helpers.py."""

from __future__ import annotations

import pytest
import torch

from edgequant.demo.data import digits_tensors
from edgequant.demo.training import float_digits_model

# Fixtures that train digits models or build zoo models: a test that takes one is slow by
# nature and is marked here, once, so that `pytest -m "not slow"` stays the quick loop.
SLOW_FIXTURES = frozenset({"digits_model", "float_cache", "trained", "runs"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors("test")


@pytest.fixture(scope="session")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_tensors("train")


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """Factory: a torchvision model briefly trained on digits (confident, not random, logits)."""
    cache = tmp_path_factory.mktemp("float_models")
    models: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in models:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("EDGEQUANT_CACHE", str(cache))
                models[name] = float_digits_model(name, epochs=2, progress=False)
        return models[name]

    return get
