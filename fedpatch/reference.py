"""Reference numbers that results tables print next to ours, each with its source.

Only numbers that a source actually gives are stored. There is no per-object table here:
the seed's per-object expectation table is not available to the project (only its means are
quoted in ``docs/autovi-format.md``), and published per-object values are not in our docs, so
per-object reference cells are left empty ("n/a") rather than invented.

All references are means over the six objects of the REAL AutoVI v1.0 data. Numbers measured
on the synthetic default dataset (``fedpatch.data.synthetic``) are not comparable with them;
they are shown as a sense of scale only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReferenceMean:
    """Mean image AUROC and AUC-sPRO@0.05 over the six AutoVI objects, from one source."""

    key: str  # short column name
    label: str  # what the number is, for table headers and notes
    image_auroc: float
    auc_spro_005: float
    approximate: bool  # the source only gives "~x"
    source: str

    def format(self, value: float) -> str:
        """``0.884`` or ``~0.88`` (approximate numbers keep their tilde)."""
        return f"~{value:.2f}" if self.approximate else f"{value:.3f}"


PUBLISHED_PATCHCORE = ReferenceMean(
    key="published",
    label="published PatchCore (Carvalho et al. 2024)",
    image_auroc=0.884,
    auc_spro_005=0.689,
    approximate=False,
    source=(
        "Carvalho et al., Computers in Industry 2024 (AutoVI paper): anomalib PatchCore, "
        "WideResNet-50-2, coreset 0.1, 256 resize + 224 crop; mean over the six objects "
        "(quoted in docs/autovi-format.md, 'Published reference numbers')"
    ),
)

SEED_TARGET = ReferenceMean(
    key="seed_target",
    label="seed's expectation table (mean)",
    image_auroc=0.88,
    auc_spro_005=0.78,
    approximate=True,
    source=(
        "docs/autovi-format.md: 'The seed's per-object expectation table targets a mean AUROC "
        "~0.88 and AUC-sPRO@0.05 ~0.78' (the per-object values are not available)"
    ),
)

REFERENCES: tuple[ReferenceMean, ...] = (PUBLISHED_PATCHCORE, SEED_TARGET)
"""Every reference shown in results tables, in column order."""
