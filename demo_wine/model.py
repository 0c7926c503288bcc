"""ElasticNet parameters, fitting and the three metrics (RMSE, MAE, R²)."""

from __future__ import annotations

import warnings
from typing import Any

from demo_wine.errors import InputError, parse_number

DEFAULT_ALPHA = 0.5
DEFAULT_L1_RATIO = 0.1
# Optuna search space (alpha on a log scale).
ALPHA_RANGE = (1e-4, 10.0)
L1_RATIO_RANGE = (0.0, 1.0)


def validate_params(alpha: Any, l1_ratio: Any) -> tuple[float, float]:
    """Return ``(alpha, l1_ratio)`` as floats or raise :class:`InputError`."""
    a = parse_number("alpha", alpha, low=0.0)
    r = parse_number("l1_ratio", l1_ratio, low=0.0, high=1.0)
    return a, r


def make_model(alpha: float, l1_ratio: float, seed: int = 42) -> Any:
    from sklearn.linear_model import ElasticNet

    return ElasticNet(alpha=alpha, l1_ratio=l1_ratio, random_state=seed)


def fit(
    x: Any, y: Any, alpha: float, l1_ratio: float, seed: int = 42, *, quiet: bool = True
) -> Any:
    """Fit an ElasticNet; ``quiet`` silences convergence warnings (not thread-safe: callers
    fitting from several threads silence warnings once around all of them instead)."""
    if alpha < 0 or not 0 <= l1_ratio <= 1:
        raise InputError(f"invalid parameters alpha={alpha}, l1_ratio={l1_ratio}")
    model = make_model(alpha, l1_ratio, seed)
    if not quiet:
        return model.fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y)


def scores(actual: Any, predicted: Any) -> dict[str, float]:
    """RMSE, MAE and R² with plain numpy (cheap enough to run per Optuna trial)."""
    import numpy as np

    a = np.asarray(actual, dtype="float64").ravel()
    p = np.asarray(predicted, dtype="float64").ravel()
    err = p - a
    sse = float(err @ err)
    sst = float(((a - a.mean()) ** 2).sum())
    return {
        "rmse": float(np.sqrt(sse / a.size)),
        "mae": float(np.abs(err).mean()),
        "r2": 1.0 - sse / sst if sst > 0 else 0.0,
    }
