from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testkit.models import save_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A factory: family name -> folder with a tiny random checkpoint (cached per session)."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, fetched and converted on first use."""
    from engine.model_store import resolve_model

    return resolve_model("default")
