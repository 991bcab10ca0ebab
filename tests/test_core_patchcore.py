"""PatchCore end to end on tiny images with a random resnet18: fit, predict, input kinds, image
scores against brute force, persistence (safetensors only), bank exchange, device, options."""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

import fedpatch.patchcore as patchcore_module
from fedpatch import PatchCore
from fedpatch.coreset import greedy_coreset_selection
from fedpatch.errors import BankValidationError, ModelFileError
from fedpatch.features import extract_patch_features

ImageFactory = Callable[..., list[torch.Tensor]]  # the ``make_images`` fixture of conftest.py
PATCHES_PER_64PX_IMAGE = 8 * 8  # stride-8 grid of a 64x64 image


def tiny_model(**options: object) -> PatchCore:
    """An unfitted resnet18 PatchCore with random weights on the CPU."""
    return PatchCore("resnet18", pretrained=False, device="cpu", **options)  # type: ignore[arg-type]


def patch_rows(model: PatchCore, images: list[torch.Tensor]) -> np.ndarray:
    """The model's patch vectors of ``images`` (same size), row-major (image, row, col)."""
    return extract_patch_features(model.embed(torch.stack(images))).numpy()


def nearest_distances(bank: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (distance, index) of each row's nearest bank vector, float64."""
    dist = np.sqrt(((rows.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1))
    return dist.min(axis=1), dist.argmin(axis=1)


class TupleDataset(Dataset):
    """A map-style dataset of ``(image, label, name)`` tuples."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        return self.images[index], 0, f"img{index}"


class _Payload:
    """Unpickling this object creates ``marker`` (stands for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------
def test_fit_single_chunk_bank_is_greedy_coreset(fitted_model: PatchCore, train_images: list[torch.Tensor]) -> None:
    patches = len(train_images) * PATCHES_PER_64PX_IMAGE
    stats = fitted_model.fit_stats
    assert (stats.images, stats.patches_seen, stats.chunks) == (6, patches, 1)
    assert stats.bank_size == math.ceil(0.1 * patches) == 39
    bank = fitted_model.get_memory_bank()
    assert bank.shape == (39, 128 + 256) and bank.dtype == np.float32
    expected = greedy_coreset_selection(patch_rows(fitted_model, train_images), 39, seed=42, projection_dim=128)
    np.testing.assert_allclose(bank, expected, rtol=1e-5, atol=1e-6)


def test_fit_streams_in_chunks(train_images: list[torch.Tensor]) -> None:
    model = tiny_model(coreset_chunk_size=100, batch_size=4).fit(train_images)
    # 384 patches -> chunks of 100, 100, 100, 84 -> 10 + 10 + 10 + 9 rows
    assert model.fit_stats.chunks == 4
    assert len(model.get_memory_bank()) == 39
    rows = patch_rows(model, train_images)
    distances, _ = nearest_distances(rows, model.get_memory_bank())
    assert distances.max() < 1e-4  # every bank vector is a training patch


def test_fit_without_images() -> None:
    with pytest.raises(ValueError, match="no images"):
        tiny_model().fit([])


def test_target_dim_reduces_bank_width(train_images: list[torch.Tensor]) -> None:
    model = tiny_model(target_dim=96).fit(train_images[:2])
    assert model.feature_dim == 96 and model.get_memory_bank().shape[1] == 96
    assert model.predict(train_images[:1])[0].shape == (64, 64)
    with pytest.raises(ValueError, match="exceeds the backbone feature dim 384"):
        tiny_model(target_dim=1000)


# --------------------------------------------------------------------------------------------
# Predict: sizes, input kinds, consistency
# --------------------------------------------------------------------------------------------
def test_maps_have_each_inputs_native_size(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    square = make_images(2, 64, 64, seed=10)
    tall = make_images(1, 80, 48, seed=11)[0]
    images = [square[0], tall, square[1]]
    predictions = list(fitted_model.iter_predictions(images))
    assert [p.anomaly_map.shape for p in predictions] == [(64, 64), (80, 48), (64, 64)]
    assert [p.patch_scores.shape for p in predictions] == [(8, 8), (10, 6), (8, 8)]
    for image, prediction in zip(images, predictions):
        assert prediction.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(prediction.anomaly_map, fitted_model.predict_single(image), rtol=1e-4, atol=1e-5)


def test_uint8_and_float_inputs_are_equivalent(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    as_uint8 = make_images(3, 64, 64, seed=12, uint8=True)
    as_float = [img.float() / 255.0 for img in as_uint8]
    for got, expected in zip(fitted_model.predict(as_uint8), fitted_model.predict(as_float)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(TypeError, match="float in \\[0, 1\\] or uint8"):
        fitted_model.predict([as_uint8[0].to(torch.int32)])


def test_dataset_list_and_dataloader_inputs_agree(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    images = make_images(5, 64, 64, seed=13)
    from_list = fitted_model.predict(images)
    from_dataset = fitted_model.predict(TupleDataset(images))
    from_loader = fitted_model.predict(DataLoader(TupleDataset(images), batch_size=2))
    assert len(from_list) == len(from_dataset) == len(from_loader) == 5
    for a, b, c in zip(from_list, from_dataset, from_loader):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    scores = fitted_model.predict_scores(DataLoader(TupleDataset(images), batch_size=3))
    np.testing.assert_allclose(scores, fitted_model.predict_scores(images), rtol=1e-4)


def test_fit_accepts_a_dataloader(train_images: list[torch.Tensor]) -> None:
    model = tiny_model().fit(DataLoader(TupleDataset(train_images), batch_size=4))
    assert model.fit_stats.images == 6
    assert len(model.get_memory_bank()) == 39


def test_predict_single_equals_predict(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    image = make_images(1, 72, 56, seed=14)[0]
    np.testing.assert_array_equal(fitted_model.predict_single(image), fitted_model.predict([image])[0])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        fitted_model.predict_single(image.unsqueeze(0))


def test_predict_before_fit() -> None:
    with pytest.raises(RuntimeError, match="no memory bank"):
        tiny_model().predict([torch.rand(3, 64, 64)])


def test_patch_scores_are_nearest_bank_distances(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    images = make_images(2, 64, 64, seed=15)
    predictions = list(fitted_model.iter_predictions(images))
    distances, _ = nearest_distances(fitted_model.get_memory_bank(), patch_rows(fitted_model, images))
    got = np.stack([p.patch_scores for p in predictions]).reshape(-1)
    np.testing.assert_allclose(got, distances, rtol=1e-3, atol=1e-3)
    for p in predictions:  # the map is an upsampled, smoothed copy of the patch scores
        assert p.patch_scores.min() - 1e-4 <= p.anomaly_map.min() <= p.anomaly_map.max() <= p.patch_scores.max() + 1e-4


def test_score_with_one_neighbour_is_raw_max_patch_score(
    fitted_model: PatchCore, train_images: list[torch.Tensor], make_images: ImageFactory
) -> None:
    images = make_images(3, 64, 64, seed=16)
    plain = tiny_model(num_neighbors=1)
    plain.set_memory_bank(fitted_model.get_memory_bank())
    scores = plain.predict_scores(images)
    distances, _ = nearest_distances(plain.get_memory_bank(), patch_rows(plain, images))
    expected = distances.reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert scores.dtype == np.float64
    for p in plain.iter_predictions(images):
        assert p.score == pytest.approx(float(p.patch_scores.max()), rel=1e-6)


def test_reweighted_score_follows_the_paper_rule(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    """num_neighbors=9: s = (1 - softmax(-)[0]) * s*, from m* and its 8 bank neighbours, by hand."""
    images = make_images(3, 64, 64, seed=17)
    scores = fitted_model.predict_scores(images)
    bank = fitted_model.get_memory_bank().astype(np.float64)
    rows = patch_rows(fitted_model, images).reshape(3, PATCHES_PER_64PX_IMAGE, -1)
    for score, image_rows in zip(scores, rows):
        dist, nearest = nearest_distances(bank, image_rows)
        top = int(dist.argmax())
        anchor = int(nearest[top])
        anchor_dist = np.linalg.norm(bank - bank[anchor], axis=1)
        support = [anchor] + [int(j) for j in np.argsort(anchor_dist) if j != anchor][:8]
        d = np.linalg.norm(bank[support] - image_rows[top], axis=1)
        weights = np.exp(d - d.max()) / np.exp(d - d.max()).sum()
        assert score == pytest.approx((1.0 - weights[0]) * dist[top], rel=1e-4)
        assert 0.0 < score < dist[top]


def test_a_batch_scores_its_images_as_they_score_alone(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    """Each batch reweights all its image scores with one bank search; the result is per image."""
    images = make_images(5, 64, 64, seed=23)
    together = list(fitted_model.iter_predictions(images))  # one batch of 5
    alone = [next(fitted_model.iter_predictions([image])) for image in images]
    assert len({p.score for p in together}) == 5  # five different images, five different scores
    for joint, single in zip(together, alone):
        assert joint.score == pytest.approx(single.score, rel=1e-6)
        np.testing.assert_allclose(joint.patch_scores, single.patch_scores, rtol=1e-6)


def test_anomalous_region_is_found(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    """A pasted high-contrast square scores above clean images and holds the map's peak."""
    clean = make_images(3, 64, 64, seed=18)
    defect = make_images(1, 64, 64, seed=19)[0].clone()
    checker = (torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2
    defect[:, 36:52, 12:28] = checker.float()
    predictions = list(fitted_model.iter_predictions([*clean, defect]))
    assert predictions[-1].score > max(p.score for p in predictions[:-1])
    row, col = np.unravel_index(np.argmax(predictions[-1].anomaly_map), (64, 64))
    assert 30 <= row <= 58 and 6 <= col <= 34


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------
def test_save_load_round_trip(fitted_model: PatchCore, make_images: ImageFactory, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.safetensors"
    fitted_model.save(path)
    loaded = PatchCore.load(path, device="cpu", backbone="resnet18")
    assert loaded.config == fitted_model.config
    np.testing.assert_array_equal(loaded.get_memory_bank(), fitted_model.get_memory_bank())
    images = [*make_images(2, 64, 64, seed=20), make_images(1, 48, 80, seed=21)[0]]
    for a, b in zip(loaded.iter_predictions(images), fitted_model.iter_predictions(images)):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score


def test_threshold_and_input_size_are_saved(fitted_model: PatchCore, tmp_path: Path) -> None:
    model = tiny_model()
    model.set_memory_bank(fitted_model.get_memory_bank())
    model.threshold = 1.25
    model.input_size = (256, 128)
    model.save(tmp_path / "m.safetensors")
    loaded = PatchCore.load(tmp_path / "m.safetensors", device="cpu")
    assert (loaded.threshold, loaded.input_size) == (1.25, (256, 128))


def test_save_load_with_weights_path(tmp_path: Path, train_images: list[torch.Tensor]) -> None:
    """A model built from ``weights=Path`` saves (JSON-safe config) and reloads the same weights."""
    torch.manual_seed(3)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = PatchCore("resnet18", device="cpu", weights=weights).fit(train_images[:2])
    model.save(tmp_path / "m.safetensors")
    loaded = PatchCore.load(tmp_path / "m.safetensors", device="cpu")
    assert loaded.config.weights == str(weights)
    np.testing.assert_array_equal(loaded.predict(train_images[2:3])[0], model.predict(train_images[2:3])[0])


def test_load_valid_file_whose_header_length_starts_with_0x80(
    fitted_model: PatchCore, tmp_path: Path, train_images: list[torch.Tensor]
) -> None:
    """A safetensors header length of 128 + 256 k puts byte 0x80 first, like a pickle; it must load.

    The header length depends on the recorded config (here the weights path), so any user can
    hit it; the file name is varied until the length has that form.
    """
    torch.manual_seed(4)
    state = torchvision.models.resnet18(weights=None).state_dict()
    model = tiny_model()
    model.set_memory_bank(fitted_model.get_memory_bank())
    path = tmp_path / "m.safetensors"
    for extra in range(300):
        model.config.weights = str(tmp_path / ("w" * (extra + 1) + ".pt"))
        model.save(path)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no weights path length gave a header length of the form 128 + 256 k")
    torch.save(state, model.config.weights)
    loaded = PatchCore.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.get_memory_bank(), model.get_memory_bank())
    assert loaded.config.weights == model.config.weights


@pytest.mark.parametrize("kind", ["torch.save", "pickle-protocol-2", "pickle-protocol-0"])
def test_load_refuses_pickle_files_without_running_them(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    if kind == "torch.save":
        torch.save({"memory_bank": torch.zeros(2, 2), "config": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=int(kind[-1])))
    with pytest.raises(ModelFileError, match="evil.safetensors"):
        PatchCore.load(path, device="cpu")
    assert not marker.exists()
    # the payload is live: unpickling it would have created the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()


def test_load_torch_save_file_says_it_is_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"memory_bank": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelFileError, match="pickle/zip archive .* never unpickles"):
        PatchCore.load(path, device="cpu")


def test_load_backbone_mismatch(fitted_model: PatchCore, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    fitted_model.save(path)
    with pytest.raises(ModelFileError, match="trained with backbone 'resnet18', not 'wide_resnet50_2'"):
        PatchCore.load(path, device="cpu", backbone="wide_resnet50_2")


def test_load_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model file not found: .*absent.safetensors"):
        PatchCore.load(tmp_path / "absent.safetensors")
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"memory_bank": np.zeros((2, 384), np.float32)}, str(foreign), metadata={"format": "other/1"})
    with pytest.raises(ModelFileError, match="foreign.safetensors: unexpected format 'other/1'"):
        PatchCore.load(foreign)


# --------------------------------------------------------------------------------------------
# Bank exchange
# --------------------------------------------------------------------------------------------
def test_set_memory_bank_validates(fitted_model: PatchCore) -> None:
    model = tiny_model()
    with pytest.raises(BankValidationError, match="memory bank: feature dimension 100 does not match 384"):
        model.set_memory_bank(np.zeros((5, 100), np.float32))
    bad = fitted_model.get_memory_bank()
    bad[3, 7] = np.nan
    with pytest.raises(BankValidationError, match=r"memory bank: 1 row\(s\) hold NaN"):
        model.set_memory_bank(bad)
    assert model.memory_bank is None  # nothing half-set
    model.set_memory_bank(fitted_model.get_memory_bank().astype(np.float64))
    assert model.get_memory_bank().dtype == np.float32


def test_get_memory_bank_returns_a_copy(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    image = make_images(1, 64, 64, seed=22)[0]
    before = fitted_model.predict_single(image)
    bank = fitted_model.get_memory_bank()
    original = bank.copy()
    bank[:] = 0.0
    np.testing.assert_array_equal(fitted_model.get_memory_bank(), original)
    np.testing.assert_array_equal(fitted_model.predict_single(image), before)


def test_set_bank_from_other_model_gives_same_predictions(fitted_model: PatchCore, make_images: ImageFactory) -> None:
    """The federated exchange: a fresh model with the received bank scores like the sender."""
    receiver = tiny_model()
    receiver.set_memory_bank(fitted_model.get_memory_bank())
    images = make_images(2, 64, 64, seed=23)
    np.testing.assert_array_equal(receiver.predict_scores(images), fitted_model.predict_scores(images))


# --------------------------------------------------------------------------------------------
# Device and options
# --------------------------------------------------------------------------------------------
def test_cuda_without_gpu_warns_and_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch, fitted_model: PatchCore, make_images: ImageFactory
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no CUDA GPU is available; running on CPU"):
        model = PatchCore("resnet18", pretrained=False, device="cuda")
    assert model.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in model.extractor.parameters())
    model.set_memory_bank(fitted_model.get_memory_bank())
    image = make_images(1, 64, 64, seed=24)[0]
    np.testing.assert_array_equal(model.predict_single(image), fitted_model.predict_single(image))
    assert PatchCore("resnet18", pretrained=False, device="auto").device.type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        PatchCore("resnet18", pretrained=False, device="tpu")


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_backbone_warns_where_the_cpu_emulates_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(patchcore_module, "native_bfloat16_cpu", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PatchCore("resnet18", pretrained=False, device="cpu", backbone_precision="bfloat16")
    messages = [str(w.message) for w in caught if "bfloat16" in str(w.message)]
    assert model.extractor.precision == "bfloat16"
    assert messages == ([] if native else [
        "backbone_precision bfloat16 on a CPU without native bfloat16 products (AVX512-BF16 or AMX): "
        "it is emulated and slower than float32 here"
    ])


def test_bfloat16_backbone_is_saved_with_the_model(train_images: list[torch.Tensor], make_images: ImageFactory, tmp_path: Path) -> None:
    """The precision travels with the model file: the reloaded model extracts in bfloat16 and
    scores exactly as the fitted one; its scores differ from a float32 model's of the same bank."""
    model = tiny_model(backbone_precision="bfloat16").fit(train_images[:3])
    model.save(tmp_path / "bf16.safetensors")
    loaded = PatchCore.load(tmp_path / "bf16.safetensors", device="cpu")
    assert loaded.config.backbone_precision == "bfloat16" and loaded.extractor.precision == "bfloat16"
    image = make_images(1, 64, 64, seed=30)[0]
    np.testing.assert_array_equal(loaded.predict_single(image), model.predict_single(image))
    exact = tiny_model()
    exact.set_memory_bank(model.get_memory_bank())
    assert not np.array_equal(exact.predict_single(image), model.predict_single(image))


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown PatchCore option\\(s\\): coreset_ratio"):
        PatchCore("resnet18", pretrained=False, device="cpu", coreset_ratio=0.1)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"coreset_percentage": 0.0}, "coreset_percentage"),
        ({"coreset_percentage": 1.5}, "coreset_percentage"),
        ({"neighborhood_size": 2}, "neighborhood_size"),
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"coreset_method": "kmeans"}, "coreset_method"),
        ({"batch_size": 0}, "batch_size"),
        ({"backbone_precision": "float16"}, "backbone_precision"),
    ],
)
def test_out_of_range_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"PatchCore {field} must be"):
        tiny_model(**options)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.full((3, 32, 32), 200.0), "must be in [0, 1]"),
        (torch.full((3, 32, 32), float("nan")), "NaN"),
        (torch.full((3, 32, 32), -0.5), "must be in [0, 1]"),
    ],
)
def test_float_images_outside_unit_range_are_refused(image: torch.Tensor, message: str) -> None:
    model = PatchCore("resnet18", pretrained=False, device="cpu")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.fit([image])
