"""fedpatch.partition: determinism, coverage, no overlap, one-client identity, Dirichlet skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpatch.errors import ConfigError
from fedpatch.partition import SCHEMES, client_share, largest_remainder, partition

TRAIN = {"engine_wiring": 24, "pipe_clip": 17, "tank_screw": 9, "underbody_pipes": 30}
TEST = {"engine_wiring": 30, "pipe_clip": 22, "tank_screw": 18, "underbody_pipes": 5}


def _union(shares, split: str, name: str) -> list[int]:
    return sorted(i for s in shares for i in getattr(s, split).get(name, []))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_inputs_same_partition(scheme: str) -> None:
    a = partition(TRAIN, TEST, 4, scheme, 0.3, seed=7)
    b = partition(TRAIN, TEST, 4, scheme, 0.3, seed=7)
    assert a == b


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_seed_changes_the_partition(scheme: str) -> None:
    assert partition(TRAIN, TEST, 3, scheme, seed=0) != partition(TRAIN, TEST, 3, scheme, seed=1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("clients", [1, 2, 3, 5, 7])
def test_own_split_covers_every_image_once(scheme: str, clients: int) -> None:
    shares = partition(TRAIN, TEST, clients, scheme, 0.5, seed=3, test_split="own")
    for name in TRAIN:
        assert _union(shares, "train", name) == list(range(TRAIN[name]))  # coverage and no overlap
        assert _union(shares, "test", name) == list(range(TEST[name]))
        for share in shares:
            for split in ("train", "test"):
                indices = getattr(share, split).get(name, [])
                assert indices == sorted(indices)  # dataset order inside a share
        for share in shares:  # test images only go to clients holding training images of the object
            assert not share.test.get(name) or share.train.get(name)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_client_is_the_identity(scheme: str) -> None:
    (share,) = partition(TRAIN, TEST, 1, scheme, 0.1, seed=11)
    assert share.train == {name: list(range(n)) for name, n in TRAIN.items()}
    assert share.test == {name: list(range(n)) for name, n in TEST.items()}
    assert share.objects == list(TRAIN)


def test_iid_shares_differ_by_at_most_one() -> None:
    shares = partition(TRAIN, TEST, 5, "iid", seed=0)
    for name, n in TRAIN.items():
        sizes = [len(s.train.get(name, [])) for s in shares]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        test_sizes = [len(s.test.get(name, [])) for s in shares]
        assert max(test_sizes) - min(test_sizes) <= 1 or TEST[name] < 5


def test_by_object_gives_each_object_to_one_client() -> None:
    shares = partition(TRAIN, TEST, 3, "by-object", seed=0)
    owners = {name: [s.client for s in shares if s.train.get(name)] for name in TRAIN}
    assert all(len(o) == 1 for o in owners.values())
    for name, (owner,) in owners.items():
        assert shares[owner].train[name] == list(range(TRAIN[name]))
        assert shares[owner].test[name] == list(range(TEST[name]))
    per_client = [len(s.objects) for s in shares]
    assert max(per_client) - min(per_client) <= 1  # dealt round-robin


def test_by_object_with_more_clients_than_objects_leaves_clients_idle() -> None:
    shares = partition(TRAIN, TEST, 6, "by-object", seed=0)
    assert sorted(len(s.objects) for s in shares) == [0, 0, 1, 1, 1, 1]
    assert all(s.n_test == 0 for s in shares if not s.objects)


def test_common_test_split_gives_holders_the_whole_test_set() -> None:
    shares = partition(TRAIN, TEST, 3, "iid", seed=0, test_split="common")
    for name, n in TEST.items():
        for share in shares:
            assert share.test[name] == list(range(n))
    by_object = partition(TRAIN, TEST, 3, "by-object", seed=0, test_split="common")
    for name in TRAIN:
        assert sum(bool(s.test.get(name)) for s in by_object) == 1


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_even() -> None:
    big = {f"object_{i}": 200 for i in range(20)}
    big_test = {name: 20 for name in big}

    def mean_largest_share(alpha: float) -> float:
        shares = partition(big, big_test, 5, "dirichlet", alpha, seed=0)
        return float(np.mean([max(len(s.train.get(n, [])) for s in shares) / 200 for n in big]))

    skewed, even = mean_largest_share(0.1), mean_largest_share(100.0)
    assert skewed > 0.6  # one client holds most of an object
    assert even < 0.3  # close to 1/5 each
    some_client_lacks_an_object = any(
        sum(1 for s in partition(big, big_test, 5, "dirichlet", 0.1, seed=0) if s.train.get(n)) < 5 for n in big
    )
    assert some_client_lacks_an_object


def test_an_object_split_does_not_depend_on_the_other_objects() -> None:
    alone = partition({"pipe_clip": 17}, {"pipe_clip": 22}, 3, "dirichlet", 0.5, seed=4)
    together = partition(TRAIN, TEST, 3, "dirichlet", 0.5, seed=4)
    for a, b in zip(alone, together):
        assert a.train.get("pipe_clip") == b.train.get("pipe_clip")
        assert a.test.get("pipe_clip") == b.test.get("pipe_clip")


def test_client_share_is_the_partition_entry_and_checks_the_id() -> None:
    assert client_share(TRAIN, TEST, 2, 3, "iid", seed=5) == partition(TRAIN, TEST, 3, "iid", seed=5)[2]
    with pytest.raises(ConfigError, match="partition-id 3 is outside 0..2"):
        client_share(TRAIN, TEST, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "random"}, "federated.partition"),
        ({"test_split": "mine"}, "federated.test_split"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "dirichlet_alpha"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition(TRAIN, TEST, 2, **kwargs)
    with pytest.raises(ConfigError, match="num_clients"):
        partition(TRAIN, TEST, 0)


def test_largest_remainder() -> None:
    assert largest_remainder(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert largest_remainder(7, [0.5, 0.0, 0.5]).tolist() == [4, 0, 3]
    assert largest_remainder(0, [1, 2]).tolist() == [0, 0]
    with pytest.raises(ValueError):
        largest_remainder(3, [0, 0])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    clients=st.integers(1, 6),
    scheme=st.sampled_from(SCHEMES),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 1000),
)
def test_property_disjoint_cover(sizes: list[int], clients: int, scheme: str, alpha: float, seed: int) -> None:
    train = {f"o{i}": n for i, n in enumerate(sizes)}
    test = {f"o{i}": (3 * n) % 11 for i, n in enumerate(sizes)}
    shares = partition(train, test, clients, scheme, alpha, seed)
    for name, n in train.items():
        assert _union(shares, "train", name) == list(range(n))
        expected_test = list(range(test[name])) if n else []
        assert _union(shares, "test", name) == expected_test
