"""What the server reports: communication accounting, results tables and the output folder."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpatch import workflow
from fedpatch.config import RunConfig, dump_config
from fedpatch.federated.strategy import ClientFailure, ObjectResult, Rejection, RoundResult, client_order, rejection_summary
from fedpatch.metrics import limit_key, metrics_json

REPORT_LIMIT = 0.05
"""The FPR limit of the AUC-sPRO column of the results tables."""


# --------------------------------------------------------------------------------------------
# Communication accounting
# --------------------------------------------------------------------------------------------
@dataclass
class CommunicationLog:
    """Payload bytes of every message, per round, stage and client (down = server -> client)."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, round: int, stage: str, client: str, down: int = 0, up: int = 0) -> None:
        self.entries.append({"round": round, "stage": stage, "client": str(client), "bytes_down": int(down), "bytes_up": int(up)})

    def per_client(self, round: int | None = None) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for e in self.entries:
            if round is not None and e["round"] != round:
                continue
            t = totals.setdefault(e["client"], {"bytes_down": 0, "bytes_up": 0})
            t["bytes_down"] += e["bytes_down"]
            t["bytes_up"] += e["bytes_up"]
        return dict(sorted(totals.items(), key=lambda kv: client_order(kv[0])))

    def to_json(self, bank_dtype: str) -> dict[str, Any]:
        rounds = sorted({e["round"] for e in self.entries})
        return {
            "bank_dtype": bank_dtype,
            "unit": "bytes of message payload (Flower record count_bytes: array data incl. npy headers, keys, config values)",
            "per_client": self.per_client(),
            "per_round": {str(r): self.per_client(r) for r in rounds},
            "total": {
                "bytes_down": sum(e["bytes_down"] for e in self.entries),
                "bytes_up": sum(e["bytes_up"] for e in self.entries),
            },
            "messages": self.entries,
        }


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def result_rows(result: RoundResult, limits: Sequence[float], communication: CommunicationLog | None = None) -> list[dict[str, Any]]:
    """Per object a pooled row (client ``all``) then one row per client; then the ``mean`` row.

    Column names follow the centralized ``results.csv`` (``image_auroc``, ``auc_spro@<limit>``,
    ``pixel_auroc``, ``threshold``, ``bank_size``, ``fit_seconds``); client rows hold each
    client's own numbers on its own test share, and its traffic of the round.
    """
    traffic = communication.per_client(result.round) if communication else {}
    keys = [limit_key(k) for k in limits]
    rows: list[dict[str, Any]] = []
    for name in sorted(result.objects):
        obj = result.objects[name]
        fits = {c: result.fits[c].objects[name] for c in obj.aggregation.contributions if c in result.fits}
        rows.append(
            {
                "object": name,
                "scope": "federated",
                "client": "all",
                "partition": f"{len(obj.aggregation.contributions)} client" + ("" if len(obj.aggregation.contributions) == 1 else "s"),
                "image_auroc": obj.image_auroc,
                **{f"auc_spro@{k}": obj.auc_spro.get(float(k)) for k in keys},
                "pixel_auroc": obj.pixel_auroc,
                "threshold": obj.threshold,
                "bank_size": len(obj.aggregation.bank),
                "fit_images": sum(int(f["n_images"]) for f in fits.values()),
                "calibration_images": obj.n_calibration,
                "test_good": obj.n_good,
                "test_defective": obj.n_defective,
                "fit_seconds": max((float(f["fit_seconds"]) for f in fits.values()), default=None),
                "bytes_up": None,
                "bytes_down": None,
            }
        )
        for client in sorted(obj.aggregation.contributions, key=client_order):
            if client not in fits:
                continue
            stats, ev = fits[client], result.evaluations.get(name, {}).get(client)
            local = ev.local if ev else {}
            rows.append(
                {
                    "object": name,
                    "scope": "client",
                    "client": client,
                    "partition": result.fits[client].partition,
                    "image_auroc": local.get("image_auroc"),
                    **{f"auc_spro@{k}": local.get(f"auc_spro@{k}") for k in keys},
                    "pixel_auroc": local.get("pixel_auroc"),
                    "threshold": None,
                    "bank_size": int(stats["bank_rows"]),
                    "fit_images": int(stats["n_images"]),
                    "calibration_images": int(stats["n_calibration"]),
                    "test_good": int((ev.labels == 0).sum()) if ev else None,
                    "test_defective": int((ev.labels == 1).sum()) if ev else None,
                    "fit_seconds": float(stats["fit_seconds"]),
                    "bytes_up": traffic.get(client, {}).get("bytes_up"),
                    "bytes_down": traffic.get(client, {}).get("bytes_down"),
                }
            )
    return with_mean_row(rows, limits)


def with_mean_row(rows: Sequence[Mapping[str, Any]], limits: Sequence[float]) -> list[dict[str, Any]]:
    """``rows`` (without any earlier ``mean`` row) plus the mean over the objects' pooled rows."""
    keys = [limit_key(k) for k in limits]
    out = [dict(r) for r in rows if r["object"] != "mean"]
    pooled = [r for r in out if r["scope"] == "federated"]
    if pooled:
        mean: dict[str, Any] = {"object": "mean", "scope": "federated", "client": "all", "partition": ""}
        for column in ("image_auroc", *[f"auc_spro@{k}" for k in keys], "pixel_auroc", "bank_size", "fit_seconds"):
            known = [float(r[column]) for r in pooled if r.get(column) is not None]
            mean[column] = sum(known) / len(known) if known else None
        out.append(mean)
    return out


def _columns(limits: Sequence[float]) -> list[str]:
    keys = [limit_key(k) for k in limits]
    return [
        "object", "scope", "client", "partition", "image_auroc", *[f"auc_spro@{k}" for k in keys], "pixel_auroc",
        "threshold", "bank_size", "fit_images", "calibration_images", "test_good", "test_defective", "fit_seconds",
        "bytes_up", "bytes_down",
    ]  # fmt: skip


def results_csv(rows: Sequence[Mapping[str, Any]], limits: Sequence[float]) -> str:
    """The CSV text, numbers at full precision (like the centralized ``results.csv``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = _columns(limits)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row.get(c), float) else str(row[c]) for c in columns])
    return buffer.getvalue()


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def results_markdown(rows: Sequence[Mapping[str, Any]], result: RoundResult, config: RunConfig, rejections: Sequence[Rejection] | None = None) -> str:
    """The Markdown table (AUC-sPRO@0.05 only; every limit is in the CSV), exclusions, rejected
    replies (``rejections``, default: the round's), notes."""
    summary = f"Round {result.round}: {len(result.fits)} of {len(result.clients)} clients succeeded"
    notes = [f"{name}: {note}" for name, obj in sorted(result.objects.items()) for note in obj.notes]
    return markdown_report(rows, summary, config, result.failures, result.rejections if rejections is None else rejections, notes)


def markdown_report(
    rows: Sequence[Mapping[str, Any]],
    summary: str,
    config: RunConfig,
    failures: Sequence[ClientFailure],
    rejections: Sequence[Rejection],
    notes: Sequence[str],
) -> str:
    """``results.md`` from its parts: ``summary`` opens the first sentence (who took part)."""
    fed = config.federated
    main = f"auc_spro@{limit_key(REPORT_LIMIT)}"
    lines = [
        "# fedpatch federated results",
        "",
        f"{summary}; partition `{fed.partition}`, "
        f"test split `{fed.test_split}`, global ratio {fed.global_ratio:g}"
        + (f", global size {fed.global_size}" if fed.global_size else "")
        + f", bank dtype `{fed.bank_dtype}`, backbone `{config.model.backbone}`.",
        "",
        "| object | client | partition | image AUROC | AUC-sPRO@0.05 | pixel AUROC | bank size | fit images "
        "| test good/defective | threshold | bytes up / down |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        traffic = f"{r['bytes_up']:,} / {r['bytes_down']:,}" if r.get("bytes_up") is not None else ""
        counts = f"{_fmt(r.get('test_good'))}/{_fmt(r.get('test_defective'))}" if r.get("test_good") is not None else ""
        name = f"**{r['object']}**" if r["scope"] == "federated" else r["object"]
        lines.append(
            f"| {name} | {r['client']} | {r['partition']} | {_fmt(r['image_auroc'])} | {_fmt(r.get(main))} "
            f"| {_fmt(r['pixel_auroc'])} | {_fmt(r['bank_size'], ',.0f')} | {_fmt(r.get('fit_images'))} | {counts} "
            f"| {_fmt(r.get('threshold'), '.4g')} | {traffic} |"
        )
    lines += [
        "",
        "Client `all`: pooled over the clients with the exact two-round protocol (identical to scoring all "
        "test images in one place); other rows: each client's own test share. Mean row: mean over the objects. "
        "Bytes up / down: the client's payload bytes for the whole round (all its objects, every stage); "
        "per message and stage in `communication.json`. AUC-sPRO at every FPR limit is in `results.csv`.",
    ]
    if failures:
        lines += ["", "## Excluded clients", ""]
        lines += [f"- round {f.round}: {f.describe()}" for f in failures]
    rejected = rejection_summary(rejections)
    if rejected["total"]:
        lines += ["", "## Rejected replies", "", f"{rejected['total']} repl" + ("y" if rejected["total"] == 1 else "ies") + " received and not used (never aggregated):", ""]
        lines += ["| client | reason | count |", "|---|---|---:|"]
        lines += [f"| {client} | {kind} | {count} |" for client, kinds in rejected["by_client"].items() for kind, count in kinds.items()]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def write_outputs(
    out_dir: str | Path,
    config: RunConfig,
    result: RoundResult,
    communication: CommunicationLog,
    failures: Sequence[ClientFailure] = (),
    extra: Mapping[str, Any] | None = None,
    rejections: Sequence[Rejection] = (),
) -> Path:
    """Write the global models, per-object ``metrics.json``, ``results.csv/md``,
    ``communication.json``, ``federation.json`` (with ``rejected``: the counts of
    ``rejections``, every round's) and the resolved ``config.yaml``.

    Models: ``models/patchcore_<object>.pt`` is a PatchCore (built from ``config``, not fitted)
    holding the global bank and the calibrated threshold; it loads with ``PatchCore.load``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_object_outputs(out, config, result.objects.values())
    rows = result_rows(result, config.evaluation.fpr_limits, communication)
    federation = {
        "round": result.round,
        "clients": result.clients,
        "succeeded": sorted(result.fits, key=client_order),
        "fits": {c: {"info": f.info, "objects": f.objects} for c, f in sorted(result.fits.items(), key=lambda kv: client_order(kv[0]))},
        "failures": [asdict(f) for f in failures],
        "rejected": rejection_summary(rejections),
        **(dict(extra) if extra else {}),
    }
    write_run_files(out, config, rows, results_markdown(rows, result, config, rejections), communication, federation)
    return out


def write_run_files(
    out: Path, config: RunConfig, rows: Sequence[Mapping[str, Any]], report: str, communication: CommunicationLog, federation: Mapping[str, Any]
) -> None:
    """The files every finished run writes, fresh or resumed: ``config.yaml``, ``results.csv``,
    ``results.md`` (``report``), ``communication.json`` and ``federation.json``."""
    from fedpatch.atomic import atomic_write_json, atomic_write_text

    atomic_write_text(out / "config.yaml", dump_config(config))
    atomic_write_text(out / "results.csv", results_csv(rows, config.evaluation.fpr_limits))
    atomic_write_text(out / "results.md", report)
    atomic_write_json(out / "communication.json", communication.to_json(config.federated.bank_dtype))
    atomic_write_json(out / "federation.json", dict(federation))


def write_object_outputs(out: Path, config: RunConfig, objects: Iterable[ObjectResult]) -> None:
    """Per object: the global model ``models/patchcore_<object>.pt`` and ``<object>/metrics.json``."""
    from fedpatch.atomic import atomic_write_json

    model = workflow.build_model(config)
    for obj in sorted(objects, key=lambda o: o.object_name):
        name = obj.object_name
        model.set_memory_bank(obj.aggregation.bank)
        model.threshold = obj.threshold
        size = workflow.resize_for(config, name)
        model.input_size = None if size == "native" else (int(size[0]), int(size[1]))
        model.save(out / "models" / f"patchcore_{name}.pt")
        metrics = obj.object_metrics()
        if metrics is not None:
            payload: dict[str, Any] = metrics_json(metrics)
        else:
            payload = {
                "localization": {"auc_spro": {limit_key(k): v for k, v in obj.auc_spro.items()}},
                "classification": {"auc_roc": obj.image_auroc},
                "fedpatch": {"pixel_auroc": obj.pixel_auroc, "n_good": obj.n_good, "n_defective": obj.n_defective, "n_regions": obj.n_regions},
            }
        payload["fedpatch"].update(
            {
                "threshold": obj.threshold,
                "calibration_images": obj.n_calibration,
                "global_bank_rows": len(obj.aggregation.bank),
                "union_rows": obj.aggregation.union_size,
                "contributions": obj.aggregation.contributions,
                "pooled_clients": obj.pooled_clients,
                "notes": obj.notes,
            }
        )
        atomic_write_json(out / name / "metrics.json", payload)
