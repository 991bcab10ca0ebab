"""Results people look at: the results table (CSV + Markdown) and per-object pictures.

- ``results.csv``: one row per object, then a ``mean`` row: image AUROC, AUC-sPRO at every
  FPR limit, pixel AUROC, threshold, bank size, fit seconds, peak RSS, and the reference means
  of :mod:`fedpatch.reference` (filled in the mean row only: no per-object reference exists).
  Numbers are written at full precision (Python ``repr``), exactly as in each ``metrics.json``.
- ``results.md``: the same rows, rounded, with AUC-sPRO@0.05 only, and the sources.
- ``spro_curve.png``: sPRO against FPR up to 0.3, the 0.05 integration limit marked.
- ``score_histogram.png``: image scores of good and defective test images with the threshold,
  next to the image ROC curve with the threshold's operating point.

Pictures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI backend)
and written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpatch.atomic import atomic_write
from fedpatch.metrics import limit_key
from fedpatch.reference import REFERENCES

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SPRO_CURVE_FILE = "spro_curve.png"
HISTOGRAM_FILE = "score_histogram.png"
MAIN_LIMIT = limit_key(0.05)
PEAK_MEMORY_NOTE = "peak RSS: the process's peak resident set size so far (getrusage ru_maxrss), in MiB"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass
class ResultRow:
    """One line of the results table (None: not known for this object)."""

    name: str
    image_auroc: float | None = None
    auc_spro: dict[str, float] = field(default_factory=dict)  # limit key ("0.05") -> value
    pixel_auroc: float | None = None
    threshold: float | None = None
    bank_size: float | None = None
    fit_seconds: float | None = None
    peak_rss_mib: float | None = None


def row_from_metrics(name: str, metrics: Mapping[str, Any]) -> ResultRow:
    """A table row from an object's ``metrics.json`` content (official form + ``fedpatch``)."""
    ours = metrics.get("fedpatch") or {}
    training = ours.get("training") or {}
    scoring = ours.get("scoring") or {}
    peaks = [v for v in (training.get("peak_rss_mib"), scoring.get("peak_rss_mib")) if v is not None]
    return ResultRow(
        name=name,
        image_auroc=(metrics.get("classification") or {}).get("auc_roc"),
        auc_spro=dict((metrics.get("localization") or {}).get("auc_spro") or {}),
        pixel_auroc=ours.get("pixel_auroc"),
        threshold=ours.get("threshold"),
        bank_size=training.get("bank_size"),
        fit_seconds=training.get("fit_seconds"),
        peak_rss_mib=max(peaks) if peaks else None,
    )


def _mean(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def mean_row(rows: Sequence[ResultRow]) -> ResultRow:
    """Means over the objects of every column, except peak RSS: the maximum."""
    limits = sorted({k for r in rows for k in r.auc_spro}, key=float)
    peaks = [r.peak_rss_mib for r in rows if r.peak_rss_mib is not None]
    return ResultRow(
        name="mean",
        image_auroc=_mean([r.image_auroc for r in rows]),
        auc_spro={k: v for k in limits if (v := _mean([r.auc_spro.get(k) for r in rows])) is not None},
        pixel_auroc=_mean([r.pixel_auroc for r in rows]),
        threshold=None,
        bank_size=_mean([r.bank_size for r in rows]),
        fit_seconds=_mean([r.fit_seconds for r in rows]),
        peak_rss_mib=max(peaks) if peaks else None,
    )


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def results_csv(rows: Sequence[ResultRow]) -> str:
    """The CSV text: a row per object, then the mean row (with the reference means)."""
    limits = sorted({k for r in rows for k in r.auc_spro}, key=float)
    header = ["object", "image_auroc", *[f"auc_spro@{k}" for k in limits], "pixel_auroc", "threshold", "bank_size", "fit_seconds", "peak_rss_mib"]
    for ref in REFERENCES:
        header += [f"{ref.key}_image_auroc", f"{ref.key}_auc_spro@{MAIN_LIMIT}"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in [*rows, mean_row(rows)]:
        cells = [row.name, row.image_auroc, *[row.auc_spro.get(k) for k in limits], row.pixel_auroc, row.threshold]
        cells += [row.bank_size, row.fit_seconds, row.peak_rss_mib]
        for ref in REFERENCES:
            cells += [ref.image_auroc, ref.auc_spro_005] if row.name == "mean" else [None, None]
        writer.writerow([_cell(c) for c in cells])
    return buffer.getvalue()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_markdown(rows: Sequence[ResultRow], notes: Sequence[str] = ()) -> str:
    """The Markdown table (AUC-sPRO@0.05 only; every limit is in the CSV) with sources and notes."""
    refs = " / ".join(ref.key.replace("_", " ") for ref in REFERENCES)
    lines = [
        "# fedpatch results",
        "",
        f"| object | image AUROC | AUC-sPRO@0.05 | pixel AUROC | bank size | fit s | peak RSS MiB "
        f"| reference image AUROC ({refs}) | reference AUC-sPRO@0.05 ({refs}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [*rows, mean_row(rows)]:
        is_mean = row.name == "mean"
        ref_auroc = " / ".join(ref.format(ref.image_auroc) for ref in REFERENCES) if is_mean else "n/a"
        ref_spro = " / ".join(ref.format(ref.auc_spro_005) for ref in REFERENCES) if is_mean else "n/a"
        name = f"**mean** ({len(rows)} objects)" if is_mean else row.name
        lines.append(
            f"| {name} | {_fmt(row.image_auroc, '.3f')} | {_fmt(row.auc_spro.get(MAIN_LIMIT), '.3f')} "
            f"| {_fmt(row.pixel_auroc, '.3f')} | {_fmt(row.bank_size, ',.0f')} | {_fmt(row.fit_seconds, '.1f')} "
            f"| {_fmt(row.peak_rss_mib, ',.0f')} | {ref_auroc} | {ref_spro} |"
        )
    lines += [
        "",
        "Mean row: mean over the objects listed (peak RSS: the maximum). "
        f"{PEAK_MEMORY_NOTE}. AUC-sPRO at every FPR limit is in `{RESULTS_CSV}`.",
        "",
        "Reference columns are means over the six objects of the real AutoVI v1.0 data; no "
        "per-object reference is available (n/a). Results on other data (e.g. the synthetic "
        "default dataset) are not comparable with them.",
    ]
    lines += [f"- {ref.key}: {ref.label}. Source: {ref.source}." for ref in REFERENCES]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_results_table(
    output_dir: str | Path, metrics_by_object: Mapping[str, Mapping[str, Any]], notes: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` (atomically) for the objects given, in order."""
    rows = [row_from_metrics(name, metrics) for name, metrics in metrics_by_object.items()]
    out = Path(output_dir)
    csv_text, md_text = results_csv(rows), results_markdown(rows, notes)
    return (
        atomic_write(out / RESULTS_CSV, lambda handle: handle.write(csv_text.encode("utf-8"))),
        atomic_write(out / RESULTS_MD, lambda handle: handle.write(md_text.encode("utf-8"))),
    )


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` as dicts of strings (for tests and scripts)."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def _save_figure(figure: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100, bbox_inches="tight"))


def curve_up_to(fpr: np.ndarray, spro: np.ndarray, max_fpr: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of an ascending FPR-sPRO curve with ``fpr <= max_fpr``, ending exactly at
    ``max_fpr`` (sPRO interpolated linearly there, as the AUC integration does)."""
    fpr, spro = np.asarray(fpr, dtype=np.float64), np.asarray(spro, dtype=np.float64)
    keep = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:keep], spro[:keep]
    if keep < fpr.size and (x.size == 0 or x[-1] < max_fpr):
        x0, x1, y0, y1 = fpr[keep - 1], fpr[keep], spro[keep - 1], spro[keep]
        x = np.append(x, max_fpr)
        y = np.append(y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return x, y


def save_spro_curve(
    path: str | Path,
    fpr: np.ndarray,
    spro: np.ndarray,
    title: str,
    auc_at_limit: float | None = None,
    limit: float = 0.05,
    max_fpr: float = 0.3,
) -> Path:
    """sPRO against FPR up to ``max_fpr``, the area up to ``limit`` shaded and the limit marked."""
    from matplotlib.figure import Figure

    x, y = curve_up_to(fpr, spro, max_fpr)
    xs, ys = curve_up_to(fpr, spro, limit)
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    axes.plot(x, y, color="tab:blue", linewidth=1.8, label="sPRO(FPR)")
    label = f"AUC-sPRO@{limit:g} = {auc_at_limit:.3f}" if auc_at_limit is not None else f"area up to FPR {limit:g}"
    axes.fill_between(xs, ys, color="tab:blue", alpha=0.2, label=label)
    axes.axvline(limit, color="tab:red", linestyle="--", linewidth=1.2, label=f"FPR limit {limit:g}")
    axes.set_xlim(0.0, max_fpr)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("false positive rate (pixels outside every defect)")
    axes.set_ylabel("mean sPRO over defect regions")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save_figure(figure, path)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image ROC curve ``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct score."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp, fp = np.cumsum(lab)[last_of_tie], np.cumsum(~lab)[last_of_tie]
    n_pos, n_neg = max(int(lab.sum()), 1), max(int((~lab).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def save_score_histogram(
    path: str | Path,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    title: str,
    image_auroc: float | None = None,
) -> Path:
    """Good vs defective image-score histograms with the threshold, beside the image ROC curve."""
    from matplotlib.figure import Figure

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    figure = Figure(figsize=(11, 4.2))
    hist, roc = figure.subplots(1, 2)
    values = scores if threshold is None else np.append(scores, threshold)
    bins = np.linspace(values.min(), values.max(), max(10, min(40, int(math.sqrt(scores.size)) * 3))) if np.ptp(values) > 0 else 10
    hist.hist(scores[~labels], bins=bins, alpha=0.6, color="tab:green", label=f"good ({int((~labels).sum())})")
    hist.hist(scores[labels], bins=bins, alpha=0.6, color="tab:red", label=f"defective ({int(labels.sum())})")
    if threshold is not None:
        hist.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    hist.set_xlabel("image anomaly score")
    hist.set_ylabel("test images")
    hist.set_title(title)
    hist.legend()
    fpr, tpr = roc_points(scores, labels)
    label = "ROC" if image_auroc is None else f"ROC (AUROC {image_auroc:.3f})"
    roc.plot(fpr, tpr, color="tab:blue", linewidth=1.8, label=label)
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if threshold is not None and labels.any() and (~labels).any():
        point = (float((scores[~labels] > threshold).mean()), float((scores[labels] > threshold).mean()))
        roc.plot(*point, "ko", label=f"threshold: FPR {point[0]:.2f}, TPR {point[1]:.2f}")
    roc.set_xlabel("false positive rate (good images flagged)")
    roc.set_ylabel("true positive rate (defective images flagged)")
    roc.set_xlim(0, 1)
    roc.set_ylim(0, 1.02)
    roc.set_title("image ROC")
    roc.grid(alpha=0.3)
    roc.legend(loc="lower right")
    return _save_figure(figure, path)
