"""Folding a customer into the model: the same solve MLlib's implicit ALS does for a user."""

from __future__ import annotations

import numpy as np
import pytest

from sparkrec.core import foldin


@pytest.mark.nojvm
def test_fold_in_solves_the_written_out_normal_equations():
    rng = np.random.default_rng(3)
    items = rng.standard_normal((30, 5)).astype(np.float32)
    seen = np.array([2, 7, 11, 19])
    w = np.array([1.0, 3.5, 0.2, 2.0])
    alpha, reg = 4.0, 0.1
    # Every item's confidence 1 (preference 0) plus, for the user's items, alpha * w more, preference 1.
    conf = np.ones(30)
    conf[seen] += alpha * w
    pref = np.zeros(30)
    pref[seen] = 1.0
    y = items.astype(np.float64)
    expected = np.linalg.solve(y.T @ (conf[:, None] * y) + reg * len(seen) * np.eye(5), y.T @ (conf * pref))
    got = foldin.fold_in(foldin.gram(items), items[seen], w, reg, alpha)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.nojvm
def test_no_positive_weight_gives_the_zero_factor_and_nonnegative_stays_nonnegative():
    rng = np.random.default_rng(4)
    items = rng.standard_normal((20, 4)).astype(np.float32)
    assert not foldin.fold_in(foldin.gram(items), items[:0], np.zeros(0), 0.1, 1.0).any()
    # Mixed-sign items: the unconstrained solve has negative components, the non-negative one none,
    # and it is the constrained optimum (KKT: gradient Ax - b is zero where x > 0, >= 0 where x = 0).
    seen, w, reg, alpha = [1, 5, 9], np.array([1.0, 2.0, 1.0]), 0.1, 2.0
    items[seen, 0] = np.abs(items[seen, 0]) + 0.5  # b[0] > 0: zero is not the answer
    free = foldin.fold_in(foldin.gram(items), items[seen], w, reg, alpha)
    x = foldin.fold_in(foldin.gram(items), items[seen], w, reg, alpha, nonnegative=True).astype(np.float64)
    y = items.astype(np.float64)
    a = y.T @ y + alpha * (y[seen].T * w) @ y[seen] + reg * 3 * np.eye(4)
    grad = a @ x - ((1 + alpha * w) @ y[seen])
    assert (free < 0).any() and (x >= 0).all() and x.any()
    assert np.all(np.abs(grad[x > 0]) < 1e-5) and np.all(grad[x == 0] > -1e-5)


@pytest.mark.e2e
def test_fold_in_equals_the_users_factor_from_mllib(spark):
    """MLlib's last half-iteration solves users given items: with the final item factors, every user's
    fold-in from their own weights is their MLlib factor within 1e-4."""
    from pyspark.ml.recommendation import ALS

    rng = np.random.default_rng(5)
    rows = {(int(u), int(i)): float(w) for u, i, w in zip(rng.integers(0, 60, 900), rng.integers(0, 40, 900), rng.uniform(0.2, 5.0, 900))}
    df = spark.createDataFrame([(u, i, w) for (u, i), w in rows.items()], "user int, item int, weight float")
    reg, alpha = 0.08, 3.0
    model = ALS(rank=6, maxIter=8, regParam=reg, alpha=alpha, implicitPrefs=True, seed=1, userCol="user", itemCol="item",
                ratingCol="weight", numUserBlocks=2, numItemBlocks=2).fit(df)
    item_rows = sorted((r["id"], r["features"]) for r in model.itemFactors.collect())
    ids = np.array([i for i, _ in item_rows])
    items = np.array([f for _, f in item_rows], dtype=np.float32)
    yty = foldin.gram(items)
    users = {r["id"]: np.asarray(r["features"], dtype=np.float32) for r in model.userFactors.collect()}
    worst = 0.0
    for u, expected in users.items():
        mine = sorted((i, w) for (uu, i), w in rows.items() if uu == u)
        pos = np.searchsorted(ids, [i for i, _ in mine])
        got = foldin.fold_in(yty, items[pos], np.array([w for _, w in mine], dtype=np.float32), reg, alpha)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert len(users) == 60
    assert worst <= 1e-4, worst
