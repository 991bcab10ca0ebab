"""configs/baseline/*.yaml hold every key with a comment and the seed's values; configs/README.md
documents every key of every section with its real default."""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import yaml

from fedpatch.config import RunConfig, load_config
from fedpatch.workflow import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASELINE = CONFIGS / "baseline" / "patchcore.yaml"
OFFLINE = CONFIGS / "baseline" / "patchcore_offline.yaml"
TRAIN_SECTIONS = ("model", "data", "evaluation", "runtime")  # `federated` is not used by train

SEED = {
    "model": {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"], "coreset_percentage": 0.1, "neighborhood_size": 3, "num_neighbors": 9},
    "data": {"resize_small": [400, 400], "resize_large": [1000, 750]},
    "evaluation": {"anomaly_threshold": None},
}


@pytest.mark.parametrize("path", [BASELINE, OFFLINE], ids=lambda p: p.name)
def test_every_key_is_present_and_commented(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    defaults = RunConfig()
    assert set(raw) == set(TRAIN_SECTIONS)
    for section in TRAIN_SECTIONS:
        assert set(raw[section]) == {f.name for f in fields(getattr(defaults, section))}, section
    for line in path.read_text().splitlines():
        if re.match(r"^  [a-z_]+:", line):
            assert "#" in line, f"{path.name}: key without a comment: {line.strip()}"
    load_config(path)  # valid as a whole


def test_baseline_holds_the_seed_hyperparameters() -> None:
    raw = yaml.safe_load(BASELINE.read_text())
    for section, values in SEED.items():
        for key, value in values.items():
            assert raw[section][key] == value, f"{section}.{key}"


def test_offline_config_differs_only_in_the_backbone() -> None:
    baseline, offline = yaml.safe_load(BASELINE.read_text()), yaml.safe_load(OFFLINE.read_text())
    assert offline["model"].pop("backbone") == "efficientnet_lite0"
    assert offline["model"].pop("layers") == ["blocks.2", "blocks.4"]
    del baseline["model"]["backbone"], baseline["model"]["layers"]
    assert offline == baseline


def test_offline_config_builds_with_real_weights_without_network() -> None:
    model = build_model(load_config(OFFLINE, ["runtime.device=cpu"]))
    assert model.extractor.pretrained and model.feature_dim == 40 + 112
    stem = next(m for m in model.extractor.modules() if isinstance(m, torch.nn.Conv2d))
    # the BatchNorm folded into the stem conv gives it a bias: zero from a fresh init, varied from trained statistics
    assert stem.bias is not None and float(stem.bias.std()) > 0.01


def readme_rows() -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` from the tables of configs/README.md."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in (CONFIGS / "README.md").read_text().splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            section = heading.group(1)
            rows[section] = {}
            continue
        cell = re.match(r"^\| `(\w+)` \| `([^`]*)` \|", line)
        if section and cell:
            rows[section][cell.group(1)] = cell.group(2)
    return rows


def test_readme_documents_every_key_with_its_default() -> None:
    rows = readme_rows()
    defaults = asdict(RunConfig())
    assert set(rows) == set(defaults)
    for section, values in defaults.items():
        assert set(rows[section]) == set(values), section
        for key, value in values.items():
            assert yaml.safe_load(rows[section][key]) == value, f"{section}.{key}"


def test_readme_explains_the_missing_normalisation_key() -> None:
    text = (CONFIGS / "README.md").read_text()
    assert "normalisation" in text and "owns its" in text
    assert "normalisation" not in {f.name for f in fields(RunConfig().data)} | {f.name for f in fields(RunConfig().model)}
