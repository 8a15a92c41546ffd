"""A customer's factor from their history and fixed item factors: the solve MLlib's implicit ALS does for a user.

MLlib's ALS ends every iteration by solving each user given the item
factors, so a user's final factor is exactly this solve on the final item
factors. Solving it again for one customer, the moment they act, updates
their list without refitting the model (the live path, issue 15); the batch
model stays the reference it is tested against.

For a user with weights r_i > 0 on items with factors y_i (MLlib's
`ALS.computeFactors` with `implicitPrefs`), with c_i = alpha * r_i:

    (YtY + sum_i c_i y_i y_i^T + reg * n * I) x = sum_i (1 + c_i) y_i

where YtY sums over every item factor of the model and n is the number of
items the user has a positive weight on (the ALS-WR scaling). numpy only.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.optimize import nnls


def gram(item_factors: np.ndarray) -> np.ndarray:
    """YtY over every item factor of the model (float64): computed once per model, shared by every solve."""
    y = np.asarray(item_factors, dtype=np.float64)
    return y.T @ y


def fold_in(
    yty: np.ndarray,
    history_factors: np.ndarray,
    weights: np.ndarray,
    reg: float,
    alpha: float,
    nonnegative: bool = False,
) -> np.ndarray:
    """One user's factor (float32, as MLlib stores it) from their items' factors and weights.

    Args:
        yty: `gram` of the model's item factors.
        history_factors: [k, rank] factors of the items the user has a weight on.
        weights: [k] the user's confidence weights (the training matrix's `weight`); weights <= 0
            add confidence but no preference, as in MLlib.
        reg, alpha: the model's `reg_param` and `alpha`.
        nonnegative: MLlib's `nonnegative=True` (non-negative least squares on the same equations).
    """
    y = np.asarray(history_factors, dtype=np.float64).reshape(-1, yty.shape[0])
    r = np.asarray(weights, dtype=np.float64)
    c = alpha * np.abs(r)
    positive = r > 0
    a = yty + (y.T * c) @ y + reg * int(positive.sum()) * np.eye(yty.shape[0])
    b = (np.where(positive, 1.0 + c, 0.0)) @ y
    if not positive.any():
        return np.zeros(yty.shape[0], dtype=np.float32)
    if not nonnegative:
        return cho_solve(cho_factor(a), b).astype(np.float32)
    # min 1/2 x'Ax - b'x, x >= 0 is min ||L'x - L^-1 b|| with A = LL', x >= 0.
    lower = np.linalg.cholesky(a)
    x, _ = nnls(lower.T, solve_triangular(lower, b, lower=True))
    return x.astype(np.float32)
