"""ElasticNet on the UCI white-wine-quality data, tracked with MLflow and tuned with Optuna.

Modules: ``data`` (load, validate, split), ``model`` (parameters, fit, metrics), ``tracking``
(tracking URI, tags, model logging), ``artifacts`` (decision artifacts), ``train`` and ``tune``
(CLIs, also importable) and ``recorder`` (cheap MLflow child runs for Optuna trials).
Heavy libraries (mlflow, sklearn, pandas, matplotlib) are imported lazily.
"""

MODEL_NAME = "wine-elasticnet"
CHAMPION_ALIAS = "champion"
