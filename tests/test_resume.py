"""Resumable ``fedpatch train`` and atomic outputs.

An interrupted run (Ctrl-C or a crash in the middle of an object) leaves finished objects
untouched and no half-written file; the rerun skips what is done and ends with the same
results as a run that was never interrupted. The atomic-write helpers keep the old file (or
none) when writing fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fedpatch import baseline, cli
from fedpatch.config import RunConfig
from fedpatch.atomic import atomic_save, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.patchcore import read_model_file
from tiny_run import OBJECTS, QUIET, TINY_SETS

TINY = [*TINY_SETS, *QUIET, "--set", "evaluation.max_overlays=2"]
VOLATILE = {"seconds", "total_seconds", "peak_rss_mib", "fit_seconds", "extract_seconds", "coreset_seconds", "index_seconds", "calibration_seconds"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_autovi_dataset(tmp_path_factory.mktemp("resume_data"), list(OBJECTS), n_train=6, n_test_good=2, n_test_defective=1, scale=0.15, seed=5)


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli.main(train_args(data, out)) == 0
    return out


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data-dir", str(data), "--output-dir", str(out), "--objects", *OBJECTS, *TINY]


def stable(value: object) -> object:
    """A metrics.json value without timings and memory (which differ between any two runs)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    return value


def metrics(out: Path, name: str) -> dict:
    return stable(json.loads((out / name / "metrics.json").read_text()))


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "training.log"}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def same_results(out: Path, reference: Path) -> None:
    assert files(out) == files(reference)
    for name in OBJECTS:
        assert metrics(out, name) == metrics(reference, name)
        np.testing.assert_array_equal(read_model_file(out / "models" / f"patchcore_{name}.pt")[1], read_model_file(reference / "models" / f"patchcore_{name}.pt")[1])
        for npy in sorted((reference / "maps" / name).rglob("*.npy")):
            np.testing.assert_array_equal(np.load(out / npy.relative_to(reference)), np.load(npy))
    assert (out / "results.csv").read_text().splitlines()[0] == (reference / "results.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, MemoryError])
def test_interrupted_run_resumes_without_redoing_finished_objects(
    data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]
) -> None:
    out = tmp_path / "run"
    real = baseline.train_object
    calls: list[str] = []

    def interrupted_on_second(config, data_dir, layout, name):  # noqa: ANN001 - the real signature
        calls.append(name)
        if len(calls) == 2:
            raise interruption()
        return real(config, data_dir, layout, name)

    monkeypatch.setattr(baseline, "train_object", interrupted_on_second)
    if interruption is KeyboardInterrupt:
        assert cli.main(train_args(data, out)) == cli.EXIT_INTERRUPTED
    else:
        with pytest.raises(MemoryError):
            cli.main(train_args(data, out))
    assert calls == list(OBJECTS)
    first_model = out / "models" / "patchcore_pipe_clip.pt"
    before = (first_model.stat().st_ino, first_model.stat().st_mtime_ns, (out / "pipe_clip" / "metrics.json").stat().st_mtime_ns)
    assert not (out / "tank_screw").exists() and not temporaries(out)

    calls.clear()
    assert cli.main(train_args(data, out)) == 0
    assert calls == ["tank_screw"]  # the finished object was not recomputed
    assert (first_model.stat().st_ino, first_model.stat().st_mtime_ns, (out / "pipe_clip" / "metrics.json").stat().st_mtime_ns) == before
    assert "skipping pipe_clip: done" in (out / "logs" / "training.log").read_text()
    same_results(out, uninterrupted)
    assert not temporaries(out)


def test_crash_after_the_model_file_retrains_that_object(data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file without metrics.json (the crash hit between the two) is not 'done'."""
    out = tmp_path / "run"
    real = baseline.evaluate_object

    def crash_on_tank_screw(model, config, data_dir, layout, name, training):  # noqa: ANN001
        if name == "tank_screw":
            raise RuntimeError("simulated crash while scoring")
        return real(model, config, data_dir, layout, name, training)

    monkeypatch.setattr(baseline, "evaluate_object", crash_on_tank_screw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(train_args(data, out))
    assert (out / "models" / "patchcore_tank_screw.pt").is_file() and not (out / "tank_screw" / "metrics.json").exists()
    stale = (out / "models" / "patchcore_tank_screw.pt").stat().st_mtime_ns

    monkeypatch.setattr(baseline, "evaluate_object", real)
    assert cli.main(train_args(data, out)) == 0
    assert (out / "models" / "patchcore_tank_screw.pt").stat().st_mtime_ns > stale
    log = (out / "logs" / "training.log").read_text()
    assert "skipping pipe_clip: done" in log and "skipping tank_screw" not in log
    same_results(out, uninterrupted)


def test_force_redoes_finished_objects(data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    calls: list[str] = []
    real = baseline.train_object
    monkeypatch.setattr(baseline, "train_object", lambda *args: calls.append(args[3]) or real(*args))
    assert cli.main(train_args(data, out)) == 0 and calls == []
    assert cli.main([*train_args(data, out), "--force"]) == 0 and calls == list(OBJECTS)
    same_results(out, uninterrupted)


def test_output_folder_of_an_earlier_version_without_backbone_precision_resumes(
    data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder written before ``model.backbone_precision`` existed (its config.yaml lacks the
    key; those runs were float32) is the same configuration, with the same hash as before the
    key: nothing is refused or retrained. bfloat16 there is a difference, named as such."""
    import shutil

    default = RunConfig()
    earlier = {name: {k: v for k, v in asdict(getattr(default, name)).items() if k != "backbone_precision"} for name in baseline.RESULT_SECTIONS}
    assert baseline.config_hash(default) == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    assert baseline.config_differences(earlier, asdict(default)) == []
    default.model.backbone_precision = "bfloat16"
    assert baseline.config_differences(earlier, asdict(default)) == ["model.backbone_precision: 'float32' -> 'bfloat16'"]

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    lines = (out / "config.yaml").read_text().splitlines()
    assert any("backbone_precision: float32" in line for line in lines)
    (out / "config.yaml").write_text("\n".join(line for line in lines if "backbone_precision" not in line) + "\n")
    calls: list[str] = []
    real = baseline.train_object
    monkeypatch.setattr(baseline, "train_object", lambda *args: calls.append(args[3]) or real(*args))
    assert cli.main(train_args(data, out)) == 0 and calls == []
    same_results(out, uninterrupted)


# --------------------------------------------------------------------------------------------
# fedpatch.atomic
# --------------------------------------------------------------------------------------------
def test_atomic_writers_write_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.npy"
    assert atomic_write_bytes(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert target.read_text() == '{\n    "a": [\n        1.5\n    ],\n    "b": 1\n}\n'
    atomic_save(target, lambda tmp: np.save(tmp, np.arange(3), allow_pickle=False))
    with target.open("rb") as handle:
        np.testing.assert_array_equal(np.load(handle), np.arange(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.npy"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_atomic_writes_keep_the_old_file_and_leave_no_temporary(tmp_path: Path, failure: BaseException) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"old": True})

    def half_then_fail(handle) -> None:  # noqa: ANN001
        handle.write(b'{"new": tr')
        raise failure

    def save_half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, half_then_fail)
    with pytest.raises(type(failure)):
        atomic_save(target, save_half_then_fail)
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_json_refuses_nan_without_touching_the_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"auroc": float("nan")})
    assert json.loads(target.read_text()) == {"ok": 1} and os.listdir(tmp_path) == ["m.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    """Temporary files start as 0600; the renamed result must follow the umask like open() does."""
    previous = os.umask(umask)
    try:
        written = [
            atomic_write_text(tmp_path / "a.md", "x"),
            atomic_save(tmp_path / "b.npy", lambda tmp: np.save(tmp, np.zeros(2))),
        ]
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [expected, expected]
