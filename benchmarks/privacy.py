"""Measured cost of the bank privacy options (``fedpatch.privacy``) on detection quality.

For each data set the bank is fitted once (one participant, as ``fedpatch train`` does), then
every setting transforms it as a client would before sending, the server-side step is
applied (union kept, or a greedy coreset of half of it), the client-side inverse is applied
(un-rotation), and the test split is scored with the resulting bank:

- ``none``: the plain bank (the reference row);
- ``rotation``: rotated with a key, un-rotated after the server step; with ``global_ratio
  0.5`` the server's greedy coreset runs on the ROTATED rows, once with the config's
  ``projection_dim`` (skipped for 152-d features: exact distances) and once with a 64-d
  random projection (which is not rotation-invariant), and the share of rows selected as in
  the plain run is reported;
- ``clip only``: rows clipped to C, no noise (the cost of clipping alone);
- ``gaussian eps=...``: clipped to C plus Gaussian noise calibrated for (eps, delta=1e-5) per
  released row (analytic Gaussian mechanism, sensitivity 2C).

C is the median L2 norm of the clean bank's rows (stated in the table; in a real deployment
C must be fixed without looking at private data, e.g. from public images).

Data sets: the default generated AutoVI-format set (``configs/federated/patchcore_offline.yaml``
sizes, efficientnet_lite0; ``--objects`` to choose) and the magnetic-tile sample with the
protocol of ``tests/test_core_realdata.py``. Writes ``benchmarks/results/privacy.md``.

    python benchmarks/privacy.py                       # all six objects + magnetic tiles
    python benchmarks/privacy.py --objects pipe_clip tank_screw
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpatch import PatchCore  # noqa: E402
from fedpatch.atomic import atomic_write_text  # noqa: E402
from fedpatch.config import load_config  # noqa: E402
from fedpatch.coreset import coreset_size, greedy_coreset_indices  # noqa: E402
from fedpatch.privacy import Rotation, clip_rows, gaussian_sigma, privatize_rows  # noqa: E402
from fedpatch.workflow import build_model, fit_local, open_object, pooled_metrics, score_local, split_calibration  # noqa: E402

EPSILONS = (100.0, 10.0, 3.0, 1.0)
DELTA = 1e-5
KEY = "benchmark-rotation-key-0123456789"
CONFIG = ROOT / "configs" / "federated" / "patchcore_offline.yaml"
MAGNETIC = ROOT.parent / "shared" / "data" / "magnetic_tile_defects"
RESULTS = ROOT / "benchmarks" / "results" / "privacy.md"


@dataclass
class Setting:
    """One way the bank reaches the scorer."""

    name: str
    bank: np.ndarray
    sigma_over_c: float | None = None
    same_rows: float | None = None  # share of the plain run's selected rows selected again
    compare_to: int = 0  # index of the setting whose image scores this one is compared with


@dataclass
class Outcome:
    setting: Setting
    image_auroc: float
    pixel_auroc: float
    spro: float | None
    max_score_change: float


def settings(bank: np.ndarray, seed: int, projection_dim: int | None, rng: np.random.Generator) -> Iterator[Setting]:
    """Every setting of the module docstring for one clean bank."""
    rotation = Rotation(KEY)
    yield Setting("none (global_ratio 1.0)", bank)
    yield Setting("rotation (global_ratio 1.0)", rotation.unrotate(rotation.rotate(bank)), compare_to=0)
    target = coreset_size(len(bank), 0.5)
    rotated = rotation.rotate(bank)
    for index, proj in ((2, projection_dim), (4, 64)):
        plain = greedy_coreset_indices(bank, target, seed, proj)
        turned = greedy_coreset_indices(rotated, target, seed, proj)
        label = f"projection_dim {proj}" + (" (skipped: dim <= 2x)" if proj is None or 2 * proj > bank.shape[1] else "")
        yield Setting(f"none (global_ratio 0.5, {label})", bank[plain])
        same = len(np.intersect1d(plain, turned)) / target
        yield Setting(f"rotation (global_ratio 0.5, {label})", rotation.unrotate(rotated[turned]), same_rows=same, compare_to=index)
    clip = float(np.median(np.linalg.norm(bank.astype(np.float64), axis=1)))
    yield Setting(f"clip only (C={clip:.3g})", clip_rows(bank, clip).astype(np.float32))
    for eps in EPSILONS:
        noisy, sigma = privatize_rows(bank, clip, eps, DELTA, rng)
        yield Setting(f"gaussian eps={eps:g} (C={clip:.3g})", noisy, sigma_over_c=sigma / clip)


def run_autovi(objects: Sequence[str]) -> list[tuple[str, list[Outcome]]]:
    from fedpatch.data.synthetic import ensure_default_dataset

    config = load_config(CONFIG, ["runtime.device=cpu", "runtime.progress=false"])
    root = ensure_default_dataset()
    results = []
    for name in objects:
        started = time.perf_counter()
        fit_set, _ = split_calibration(open_object(root, name, "train", config), config)
        model, _ = fit_local(config, fit_set)
        bank = model.get_memory_bank()
        test = open_object(root, name, "test", config)
        scorer = build_model(config)

        def score(bank: np.ndarray) -> tuple[float, float, float | None, np.ndarray]:
            scorer.set_memory_bank(bank)
            evaluation = score_local(scorer, test, config)
            metrics = pooled_metrics([evaluation], config.evaluation.fpr_limits)
            return metrics.image_auroc, metrics.pixel_auroc, metrics.auc_spro.get(0.05), evaluation.scores

        rng = np.random.default_rng(0)
        results.append((name, evaluate(settings(bank, config.model.seed, config.model.projection_dim, rng), score)))
        print(f"{name}: {len(bank)} rows x {bank.shape[1]}, {time.perf_counter() - started:.0f} s", flush=True)
    return results


def evaluate(
    variants: Iterator[Setting], score: Callable[[np.ndarray], tuple[float, float, float | None, np.ndarray]]
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    all_scores: list[np.ndarray] = []
    for setting in variants:
        image, pixel, spro, scores = score(setting.bank)
        all_scores.append(scores)
        outcomes.append(Outcome(setting, image, pixel, spro, float(np.abs(scores - all_scores[setting.compare_to]).max())))
    return outcomes


def _tile_image(path: Path, size: int = 256) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("L").resize((size, size), Image.BILINEAR).convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def _tile_mask(path: Path, size: int = 256) -> np.ndarray:
    with Image.open(path) as mask:
        binary = Image.fromarray((np.array(mask.convert("L")) > 127).astype(np.uint8) * 255)
    return np.array(binary.resize((size, size), Image.NEAREST)) > 127


def run_magnetic() -> list[Outcome]:
    """The protocol of tests/test_core_realdata.py (70 good to fit; 30 good + 75 defective to test)."""
    files = lambda cls: sorted((MAGNETIC / cls / "Imgs").glob("*.jpg"))  # noqa: E731
    free = files("MT_Free")
    defective = [p for cls in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven") for p in files(cls)]
    test_files = free[70:] + defective
    labels = np.array([0] * 30 + [1] * len(defective))
    masks = np.concatenate([_tile_mask(p.with_suffix(".png")).ravel() for p in test_files])
    model = PatchCore("efficientnet_lite0", coreset_percentage=0.1, device="cpu")
    model.fit([_tile_image(p) for p in free[:70]])
    bank = model.get_memory_bank()
    test_images = [_tile_image(p) for p in test_files]

    def score(bank: np.ndarray) -> tuple[float, float, float | None, np.ndarray]:
        model.set_memory_bank(bank)
        predictions = list(model.iter_predictions(test_images))
        scores = np.array([p.score for p in predictions])
        pixel = roc_auc_score(masks, np.concatenate([p.anomaly_map.ravel() for p in predictions]))
        return float(roc_auc_score(labels, scores)), float(pixel), None, scores

    rng = np.random.default_rng(0)
    return evaluate(settings(bank, model.config.seed, model.config.projection_dim, rng), score)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(outcomes: list[Outcome], with_spro: bool) -> list[str]:
    head = "| setting | sigma / C | rows as plain | image AUROC | pixel AUROC |" + (" AUC-sPRO@0.05 |" if with_spro else "") + " max abs image-score change |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in outcomes:
        s = o.setting
        lines.append(
            f"| {s.name} | {_fmt(s.sigma_over_c, '.3g')} | {_fmt(s.same_rows, '.1%')} | {o.image_auroc:.3f} | {o.pixel_auroc:.3f} |"
            + (f" {_fmt(o.spro)} |" if with_spro else "")
            + f" {o.max_score_change:.3g} |"
        )
    return lines


def mean_outcomes(per_object: list[tuple[str, list[Outcome]]]) -> list[Outcome]:
    means = []
    for i, first in enumerate(per_object[0][1]):
        rows = [outcomes[i] for _, outcomes in per_object]
        spros = [r.spro for r in rows if r.spro is not None]
        same = [r.setting.same_rows for r in rows if r.setting.same_rows is not None]
        name = first.setting.name.split(" (C=")[0] + (" (C = median row norm per object)" if "(C=" in first.setting.name else "")
        setting = Setting(name, first.setting.bank, first.setting.sigma_over_c, float(np.mean(same)) if same else None)
        means.append(
            Outcome(
                setting,
                float(np.mean([r.image_auroc for r in rows])),
                float(np.mean([r.pixel_auroc for r in rows])),
                float(np.mean(spros)) if spros else None,
                float(max(r.max_score_change for r in rows)),
            )
        )
    return means


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", nargs="+", default=["engine_wiring", "pipe_clip", "pipe_staple", "tank_screw", "underbody_pipes", "underbody_screw"])
    parser.add_argument("--skip-magnetic", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    lines = [
        "# Privacy options: measured cost (benchmarks/privacy.py)",
        "",
        f"Command: `python benchmarks/privacy.py --objects {' '.join(args.objects)}`. One participant; delta = {DELTA:g}; "
        "sigma from the analytic Gaussian mechanism with sensitivity 2C (one released row replaced). "
        "C = median L2 norm of the clean bank's rows. The guarantee is per released row only: the coreset "
        "selection and several rows of one image are not covered (see fedpatch/privacy.py). "
        "'rows as plain' = share of the rows the plain run's server-side greedy coreset selects that the "
        "run on rotated rows selects too. 'max abs image-score change': largest change of any test image's "
        "score against the plain run with the same global_ratio and projection (rotation rows) or against "
        "the first row (others).",
        "",
        "sigma / C is the noise standard deviation per coordinate over the clip norm; the noise "
        "vector's norm is about sigma * sqrt(D), D = 152 for efficientnet_lite0, so at eps = 10 the "
        f"noise is {gaussian_sigma(10.0, DELTA, 2.0) * np.sqrt(152):.3g} times longer than any clipped row.",
        "",
    ]
    per_object = run_autovi(args.objects)
    lines += [f"## Default generated data set (configs/federated/patchcore_offline.yaml sizes, efficientnet_lite0): mean over {len(per_object)} objects", ""]
    lines += table(mean_outcomes(per_object), with_spro=True) + [""]
    for name, outcomes in per_object:
        lines += [f"### {name}", ""] + table(outcomes, with_spro=True) + [""]
    if not args.skip_magnetic and MAGNETIC.is_dir():
        lines += ["## Magnetic-tile sample (protocol of tests/test_core_realdata.py, efficientnet_lite0, 256x256)", ""]
        lines += table(run_magnetic(), with_spro=False) + [""]
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, "\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
