"""The memory fix the benchmarks found: backbone passes are bounded in pixels, results unchanged."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedpatch import PatchCore
from fedpatch.patchcore import MAX_BATCH_PIXELS, iter_image_batches


def test_large_images_go_through_one_at_a_time() -> None:
    large = [torch.zeros(3, 750, 1000) for _ in range(5)]
    assert [b.shape[0] for b in iter_image_batches(large, batch_size=8)] == [1] * 5
    small = [torch.zeros(3, 256, 256) for _ in range(20)]
    assert [b.shape[0] for b in iter_image_batches(small, batch_size=8)] == [8, 8, 4]
    mid = [torch.zeros(3, 400, 400) for _ in range(8)]
    assert [b.shape[0] for b in iter_image_batches(mid, batch_size=8)] == [MAX_BATCH_PIXELS // (400 * 400), 2]


def test_a_loader_batch_is_split_by_pixels() -> None:
    batch = torch.zeros(8, 3, 64, 64)
    assert [b.shape[0] for b in iter_image_batches([batch], batch_size=8, max_pixels=3 * 64 * 64)] == [3, 3, 2]
    assert [b.shape[0] for b in iter_image_batches([batch], batch_size=8)] == [8]


def test_scores_do_not_depend_on_the_pass_size(
    fitted_model: PatchCore, make_images: Callable[..., list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(4, seed=9)
    together = fitted_model.predict_scores(images)
    monkeypatch.setattr(iter_image_batches, "__defaults__", (1,))  # one image per pass
    alone = fitted_model.predict_scores(images)
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
