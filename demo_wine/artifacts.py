"""Decision artifacts of a trained model: coefficients, data summary and two plots."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import threading
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


class ArtifactJob:
    """:func:`write_all` into a temp dir, in a forked process when this process has a single
    thread (so the plots, matplotlib's import included, use the other core while the caller
    imports MLflow and logs the model); inline otherwise (forking a threaded process can
    deadlock the child on a lock held by another thread). :meth:`wait` returns the dir."""

    def __init__(self, model: Any, x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="demo-wine-")
        args = (model, x_train, y_train, x_test, y_test, self.dir)
        self._proc = None
        self._error: str | None = None
        if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
            self._proc = multiprocessing.get_context("fork").Process(
                target=write_all, args=args, name="demo-wine-artifacts", daemon=True
            )
            self._proc.start()
        else:
            try:
                write_all(*args)
            except Exception as exc:
                self._error = f"{type(exc).__name__}: {exc}"

    @property
    def forked(self) -> bool:
        return self._proc is not None

    def wait(self, timeout: float = 300.0) -> str:
        """The directory holding the four artifacts; raise if the writer failed."""
        if self._error:
            raise RuntimeError(f"writing the decision artifacts failed: {self._error}")
        if self._proc is not None:
            self._proc.join(timeout)
            code = self._proc.exitcode
            if code != 0:
                if code is None:
                    self._proc.kill()
                raise RuntimeError(f"writing the decision artifacts failed (exit code {code})")
        missing = [name for name in ALL if not (Path(self.dir) / name).is_file()]
        if missing:
            raise RuntimeError(f"decision artifacts missing: {', '.join(missing)}")
        return self.dir

    def cleanup(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        shutil.rmtree(self.dir, ignore_errors=True)
