"""Shared fixtures: thread count, tiny synthetic images and a tiny model for the core-library
tests, and a copy of the Flower app for the tests that submit it with ``flwr run``.

Everything here is small on purpose: the whole core suite must run in about a minute and a
half on two CPU cores. Plumbing tests use random backbone weights (``pretrained=False``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from fedpatch import PatchCore

torch.set_num_threads(2)

ImageFactory = Callable[..., list[torch.Tensor]]


def _make_images(n: int, height: int = 64, width: int = 64, seed: int = 0, uint8: bool = False) -> list[torch.Tensor]:
    """``n`` smooth random RGB images ``[3, H, W]`` (float in [0, 1], or uint8 when asked)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 8), max(2, width // 8), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noisy = (0.8 * smooth + 0.2 * torch.rand(n, 3, height, width, generator=generator)).clamp(0.0, 1.0)
    if uint8:
        return [(img * 255).round().to(torch.uint8) for img in noisy]
    return list(noisy)


@pytest.fixture
def make_images() -> ImageFactory:
    """Factory of tiny synthetic images: ``make_images(n, height, width, seed, uint8)``."""
    return _make_images


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator (same stream in every test)."""
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def train_images() -> list[torch.Tensor]:
    """Six 64x64 training images (float in [0, 1])."""
    return _make_images(6, 64, 64, seed=1)


@pytest.fixture(scope="session")
def fitted_model(train_images: list[torch.Tensor]) -> PatchCore:
    """A resnet18 (random weights) PatchCore fitted on ``train_images``; tests must not mutate it."""
    from fedpatch import PatchCore

    return PatchCore("resnet18", pretrained=False, device="cpu", coreset_percentage=0.1).fit(train_images)


@pytest.fixture(scope="session")
def flower_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's Flower app as ``flwr run`` ships it, unpacked once per session.

    ``flwr run <folder>`` walks the whole folder to build the app's FAB, ignored files included:
    7-8 s per run with ``.venv`` inside the checkout. Runs submitted from this copy skip that.
    It is made with ``flwr build``, so it holds exactly the files a run from the checkout ships
    (what Flower adds, ``.info/``, left out). Runs that test submitting from the checkout itself
    (the ``fedpatch.deploy`` launcher's default) do not use it.
    """
    out = tmp_path_factory.mktemp("flower_app")
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(Path(__file__).resolve().parents[1])], cwd=out, check=True, capture_output=True, timeout=120)
    (fab,) = out.glob("*.fab")
    app = out / "app"
    with zipfile.ZipFile(fab) as archive:
        archive.extractall(app, members=[name for name in archive.namelist() if not name.startswith(".info/")])
    return app
