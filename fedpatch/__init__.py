"""fedpatch: federated PatchCore anomaly detection for industrial images.

The library holds all the machine learning (no Flower import anywhere in it); the Flower
ClientApp and ServerApp in ``clients/`` and ``server/`` only translate messages to these calls.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedpatch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

from fedpatch.backbone import FeatureExtractor
from fedpatch.coreset import greedy_coreset_selection, random_coreset_selection
from fedpatch.features import aggregate_features, extract_patch_features
from fedpatch.memory_bank import MemoryBank
from fedpatch.patchcore import PatchCore, PatchCoreConfig, Prediction

__all__ = [
    "FeatureExtractor",
    "MemoryBank",
    "PatchCore",
    "PatchCoreConfig",
    "Prediction",
    "__version__",
    "aggregate_features",
    "extract_patch_features",
    "greedy_coreset_selection",
    "random_coreset_selection",
]
