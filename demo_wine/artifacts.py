"""Decision artifacts of a trained model: coefficients, data summary and two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from demo_wine.data import TARGET

COEFFICIENTS = "coefficients.csv"
SUMMARY = "training_summary.csv"
IMPORTANCE_PLOT = "feature_importance.png"
PRED_PLOT = "predicted_vs_actual.png"
ALL = (COEFFICIENTS, SUMMARY, IMPORTANCE_PLOT, PRED_PLOT)


def coefficients(model: Any, x_train: Any) -> Any:
    """Coefficients with the training std and |coef x std| (effect of one std, in quality)."""
    import pandas as pd

    std = x_train.std(ddof=0)
    table = pd.DataFrame(
        {"feature": list(x_train.columns), "coefficient": model.coef_, "train_std": std.to_numpy()}
    )
    table["importance"] = (table["coefficient"] * table["train_std"]).abs()
    table = table.sort_values("importance", ascending=False, ignore_index=True)
    intercept = pd.DataFrame([{"feature": "(intercept)", "coefficient": float(model.intercept_)}])
    return pd.concat([table, intercept], ignore_index=True)


def write_all(
    model: Any, x_train: Any, y_train: Any, x_test: Any, y_test: Any, out_dir: str | Path
) -> list[Path]:
    """Write the four artifacts into ``out_dir`` and return their paths."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    coef = coefficients(model, x_train)
    coef.to_csv(out / COEFFICIENTS, index=False)
    summary = x_train.assign(**{TARGET: y_train}).describe().T
    summary.to_csv(out / SUMMARY, index_label="column")

    ranked = coef.dropna(subset=["importance"]).iloc[::-1]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:red" if c < 0 else "tab:blue" for c in ranked["coefficient"]]
    ax.barh(ranked["feature"], ranked["importance"], color=colors)
    ax.set_xlabel("|coefficient x training std|  (quality points per std; red = negative)")
    ax.set_title(f"Feature importance, alpha={model.alpha:g}, l1_ratio={model.l1_ratio:g}")
    fig.savefig(out / IMPORTANCE_PLOT, dpi=90)

    predicted = model.predict(x_test)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(y_test, predicted, s=8, alpha=0.35)
    low, high = float(y_test.min()) - 0.5, float(y_test.max()) + 0.5
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("actual quality (test split)")
    ax.set_ylabel("predicted quality")
    ax.set_title("Predicted vs actual")
    fig.savefig(out / PRED_PLOT, dpi=90)
    return [out / name for name in ALL]
