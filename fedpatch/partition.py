"""Deterministic partitions of a dataset's images among federated clients.

A partition says, for every client and every object, which training images and which test
images the client holds (indices into the object's ``train`` and ``test`` splits). It depends
only on the image counts, the scheme, the number of clients and ``partition_seed``; every
object draws from its own random stream seeded by ``(partition_seed, object name)``, so an
object's split does not depend on the other objects or on their order.

Training images (``federated.partition``):

- ``iid``: each object's training images are shuffled and cut into ``num_clients`` shares
  whose sizes differ by at most one.
- ``by-object``: each client owns whole objects ("one plant per part"): the objects are
  shuffled and dealt round-robin, so client ``k`` owns positions ``k, k + n, ...`` of the
  shuffled list. With more clients than objects, the extra clients own nothing.
- ``dirichlet``: per object, client proportions are drawn from ``Dirichlet(alpha, ..., alpha)``
  and turned into counts by the largest-remainder rule; a small ``alpha`` gives skewed shares
  (many clients hold few or no images of an object).

Test images (``federated.test_split``):

- ``own``: an object's test images are split among the clients holding training images of it
  (after a seeded shuffle): evenly for ``iid``, all to the owner for ``by-object``, in
  proportion to the training shares (largest remainder) for ``dirichlet``. Shares are
  disjoint and cover the test split, so pooled metrics count every image once.
- ``common``: every client holding training images of an object gets the object's whole test
  split. Pooled metrics must then use one client's evaluation per object (see
  ``fedpatch.federated``), never the sum.

Every share lists its indices in ascending (dataset) order, so a one-client partition is the
identity: the client sees every image in the original order, and its bank equals the one
``fedpatch train`` fits on the same data.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpatch.errors import ConfigError

SCHEMES = ("iid", "by-object", "dirichlet")
TEST_SPLITS = ("own", "common")


@dataclass(frozen=True)
class ClientShare:
    """One client's images: ``{object: sorted indices}`` into the train and test splits.

    Objects of which the client holds no training image are absent from ``train`` (and, with
    ``test_split: own``, from ``test``).
    """

    client: int
    train: dict[str, list[int]] = field(default_factory=dict)
    test: dict[str, list[int]] = field(default_factory=dict)

    @property
    def objects(self) -> list[str]:
        """Objects of which the client holds training images, in partition order."""
        return [name for name, indices in self.train.items() if indices]

    @property
    def n_train(self) -> int:
        return sum(len(v) for v in self.train.values())

    @property
    def n_test(self) -> int:
        return sum(len(v) for v in self.test.values())


def object_rng(seed: int, object_name: str) -> np.random.Generator:
    """The random stream of one object's split (independent of the other objects)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(object_name.encode("utf-8"))]))


def largest_remainder(total: int, proportions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``proportions`` (Hamilton's rule).

    Each part gets ``floor(total * p)``; the leftover units go to the largest fractional parts,
    ties to the lower index. Parts with proportion 0 get nothing.
    """
    p = np.asarray(proportions, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(f"proportions must be a non-empty list of non-negative numbers with a positive sum, got {p}")
    exact = total * p / p.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = int(total - counts.sum())
    if leftover:
        order = np.lexsort((np.arange(p.size), -(exact - counts)))  # largest remainder first, then lower index
        order = [i for i in order if p[i] > 0]
        for i in order[:leftover]:
            counts[i] += 1
    return counts


def _cut(indices: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    """Consecutive pieces of ``indices`` of the given sizes, each sorted ascending."""
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return [sorted(int(i) for i in indices[bounds[k] : bounds[k + 1]]) for k in range(len(counts))]


def _train_counts(n: int, num_clients: int, scheme: str, alpha: float, owner: int | None, rng: np.random.Generator) -> np.ndarray:
    if scheme == "iid":
        return largest_remainder(n, np.ones(num_clients)) if n else np.zeros(num_clients, dtype=np.int64)
    if scheme == "by-object":
        counts = np.zeros(num_clients, dtype=np.int64)
        counts[owner] = n
        return counts
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
    if not np.isfinite(proportions).all() or proportions.sum() <= 0:  # extreme alphas underflow
        proportions = np.zeros(num_clients)
        proportions[int(rng.integers(num_clients))] = 1.0
    return largest_remainder(n, proportions) if n else np.zeros(num_clients, dtype=np.int64)


def partition(
    train_sizes: Mapping[str, int],
    test_sizes: Mapping[str, int],
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_split: str = "own",
) -> list[ClientShare]:
    """The shares of ``num_clients`` clients (index = client id) of every object's images.

    ``train_sizes`` / ``test_sizes`` give the number of training / test images per object
    (same keys; the order of ``train_sizes`` is the object order of every share).
    """
    if num_clients < 1:
        raise ConfigError(f"federated.num_clients must be >= 1, got {num_clients}")
    if scheme not in SCHEMES:
        raise ConfigError(f"federated.partition must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if test_split not in TEST_SPLITS:
        raise ConfigError(f"federated.test_split must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError(f"federated.dirichlet_alpha must be > 0, got {alpha}")
    objects = list(train_sizes)
    missing = [name for name in objects if name not in test_sizes]
    if missing:
        raise ValueError(f"no test size given for {', '.join(missing)}")
    owners: dict[str, int] = {}
    if scheme == "by-object":
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0B1EC7])).permutation(len(objects))
        owners = {objects[int(j)]: position % num_clients for position, j in enumerate(order)}
    shares = [ClientShare(client=k) for k in range(num_clients)]
    for name in objects:
        n_train, n_test = int(train_sizes[name]), int(test_sizes[name])
        if n_train < 0 or n_test < 0:
            raise ValueError(f"{name}: image counts must be >= 0, got {n_train} train and {n_test} test")
        rng = object_rng(seed, name)
        train_order = rng.permutation(n_train)
        counts = _train_counts(n_train, num_clients, scheme, alpha, owners.get(name), rng)
        holders = [k for k in range(num_clients) if counts[k] > 0]
        test_order = rng.permutation(n_test)
        if test_split == "own" and holders:
            weights = (counts > 0) if scheme == "iid" else counts  # iid: even; else proportional
            test_counts = largest_remainder(n_test, weights.astype(np.float64))
            test_pieces = _cut(test_order, test_counts)
        else:
            everything = list(range(n_test))
            test_pieces = [everything if k in holders else [] for k in range(num_clients)]
        for k, piece in enumerate(_cut(train_order, counts)):
            if piece:
                shares[k].train[name] = piece
                shares[k].test[name] = test_pieces[k]
    return shares


def client_share(
    train_sizes: Mapping[str, int],
    test_sizes: Mapping[str, int],
    client: int,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_split: str = "own",
) -> ClientShare:
    """The share of one client (``0 <= client < num_clients``); see :func:`partition`."""
    if not 0 <= client < num_clients:
        raise ConfigError(f"partition-id {client} is outside 0..{num_clients - 1} (num-partitions {num_clients})")
    return partition(train_sizes, test_sizes, num_clients, scheme, alpha, seed, test_split)[client]
