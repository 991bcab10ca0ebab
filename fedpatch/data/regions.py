"""Ground-truth defect regions, as AutoVI (after MVTec LOCO) defines them.

A defective test image has one mask file per defect *instance*; each file is one region,
kept whole even when it has several blobs. The region's saturation area (the number of
detected pixels at which its sPRO reaches 1) comes from the ``defects_config.json`` entry
whose ``pixel_value`` the mask carries. This module is shared by the data loaders (which
build regions) and the metrics (which consume them), so it depends on numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DefectSpec:
    """One entry of ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self, region_area: int) -> float:
        """Pixels needed for full overlap: ``int(thr * area)`` if relative, else ``min(thr, area)``."""
        if self.relative_saturation:
            return float(int(self.saturation_threshold * region_area))
        return float(min(self.saturation_threshold, region_area))


@dataclass(frozen=True)
class DefectRegion:
    """One defect instance: a boolean mask at the image's native size and its spec."""

    mask: np.ndarray  # bool [H, W]
    spec: DefectSpec

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def saturation_area(self) -> float:
        return self.spec.saturation_area(self.area)
