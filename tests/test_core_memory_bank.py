"""MemoryBank: exact search against numpy brute force, validation, size cap, persistence."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fedpatch import memory_bank, screened_search
from fedpatch.errors import BankValidationError, ModelFileError
from fedpatch.memory_bank import IndexSpec, MemoryBank, validate_bank_array

if TYPE_CHECKING:
    from fedpatch import PatchCore


def brute_force_knn(bank: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64 with explicit differences: (distances, indices), ascending."""
    dist = np.sqrt(((query.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def make_bank(vectors: np.ndarray, max_size: int | None = None, index: str = "flat") -> MemoryBank:
    """A bank holding ``vectors``."""
    bank = MemoryBank(vectors.shape[1], max_size=max_size, index=index)
    bank.add(vectors)
    return bank


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------
def test_search_k1_equals_brute_force(rng: np.random.Generator) -> None:
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    query = rng.normal(size=(300, 32)).astype(np.float32)
    distances, indices = make_bank(vectors).search(query, k=1)
    ref_d, ref_i = brute_force_knn(vectors, query, 1)
    assert distances.shape == indices.shape == (300, 1)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4, atol=1e-4)


def test_search_k_neighbours_are_ordered(rng: np.random.Generator) -> None:
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    query = rng.normal(size=(50, 16)).astype(np.float32)
    distances, indices = make_bank(vectors).search(query, k=7)
    ref_d, ref_i = brute_force_knn(vectors, query, 7)
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-4, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_distances_are_euclidean_not_squared() -> None:
    bank = make_bank(np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32))
    distances, indices = bank.search(np.array([[3.0, 4.0]], dtype=np.float32), k=2)
    np.testing.assert_allclose(distances, [[5.0, np.hypot(7.0, 4.0)]], rtol=1e-6)
    assert indices.tolist() == [[0, 1]]


def test_query_of_bank_members_gives_zero_not_nan(rng: np.random.Generator) -> None:
    vectors = (rng.normal(size=(200, 64)) * 100).astype(np.float32)
    distances, indices = make_bank(vectors).search(vectors, k=1)
    assert np.array_equal(indices[:, 0], np.arange(200))
    assert np.isfinite(distances).all() and (distances >= 0).all()
    assert distances.max() < 0.5  # rounding only (norms are ~800)


def test_search_argument_errors(rng: np.random.Generator) -> None:
    bank = make_bank(rng.normal(size=(5, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        bank.search(np.zeros((1, 4), np.float32), k=6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        bank.search(np.zeros((1, 4), np.float32), k=0)
    with pytest.raises(ValueError, match=r"query must be \[M, 4\]"):
        bank.search(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="empty"):
        MemoryBank(4).search(np.zeros((1, 4), np.float32))
    distances, indices = bank.search(np.zeros((0, 4), np.float32), k=2)
    assert distances.shape == indices.shape == (0, 2)


def test_add_appends_in_order_and_copies(rng: np.random.Generator) -> None:
    first = rng.normal(size=(10, 3)).astype(np.float32)
    second = rng.normal(size=(5, 3))  # float64: converted
    bank = MemoryBank(3)
    bank.add(first)
    bank.add(second)
    assert len(bank) == 15
    first[:] = 0.0  # the bank does not alias the caller's buffer
    vectors = bank.vectors
    assert vectors.dtype == np.float32 and vectors.shape == (15, 3)
    assert np.abs(vectors[:10]).min() > 0
    np.testing.assert_array_equal(vectors[10:], second.astype(np.float32))
    with pytest.raises(ValueError):
        vectors[0, 0] = 1.0  # read-only view
    bank.add(torch.ones(2, 3))  # CPU tensors are accepted
    assert len(bank) == 17 and bank.search(np.ones((1, 3), np.float32))[1][0, 0] in (15, 16)


# --------------------------------------------------------------------------------------------
# Validation and size cap
# --------------------------------------------------------------------------------------------
def test_max_size_is_enforced(rng: np.random.Generator) -> None:
    bank = MemoryBank(4, max_size=10)
    bank.add(rng.normal(size=(8, 4)).astype(np.float32))
    with pytest.raises(BankValidationError, match="max_size 10"):
        bank.add(rng.normal(size=(3, 4)).astype(np.float32))
    assert len(bank) == 8
    bank.add(rng.normal(size=(2, 4)).astype(np.float32))
    assert len(bank) == 10
    with pytest.raises(ValueError, match="max_size"):
        MemoryBank(4, max_size=0)
    with pytest.raises(ValueError, match="feature_dim"):
        MemoryBank(0)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([[0.0, np.nan, 1.0, 2.0]], np.float32), r"1 row\(s\) hold NaN or infinite"),
        (np.array([[0.0, 1.0, 1.0, 2.0], [np.inf, 0, 0, 0], [0, 0, -np.inf, 0]]), r"2 row\(s\) hold NaN or infinite"),
        (np.zeros((3, 5), np.float32), "feature dimension 5 does not match 4"),
        (np.zeros((3, 4), np.int64), "floating-point array, got dtype int64"),
        (np.zeros(4, np.float32), r"2-D array \[N, D\]"),
        (np.zeros((0, 4), np.float32), "no rows"),
    ],
)
def test_invalid_arrays_are_rejected(array: np.ndarray, match: str) -> None:
    bank = MemoryBank(4)
    with pytest.raises(BankValidationError, match=match):
        bank.add(array)
    assert len(bank) == 0
    with pytest.raises(BankValidationError, match=f"client-7: .*{match}"):
        validate_bank_array(array, 4, source="client-7")


def test_validate_returns_contiguous_float32() -> None:
    array = np.arange(12, dtype=np.float64).reshape(4, 3)[:, ::2]
    out = validate_bank_array(array, 2)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)
    with pytest.raises(BankValidationError, match="expected a numpy array, got list"):
        validate_bank_array([[1.0, 2.0]], 2)


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    vectors = rng.normal(size=(120, 24)).astype(np.float32)
    bank = make_bank(vectors[:100], max_size=500)
    bank.add(vectors[100:])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert not (tmp_path / "bank.safetensors.tmp").exists()
    loaded = MemoryBank.load(path)
    assert loaded.feature_dim == 24 and loaded.max_size == 500 and len(loaded) == 120
    np.testing.assert_array_equal(loaded.vectors, vectors)
    query = rng.normal(size=(30, 24)).astype(np.float32)
    for got, expected in zip(loaded.search(query, k=3), bank.search(query, k=3)):
        np.testing.assert_array_equal(got, expected)


def test_load_non_bank_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"definitely not a bank" * 20)
    with pytest.raises(ModelFileError, match="garbage.bin"):
        MemoryBank.load(garbage)

    other = tmp_path / "other.safetensors"
    save_file({"weights": np.zeros((2, 2), np.float32)}, str(other))
    with pytest.raises(ModelFileError, match="other.safetensors"):
        MemoryBank.load(other)

    no_format = tmp_path / "no_format.safetensors"
    save_file({"vectors": np.zeros((2, 2), np.float32)}, str(no_format))
    with pytest.raises(ModelFileError, match="no_format.safetensors: unexpected format None"):
        MemoryBank.load(no_format)

    with pytest.raises(ModelFileError, match="missing.safetensors"):
        MemoryBank.load(tmp_path / "missing.safetensors")


def test_load_rejects_bad_vectors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    vectors = np.ones((3, 2), np.float32)
    vectors[1, 1] = np.nan
    meta = {"format": "fedpatch-memory-bank/1", "feature_dim": "2", "max_size": "null"}
    save_file({"vectors": vectors}, str(path), metadata=meta)
    with pytest.raises(BankValidationError, match=r"nan.safetensors: 1 row\(s\) hold NaN"):
        MemoryBank.load(path)


class _Payload:
    """Unpickling this object creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_load_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, data in [
        ("torch.pt", None),
        ("proto2.pkl", pickle.dumps(_Payload(marker), protocol=2)),
        ("proto0.pkl", pickle.dumps(_Payload(marker), protocol=0)),
    ]:
        path = tmp_path / name
        if data is None:
            torch.save({"vectors": _Payload(marker)}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(ModelFileError, match=name):
            MemoryBank.load(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Approximate indexes and device search
# --------------------------------------------------------------------------------------------
def clustered(rng: np.random.Generator, n: int, dim: int, centres: int = 40) -> np.ndarray:
    """Points around ``centres`` Gaussian centres: the structure patch features have."""
    middle = rng.normal(size=(centres, dim)) * 4
    return (middle[rng.integers(centres, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flat", IndexSpec("flat")),
        ("ivf", IndexSpec("ivf")),
        ("ivf:nlist=64,nprobe=4", IndexSpec("ivf", nlist=64, nprobe=4)),
        ("hnsw:m=16,ef_search=32", IndexSpec("hnsw", m=16, ef_search=32)),
    ],
)
def test_index_spec_parses_and_prints(text: str, expected: IndexSpec) -> None:
    spec = IndexSpec.parse(text)
    assert spec == expected
    assert IndexSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("annoy", "index kind must be one of flat, ivf, hnsw"),
        ("flat:nprobe=3", "flat takes no parameters"),
        ("hnsw:nprobe=3", "hnsw takes m=INT, ef_search=INT"),
        ("ivf:nlist=0", "nlist must be >= 1"),
        ("ivf:nlist=abc", "bad parameter 'nlist=abc'"),
    ],
)
def test_index_spec_errors_name_the_part(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IndexSpec.parse(text)


def test_ivf_cells_are_capped_by_training_points() -> None:
    assert IndexSpec("ivf").cells(10_000) == 256  # 4 * sqrt(M) = 400, but 10,000 // 39 = 256
    assert IndexSpec("ivf").cells(1_000_000) == 4000
    assert IndexSpec("ivf", nlist=50).cells(100) == 2


@pytest.mark.parametrize("index", ["hnsw", "ivf:nprobe=8"])
def test_approximate_indexes_have_high_recall(rng: np.random.Generator, index: str) -> None:
    vectors = clustered(rng, 6000, 48)
    query = vectors[rng.choice(6000, 500, replace=False)] + rng.normal(size=(500, 48)).astype(np.float32) * 0.3
    exact_d, exact_i = make_bank(vectors).search(query, k=1)
    bank = MemoryBank(48, index=index)
    bank.add(vectors)
    distances, indices = bank.search(query, k=3)
    assert distances.shape == indices.shape == (500, 3) and (indices >= 0).all()
    recall = float((indices[:, 0] == exact_i[:, 0]).mean())
    assert recall >= 0.9, recall
    assert (distances[:, 0] >= exact_d[:, 0] - 1e-4).all()  # never closer than the true nearest
    np.testing.assert_allclose(np.median(distances[:, 0] / exact_d[:, 0]), 1.0, rtol=1e-3)


def test_ivf_rows_it_cannot_fill_are_searched_exactly(rng: np.random.Generator) -> None:
    vectors = clustered(rng, 400, 8, centres=4)
    bank = MemoryBank(8, index="ivf:nlist=10,nprobe=1")
    bank.add(vectors)
    distances, indices = bank.search(vectors[:20], k=200)  # more neighbours than one cell holds
    assert (indices >= 0).all()
    exact_d, _ = make_bank(vectors).search(vectors[:20], k=200)
    np.testing.assert_allclose(distances, exact_d, rtol=1e-4, atol=1e-3)


def test_index_is_saved_with_the_bank(tmp_path: Path, rng: np.random.Generator) -> None:
    bank = MemoryBank(16, index="hnsw:m=8")
    bank.add(clustered(rng, 300, 16))
    bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(tmp_path / "bank.safetensors")
    assert loaded.index_spec == IndexSpec("hnsw", m=8)
    query = clustered(rng, 20, 16)
    for got, expected in zip(loaded.search(query, k=2), bank.search(query, k=2)):
        np.testing.assert_array_equal(got, expected)


def test_search_tensor_matches_exact_search(rng: np.random.Generator) -> None:
    vectors = rng.normal(size=(700, 24)).astype(np.float32)
    query = rng.normal(size=(300, 24)).astype(np.float32)
    bank = make_bank(vectors)
    for k in (1, 4):
        distances, indices = bank.search_tensor(torch.from_numpy(query), k=k, chunk_rows=64)
        ref_d, ref_i = brute_force_knn(vectors, query, k)
        assert isinstance(distances, torch.Tensor) and distances.shape == (300, k)
        assert np.array_equal(indices.numpy(), ref_i)
        np.testing.assert_allclose(distances.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    bank.add(query[:1])  # the device copy follows the bank
    assert bank.search_tensor(torch.from_numpy(query[:1]))[1][0, 0] == 700
    empty_d, empty_i = bank.search_tensor(torch.empty(0, 24), k=2)
    assert empty_d.shape == empty_i.shape == (0, 2) and empty_i.dtype == torch.int64


@pytest.mark.parametrize("screened", [True, False])
def test_wide_flat_search_is_exact_with_either_cpu_kernel(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, screened: bool) -> None:
    # 384-d (>= SCREEN_MIN_DIM, 128): 1-NN takes the screened int8 search where the CPU has int8
    # dot-product instructions, faiss otherwise (and for k > 1); both must give float64 brute force's neighbours
    if screened and not screened_search.available():
        pytest.skip("this CPU has no int8 dot-product instructions: faiss is the only CPU kernel here")
    monkeypatch.setattr(screened_search, "available", lambda: screened)
    calls: list[int] = []
    nearest = screened_search.ScreenedSearch.nearest
    monkeypatch.setattr(screened_search.ScreenedSearch, "nearest", lambda self, q: calls.append(len(q)) or nearest(self, q))
    vectors = (np.maximum(rng.normal(size=(900, 384)), 0) + 0.5).astype(np.float32)  # ReLU-like, with an offset
    query = (vectors[rng.integers(900, size=400)] + 0.3 * rng.normal(size=(400, 384))).astype(np.float32)
    query[:5] = vectors[:5]  # bank members: distance 0, not a rounding residue
    bank = make_bank(vectors)
    for k in (1, 3):
        distances, indices = bank.search(query, k=k)
        ref_d, ref_i = brute_force_knn(vectors, query, k)
        assert indices.dtype == np.int64 and distances.dtype == np.float32 and indices.shape == (400, k)
        assert np.array_equal(indices, ref_i)
        exact = screened and k == 1  # distances from the differences
        np.testing.assert_allclose(distances, ref_d, rtol=2e-6 if exact else 1e-4, atol=1e-6 if exact else 2e-2)  # faiss: cancellation (0.011 for a member)
    assert calls == ([400] if screened else [])
    if screened:
        assert np.array_equal(bank.search(query[:5], k=1)[0][:, 0], np.zeros(5, np.float32))
        bank.add(query[5:6])  # the screen's int8 form follows the bank
        assert bank.search(query[5:6], k=1)[1][0, 0] == 900


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("k", [1, 2])
def test_non_finite_query_rows_are_refused(rng: np.random.Generator, index: str, k: int) -> None:
    # every kernel (screened int8, faiss flat, an approximate index) leaves them unmatched
    vectors = (np.maximum(rng.normal(size=(300, 160)), 0) + 0.5).astype(np.float32)  # >= SCREEN_MIN_DIM
    query = vectors[:6].copy()
    query[2, 7], query[4, 0] = np.nan, np.inf
    bank = make_bank(vectors, index=index)
    with pytest.raises(ValueError, match=r"query: 2 row\(s\) hold NaN or infinite values \(the first is row 2\)"):
        bank.search(query, k=k)
    assert np.array_equal(bank.search(query[[0, 1, 3]], k=k)[1][:, 0], [0, 1, 3])


def test_patchcore_index_option_is_used_saved_and_validated(
    tmp_path: Path, fitted_model: PatchCore, make_images: Callable[..., list[torch.Tensor]]
) -> None:
    from fedpatch import PatchCore

    test_images = make_images(3, seed=5)
    exact = fitted_model.predict_scores(test_images)
    model = PatchCore("resnet18", pretrained=False, device="cpu", index="hnsw:ef_search=256")
    model.set_memory_bank(fitted_model.get_memory_bank())
    assert model.memory_bank.index_spec == IndexSpec("hnsw", ef_search=256)
    np.testing.assert_allclose(model.predict_scores(test_images), exact, rtol=1e-5)  # a small bank: HNSW finds every neighbour
    model.save(tmp_path / "model.pt")
    loaded = PatchCore.load(tmp_path / "model.pt", device="cpu")
    assert loaded.config.index == "hnsw:ef_search=256" and loaded.memory_bank.index_spec.kind == "hnsw"
    with pytest.raises(ValueError, match="PatchCore index: index kind must be one of"):
        PatchCore("resnet18", pretrained=False, device="cpu", index="kdtree")


def test_add_without_copy_keeps_the_array(rng: np.random.Generator) -> None:
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    owned = MemoryBank(6)
    owned.add(vectors, copy=False)
    assert np.shares_memory(owned.vectors, vectors)  # held once
    copied = make_bank(vectors)
    assert not np.shares_memory(copied.vectors, vectors)
    converted = MemoryBank(6)
    converted.add(vectors.astype(np.float64), copy=False)  # a float64 array is converted anyway
    np.testing.assert_array_equal(converted.vectors, vectors)


def test_non_finite_rows_are_counted_across_validation_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finite check runs block by block (bounded memory) and still counts every bad row."""
    monkeypatch.setattr(memory_bank, "VALIDATION_BLOCK_ROWS", 2)
    features = np.zeros((7, 3), np.float32)
    features[1, 0], features[4, 2], features[6, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(BankValidationError, match=r"bank\.bin: 3 row\(s\) hold NaN or infinite"):
        memory_bank.validate_bank_array(features, 3, source="bank.bin")
    assert memory_bank.validate_bank_array(np.ones((7, 3), np.float64), 3).dtype == np.float32
