"""fedpatch.metrics against docs/metrics.md's vectors, scikit-learn and a brute-force sweep."""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.metrics import (
    DEFAULT_LIMITS,
    PixelAccumulator,
    auc_spro,
    evaluate_object,
    image_auroc,
    mean_spro,
    merge_counts,
    merge_image_scores,
    merge_summaries,
    metrics_json,
    pixel_auroc,
    pixel_metrics,
    spro_curve,
)

# --------------------------------------------------------------------------------------
# Brute force: the plain definitions, one threshold at a time (independent of the module)
# --------------------------------------------------------------------------------------


def brute_saturation(region: DefectRegion) -> float:
    """The spec's saturation area, with the documented convention s = 1 when it is 0."""
    area = int(region.mask.sum())
    thr = region.spec.saturation_threshold
    s = float(int(thr * area)) if region.spec.relative_saturation else float(min(thr, area))
    return max(s, 1.0)


def brute_curve(maps, regions_per_image):
    """Every distinct score as a threshold (positive: score > t), plus one above the maximum."""
    scores = np.unique(np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]))
    thresholds = [scores.max() + 1.0] + list(scores[::-1]) + [scores.min() - 1.0]
    n_neg = sum(
        int((~np.any([r.mask for r in regions], axis=0)).sum()) if regions else m.size
        for m, regions in zip(maps, regions_per_image)
    )
    fprs, spros = [], []
    for t in thresholds:
        fp, per_region = 0, []
        for m, regions in zip(maps, regions_per_image):
            positive = np.asarray(m, dtype=np.float64) > t
            union = np.zeros(m.shape, bool)
            for r in regions:
                union |= r.mask
                per_region.append(min((positive & r.mask).sum() / brute_saturation(r), 1.0))
            fp += int((positive & ~union).sum())
        fprs.append(fp / n_neg)
        spros.append(float(np.mean(per_region)))
    return fprs, spros


def brute_trapz(x, y, x_max):
    """The official trapezoid with an upper limit (interpolating at x_max), written plainly."""
    correction = 0.0
    if x_max not in x:
        ins = bisect_right(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = [i for i, xi in enumerate(x) if xi <= x_max]
    area = sum(0.5 * (y[a] + y[b]) * (x[b] - x[a]) for a, b in zip(keep[:-1], keep[1:]))
    return area + correction


def brute_auc_spro(maps, regions_per_image, limits=DEFAULT_LIMITS):
    x, y = brute_curve(maps, regions_per_image)
    return {lim: brute_trapz(x, y, lim) / lim for lim in limits}


def brute_pixel_auroc(maps, regions_per_image):
    scores, labels = [], []
    for m, regions in zip(maps, regions_per_image):
        union = np.any([r.mask for r in regions], axis=0) if regions else np.zeros(m.shape, bool)
        scores.append(np.asarray(m, dtype=np.float64).ravel())
        labels.append(union.ravel())
    return roc_auc_score(np.concatenate(labels), np.concatenate(scores))


# --------------------------------------------------------------------------------------
# docs/metrics.md test vectors
# --------------------------------------------------------------------------------------


def toy_case():
    good = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 40]], dtype=np.float32)
    bad = np.array([[50, 45, 3, 2], [30, 20, 1, 0], [5, 6, 60, 7], [8, 9, 10, 11]], dtype=np.float32)
    mask_a = np.zeros((4, 4), bool)
    mask_a[0:2, 0:2] = True
    mask_b = np.zeros((4, 4), bool)
    for r, c in [(2, 1), (2, 2), (2, 3), (3, 3)]:
        mask_b[r, c] = True
    region_a = DefectRegion(mask_a, DefectSpec("a", 255, 0.5, True))
    region_b = DefectRegion(mask_b, DefectSpec("b", 254, 3, False))
    return [good, bad], [[], [region_a, region_b]]


def test_toy_vector_auc_spro():
    maps, regions = toy_case()
    result = auc_spro(maps, regions)
    assert list(result) == [0.01, 0.05, 0.1, 0.3, 1.0]
    for limit in (0.01, 0.05, 0.1):
        assert result[limit] == pytest.approx(2 / 3, abs=1e-12)
    assert result[0.3] == pytest.approx(0.72917, abs=1e-5)
    assert result[1.0] == pytest.approx(0.88889, abs=1e-5)
    assert result[0.3] == pytest.approx(0.21875 / 0.3, abs=1e-12)  # exact value by hand
    assert result[1.0] == pytest.approx(8 / 9, abs=1e-12)


def test_toy_vector_evaluate_object_and_json():
    maps, regions = toy_case()
    result = evaluate_object(maps, [0, 1], [m.max() for m in maps], regions)
    assert result.image_auroc == 1.0
    assert result.pixel_auroc == pytest.approx(brute_pixel_auroc(maps, regions), abs=1e-12)
    assert (result.n_good, result.n_defective, result.n_regions) == (1, 1, 2)
    data = metrics_json(result)
    assert data["classification"] == {"auc_roc": 1.0}
    assert list(data["localization"]["auc_spro"]) == ["0.01", "0.05", "0.1", "0.3", "1.0"]
    assert data["localization"]["auc_spro"]["0.05"] == pytest.approx(2 / 3)
    assert data["fedpatch"]["pixel_auroc"] == result.pixel_auroc


def second_case(saturated: bool):
    amap = np.repeat((np.arange(8) / 10 + 0.05)[:, None], 5, axis=1)
    rows_a, rows_b = np.zeros((8, 5), bool), np.zeros((8, 5), bool)
    rows_a[[1, 3, 5, 7]] = True
    rows_b[[0, 6]] = True
    full = DefectSpec("full", 1, 1.0, True)
    spec_a = DefectSpec("a", 255, 10, False) if saturated else full
    spec_b = DefectSpec("b", 254, 0.5, True) if saturated else full
    return [amap], [[DefectRegion(rows_a, spec_a), DefectRegion(rows_b, spec_b)]]


@pytest.mark.parametrize(
    ("saturated", "expected"),
    [(True, [1, 1, 1, 0.75, 0, 0]), (False, [1, 0.625, 0.5, 0.375, 0, 0])],
)
def test_second_vector_mean_spro(saturated, expected):
    maps, regions = second_case(saturated)
    thresholds = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    np.testing.assert_allclose(mean_spro(maps, regions, thresholds), expected, atol=1e-12)


@pytest.mark.parametrize("saturated", [True, False])
def test_second_vector_curve_passes_through_the_listed_points(saturated):
    """The curve's sPRO at each threshold's FPR equals mean_spro there (no negatives: FPR 0..1)."""
    maps, regions = second_case(saturated)
    mask = regions[0][0].mask | regions[0][1].mask
    maps = [maps[0], np.full((8, 5), 0.3)]  # a good image gives the curve negatives
    regions = [regions[0], []]
    fpr, spro = spro_curve(maps, regions)
    assert fpr[0] == 0 and fpr[-1] == 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= -1e-15)
    assert mask.sum() < 40  # the defective image also has negatives (rows 2 and 4)
    ours = auc_spro(maps, regions)
    for limit, value in brute_auc_spro(maps, regions).items():
        assert ours[limit] == pytest.approx(value, abs=1e-12)


# --------------------------------------------------------------------------------------
# Random cases against the brute force
# --------------------------------------------------------------------------------------


SPECS = [
    DefectSpec("rel1", 255, 1.0, True),
    DefectSpec("rel05", 254, 0.5, True),
    DefectSpec("rel03", 253, 0.3, True),
    DefectSpec("abs3", 252, 3, False),
    DefectSpec("abs50", 251, 50, False),
]


def random_case(rng: np.random.Generator, n_images: int, shape: tuple[int, int], levels: int | None):
    maps, regions = [], []
    for i in range(n_images):
        if levels is None:
            amap = rng.random(shape).astype(np.float32)
        else:
            amap = rng.integers(0, levels, size=shape).astype(np.float32)
        maps.append(amap)
        image_regions = []
        if i > 0 and rng.random() < 0.7:
            for _ in range(rng.integers(1, 4)):
                mask = rng.random(shape) < rng.uniform(0.05, 0.4)
                mask.flat[rng.integers(mask.size)] = True
                image_regions.append(DefectRegion(mask, SPECS[rng.integers(len(SPECS))]))
        regions.append(image_regions)
    if not any(regions):
        mask = np.zeros(shape, bool)
        mask[0, 0] = True
        regions[-1] = [DefectRegion(mask, SPECS[0])]
    return maps, regions


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    levels = [None, 3, 8, 40][seed % 4]
    shape = (int(rng.integers(2, 7)), int(rng.integers(2, 7)))
    maps, regions = random_case(rng, int(rng.integers(2, 5)), shape, levels)
    limits = (0.01, 0.05, 0.1, 0.3, 1.0, float(rng.uniform(0.001, 1.0)))
    ours = auc_spro(maps, regions, limits)
    for limit, value in brute_auc_spro(maps, regions, limits).items():
        assert ours[limit] == pytest.approx(value, abs=1e-12), limit
    assert pixel_auroc(maps, [np.any([r.mask for r in rs], axis=0) if rs else None for rs in regions]) == pytest.approx(
        brute_pixel_auroc(maps, regions), abs=1e-12
    )


@st.composite
def cases(draw):
    n_images = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    values = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, -3.0, 7.25])
    maps, regions = [], []
    for _ in range(n_images):
        maps.append(np.array(draw(st.lists(values, min_size=h * w, max_size=h * w)), dtype=np.float32).reshape(h, w))
        image_regions = []
        for _ in range(draw(st.integers(0, 2))):
            bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
            mask = np.array(bits).reshape(h, w)
            if mask.any():
                image_regions.append(DefectRegion(mask, draw(st.sampled_from(SPECS))))
        regions.append(image_regions)
    return maps, regions


@settings(max_examples=150, deadline=None)
@given(cases(), st.floats(0.001, 1.0))
def test_hypothesis_cases_match_brute_force(case, limit):
    maps, regions = case
    has_regions = any(regions)
    n_neg = sum(
        m.size - int(np.any([r.mask for r in rs], axis=0).sum()) if rs else m.size for m, rs in zip(maps, regions)
    )
    if not has_regions or n_neg == 0:
        with pytest.raises(ValueError):
            auc_spro(maps, regions)
        return
    limits = (limit, 0.05, 1.0)
    ours = auc_spro(maps, regions, limits)
    for lim, value in brute_auc_spro(maps, regions, limits).items():
        assert ours[lim] == pytest.approx(value, abs=1e-12)
    fpr, spro = spro_curve(maps, regions)
    assert fpr[0] == 0.0 and spro[0] == 0.0 and fpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= -1e-12)


def test_zero_saturation_area_saturates_at_first_detected_pixel():
    """int(0.3 * 2) == 0: the region counts as saturated once one of its pixels is positive."""
    mask = np.zeros((2, 2), bool)
    mask[0, :] = True
    amap = np.array([[3.0, 1.0], [2.0, 0.0]])
    regions = [[DefectRegion(mask, DefectSpec("tiny", 1, 0.3, True))]]
    np.testing.assert_allclose(mean_spro([amap], regions, [4, 3, 2.5, 1, 0]), [0, 0, 1, 1, 1])
    result = auc_spro([amap], regions, (1.0,))
    assert np.isfinite(result[1.0])
    assert result[1.0] == pytest.approx(brute_auc_spro([amap], regions, (1.0,))[1.0])


# --------------------------------------------------------------------------------------
# AUROC against scikit-learn
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, [2, 5, 1000][seed % 3], n).astype(np.float64)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.0, 2.5]), st.integers(0, 1)), min_size=2, max_size=30))
def test_image_auroc_hypothesis(pairs):
    scores = np.array([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs])
    if len(set(labels.tolist())) < 2:
        with pytest.raises(ValueError, match="only"):
            image_auroc(scores, labels)
    else:
        assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn_on_larger_maps():
    rng = np.random.default_rng(7)
    maps = [np.round(rng.random((40, 30)), 2).astype(np.float32) for _ in range(5)]
    masks = [None] + [rng.random((40, 30)) < 0.1 for _ in range(4)]
    labels = np.concatenate([np.zeros(1200, bool)] + [m.ravel() for m in masks[1:]])
    expected = roc_auc_score(labels, np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------
# Chunking and federated pooling are exact
# --------------------------------------------------------------------------------------


def test_small_chunks_change_nothing():
    rng = np.random.default_rng(3)
    maps, regions = random_case(rng, 6, (9, 7), 20)
    reference = PixelAccumulator()
    chunked = PixelAccumulator(chunk_size=5)
    for m, rs in zip(maps, regions):
        reference.add(m, rs)
        chunked.add(m, rs)
    s = reference.summary()
    a = pixel_metrics(s, reference.negative_counts(s.values))
    b = pixel_metrics(chunked.summary(), chunked.negative_counts(s.values))
    assert a.pixel_auroc == b.pixel_auroc and a.auc_spro == b.auc_spro


@pytest.mark.parametrize("seed", range(5))
def test_federated_pooling_equals_central_evaluation(seed):
    rng = np.random.default_rng(100 + seed)
    maps, regions = random_case(rng, 9, (8, 6), [None, 10][seed % 2])
    labels = [int(bool(r)) for r in regions]
    labels[0] = 0
    scores = [float(m.max()) for m in maps]
    central = evaluate_object(maps, labels, scores, regions)

    clients = np.array_split(np.arange(9), 3)
    accumulators = []
    for idx in clients:
        acc = PixelAccumulator()
        for i in idx:
            acc.add(maps[i], regions[i])
        accumulators.append(acc)
    summary = merge_summaries([acc.summary() for acc in accumulators])  # round 1
    counts = merge_counts([acc.negative_counts(summary.values) for acc in accumulators])  # round 2
    pooled = pixel_metrics(summary, counts)
    assert pooled.pixel_auroc == pytest.approx(central.pixel_auroc, abs=1e-12)
    for limit in DEFAULT_LIMITS:
        assert pooled.auc_spro[limit] == pytest.approx(central.auc_spro[limit], abs=1e-12)
    pooled_scores, pooled_labels = merge_image_scores(
        [([scores[i] for i in idx], [labels[i] for i in idx]) for idx in clients]
    )
    assert image_auroc(pooled_scores, pooled_labels) == central.image_auroc


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_image_auroc_errors():
    with pytest.raises(ValueError, match=r"only defective \(1\)"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match=r"only good \(0\)"):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_auroc([0.1, 0.2], [0, 2])


def test_pixel_and_spro_errors():
    maps, regions = toy_case()
    with pytest.raises(ValueError, match="at least one defect region"):
        auc_spro(maps, [[], []])
    with pytest.raises(ValueError, match="FPR limit"):
        auc_spro(maps, regions, (0.0,))
    with pytest.raises(ValueError, match="FPR limit"):
        auc_spro(maps, regions, (1.5,))
    with pytest.raises(ValueError, match="2 maps but 1"):
        auc_spro(maps, regions[:1])
    with pytest.raises(ValueError, match="mask shape"):
        auc_spro([maps[0], np.zeros((5, 4), np.float32)], regions)
    with pytest.raises(ValueError, match="NaN"):
        auc_spro([maps[0], np.full((4, 4), np.nan, np.float32)], regions)
    with pytest.raises(ValueError, match="dtype"):
        auc_spro([maps[0], maps[1].astype(np.float64)], regions)
    empty = DefectRegion(np.zeros((4, 4), bool), DefectSpec("e", 1, 1.0, True))
    with pytest.raises(ValueError, match="no pixel"):
        auc_spro(maps, [[], [empty]])
    everything = DefectRegion(np.ones((4, 4), bool), DefectSpec("all", 1, 1.0, True))
    with pytest.raises(ValueError, match="false positive rate is undefined"):
        auc_spro(maps[1:], [[everything]])
    with pytest.raises(ValueError, match="positive"):
        pixel_auroc(maps, [None, None])


def test_evaluate_object_checks_labels_against_regions():
    maps, regions = toy_case()
    with pytest.raises(ValueError, match="image 1 is good"):
        evaluate_object(maps, [0, 0], [0, 1], regions)
    with pytest.raises(ValueError, match="image 0 is defective"):
        evaluate_object(maps, [1, 1], [0, 1], regions)
    with pytest.raises(ValueError, match="3 image scores but 2 maps"):
        evaluate_object(maps, [0, 1], [0, 1, 2], regions)


def test_merge_errors():
    acc = PixelAccumulator()
    acc.add(np.zeros((2, 2), np.float32), [])
    other = PixelAccumulator()
    mask = np.array([[True, False], [False, False]])
    other.add(np.ones((2, 2), np.float64), [DefectRegion(mask, SPECS[0])])
    first = PixelAccumulator()
    first.add(np.ones((2, 2), np.float32), [DefectRegion(mask, SPECS[0])])
    with pytest.raises(ValueError, match="dtypes"):
        merge_summaries([first.summary(), other.summary()])
    with pytest.raises(ValueError, match="different lengths"):
        merge_counts([acc.negative_counts(np.zeros(2, np.float32)), acc.negative_counts(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="same anomaly-map dtype"):
        acc.negative_counts(np.zeros(2, np.float64))
