"""The ``fedpatch`` command line: train, evaluate, predict, generate.

A thin layer over the library: argument parsing here, the work in ``fedpatch.baseline``,
``fedpatch.evaluate``, ``fedpatch.predict`` and ``fedpatch.data.synthetic``. Every user error
(a ``FedPatchError``: bad config, data, model file, missing weights; or an ``OSError`` such
as an unwritable output folder) prints one line ``fedpatch: error: ...`` on stderr and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpatch import __version__
from fedpatch.errors import ConfigError, DataError, FedPatchError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpatch", description="PatchCore anomaly detection for AutoVI-style data.")
    parser.add_argument("--version", action="version", version=f"fedpatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train and evaluate objects (centralized baseline)",
        description="Fit a PatchCore model per object, calibrate its threshold on held-out good images, "
        "score the test split and write maps, overlays, metrics and a results table.",
    )
    train.add_argument("--config", type=Path, help="YAML config (default: built-in defaults; see configs/README.md)")
    train.add_argument("--data-dir", type=Path, help="AutoVI- or MVTec-style data root (default: the generated synthetic AutoVI set)")
    train.add_argument("--output-dir", type=Path, default=Path("outputs/baseline"), help="where results go (default: outputs/baseline)")
    train.add_argument("--objects", nargs="+", default=["all"], metavar="OBJECT", help="object names, or 'all' (default): every object folder present")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (value parsed as YAML); repeatable")
    train.add_argument("--force", action="store_true", help="retrain finished objects, and allow a config that differs from the folder's earlier run")

    evaluate = commands.add_parser(
        "evaluate",
        help="re-evaluate a train output folder, or evaluate a folder of anomaly maps",
        description="(a) --output-dir OUT [--data-dir DIR]: reload the models of a train output folder, rescore the "
        "test images, rewrite maps, metrics and the results table. "
        "(b) --maps-dir MAPS --data-dir DIR --objects OBJ... --output-dir OUT: evaluate anomaly maps of any method "
        "laid out as <maps>/<object>/<defect>/<stem>.(npy|tiff|png).",
    )
    evaluate.add_argument("--output-dir", type=Path, required=True, help="(a) the train output folder; (b) where metrics go")
    evaluate.add_argument("--data-dir", type=Path, help="data root ((a): default the one the run was trained on)")
    evaluate.add_argument("--maps-dir", type=Path, help="(b) folder of anomaly maps")
    evaluate.add_argument("--objects", nargs="+", default=["all"], metavar="OBJECT", help="objects to evaluate (default: all)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="runtime.KEY=VALUE", help="(a) override a runtime key")

    predict = commands.add_parser(
        "predict",
        help="score images with a saved model",
        description="Write anomaly maps (.npy + heat map PNG), overlay pictures and predictions.csv "
        "(score, threshold, verdict) for image files and folders.",
    )
    predict.add_argument("--model", type=Path, required=True, help="a model file (models/patchcore_<object>.pt)")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--output-dir", type=Path, required=True)
    predict.add_argument("--threshold", type=float, help="override the model's calibrated threshold")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    generate = commands.add_parser(
        "generate",
        help="write a synthetic data set in the AutoVI layout",
        description="Generate synthetic images, masks and defects_config.json files in the AutoVI v1.0 layout.",
    )
    generate.add_argument("--output", type=Path, required=True, help="data root to create (object folders must not exist yet)")
    generate.add_argument("--objects", nargs="+", default=["all"], metavar="OBJECT", help="AutoVI object names or 'all' (default)")
    generate.add_argument("--scale", type=_positive_float, default=1.0, help="image size relative to the native 400x400 / 1000x750 (default 1)")
    generate.add_argument("--n-train", type=_positive_int, default=None, help="training images per object")
    generate.add_argument("--n-test-good", type=_non_negative_int, default=None, help="good test images per object")
    generate.add_argument("--n-test-defective", type=_non_negative_int, default=None, help="test images per defect folder")
    generate.add_argument("--seed", type=int, default=0)
    return parser


def _objects_arg(values: Sequence[str]) -> str | list[str]:
    return "all" if list(values) == ["all"] else list(values)


def _train(args: argparse.Namespace) -> int:
    from fedpatch.baseline import run_baseline
    from fedpatch.config import load_config

    config = load_config(args.config, args.overrides)
    command = shlex.join(["fedpatch", *args.argv])
    result = run_baseline(config, args.data_dir, args.output_dir, _objects_arg(args.objects), args.force, command=command)
    print(f"results: {result.output_dir / 'results.md'} ({len(result.trained)} trained, {len(result.skipped)} skipped)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.maps_dir is None:
        from fedpatch.baseline import evaluate_output_dir

        result = evaluate_output_dir(args.output_dir, args.data_dir, _objects_arg(args.objects), args.overrides)
        print(f"results: {result.output_dir / 'results.md'} ({len(result.metrics)} objects re-evaluated)")
        return 0
    from fedpatch.evaluate import evaluate_maps_folder
    from fedpatch.report import write_results_table

    if args.data_dir is None:
        raise ConfigError("evaluate --maps-dir needs --data-dir (the data root with the test images and ground truth)")
    if args.overrides:
        raise ConfigError("evaluate --maps-dir takes no --set overrides")
    objects = _objects_arg(args.objects)
    if objects == "all":
        if not args.maps_dir.is_dir():
            raise DataError(f"anomaly maps folder not found: {args.maps_dir}")
        objects = sorted(p.name for p in args.maps_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    results = evaluate_maps_folder(args.data_dir, args.maps_dir, objects, args.output_dir)
    write_results_table(args.output_dir, results, [f"maps: `{args.maps_dir}`; data: `{args.data_dir}`"])
    for name, metrics in results.items():
        spro = metrics["localization"]["auc_spro"].get("0.05")
        print(f"{name}: image AUROC {metrics['classification']['auc_roc']:.4f}, AUC-sPRO@0.05 {spro:.4f}")
    print(f"results: {args.output_dir / 'results.md'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedpatch.predict import PREDICTIONS_FILE, predict_images

    results = predict_images(args.model, args.inputs, args.output_dir, args.threshold, args.device, not args.no_progress)
    width = max(len(r.name) for r in results)
    for r in results:
        limit = "none" if r.threshold is None else f"{r.threshold:.4f}"
        print(f"{r.name:<{width}}  score {r.score:.4f}  threshold {limit}  {r.verdict}")
    print(f"predictions: {args.output_dir / PREDICTIONS_FILE}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedpatch.data import synthetic

    counts = {
        "n_train": args.n_train if args.n_train is not None else synthetic.DEFAULT_N_TRAIN,
        "n_test_good": args.n_test_good if args.n_test_good is not None else synthetic.DEFAULT_N_TEST_GOOD,
        "n_test_defective": args.n_test_defective if args.n_test_defective is not None else synthetic.DEFAULT_N_TEST_DEFECTIVE,
    }
    root = synthetic.generate_autovi_dataset(args.output, _objects_arg(args.objects), scale=args.scale, seed=args.seed, **counts)
    print(f"generated: {root} (scale {args.scale:g}, seed {args.seed}, {counts['n_train']} train / {counts['n_test_good']} good test / "
          f"{counts['n_test_defective']} per defect folder per object)")
    return 0


def _user_error(text: str) -> int:
    """Print ``fedpatch: error: <text>`` as one line on stderr; the user-error exit status."""
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    print(f"fedpatch: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "generate": _generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except FedPatchError as exc:
        return _user_error(str(exc))
    except OSError as exc:  # an unwritable output folder, a full disk, a file vanishing mid-run
        return _user_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        print("fedpatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
