"""The CUDA paths: feature extraction, greedy selection and exact bank search on a GPU.

These need a CUDA device, so they run where one is present (the team's lent GPU machines:
``python -m pytest tests/test_gpu.py``) and are skipped elsewhere, CI included; every path
they cover also runs on the CPU in the rest of the suite. Each compares the GPU result with
the CPU one on the same input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpatch import MemoryBank, PatchCore
from fedpatch.backbone import FeatureExtractor
from fedpatch.coreset import greedy_coreset_indices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_search_tensor_on_gpu_matches_faiss_on_cpu() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 256), dtype=np.float32)
    queries = vectors[rng.integers(5000, size=3000)] + 0.2 * rng.standard_normal((3000, 256), dtype=np.float32)
    bank = MemoryBank(256)
    bank.add(vectors)
    cpu_d, cpu_i = bank.search(queries, k=3)
    gpu_d, gpu_i = bank.search_tensor(torch.from_numpy(queries).cuda(), k=3, chunk_rows=1024)
    assert gpu_d.is_cuda and gpu_i.is_cuda
    np.testing.assert_array_equal(gpu_i.cpu().numpy()[:, 0], cpu_i[:, 0])
    np.testing.assert_allclose(gpu_d.cpu().numpy(), cpu_d, rtol=1e-4, atol=1e-4)


def test_greedy_selection_on_gpu_picks_the_cpu_points() -> None:
    points = torch.randn(4000, 64, generator=torch.Generator().manual_seed(1))
    cpu = greedy_coreset_indices(points, 200, seed=3, projection_dim=None)
    gpu = greedy_coreset_indices(points.cuda(), 200, seed=3, projection_dim=None)
    np.testing.assert_array_equal(gpu, cpu)


def test_fused_extractor_on_gpu_matches_the_cpu() -> None:
    images = torch.rand(2, 3, 96, 128)
    cpu = FeatureExtractor("efficientnet_lite0", pretrained=True)
    gpu = FeatureExtractor("efficientnet_lite0", pretrained=True).cuda()
    with torch.no_grad():
        expected, got = cpu(images), gpu(images.cuda())
    for layer in expected:
        error = float((got[layer].cpu() - expected[layer]).abs().max() / expected[layer].abs().max())
        assert error < 1e-2  # cuDNN may use TF32 convolutions (10-bit mantissa)


def test_bfloat16_extractor_on_gpu_stays_near_the_float32_cpu_features() -> None:
    """The opt-in bfloat16 backbone also autocasts on a GPU: float32 maps on the device that
    differ from the float32 CPU ones by bfloat16's rounding, no more."""
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    cpu = FeatureExtractor("resnet18", pretrained=False)
    gpu = FeatureExtractor("resnet18", pretrained=False, precision="bfloat16").cuda()
    with torch.no_grad():
        expected, got = cpu(images), gpu(images.cuda())
    for layer in expected:
        assert got[layer].is_cuda and got[layer].dtype == torch.float32
        error = float((got[layer].cpu() - expected[layer]).abs().max() / expected[layer].abs().max())
        assert 1e-4 < error < 0.05


def test_patchcore_fit_and_predict_on_gpu() -> None:
    """A GPU model scores like a CPU model holding the same bank; its own fit is the same size."""
    gen = torch.Generator().manual_seed(0)
    train = [torch.rand(3, 64, 80, generator=gen) for _ in range(6)]
    test = [torch.rand(3, 64, 80, generator=gen) for _ in range(3)]
    cpu = PatchCore("resnet18", pretrained=False, device="cpu", coreset_percentage=0.25).fit(train)
    gpu = PatchCore("resnet18", pretrained=False, device="cuda", coreset_percentage=0.25).fit(train)
    assert gpu.device.type == "cuda"
    assert len(gpu.get_memory_bank()) == len(cpu.get_memory_bank())
    gpu.set_memory_bank(cpu.get_memory_bank())
    for a, b in zip(cpu.iter_predictions(test), gpu.iter_predictions(test)):
        assert b.anomaly_map.shape == (64, 80)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-2, atol=1e-2 * float(a.anomaly_map.max()))
        assert b.score == pytest.approx(a.score, rel=1e-2)
