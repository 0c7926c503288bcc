"""Programs and files the tool puts on hosts as they are (templates/ holds what is rendered).

They run there with the host's Python, not the controller's: `tracking_server.py` (the MLflow
server's launcher), `db_upgrade.py` (its schema migration), `model_server.py` with
`fast_scoring.py` (a served model), `resolve_model.py` (a model reference to a URI), and
`schema-mariadb.sql` (MLflow's schema, as MLflow builds it on MariaDB).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(name: str) -> str:
    """The text of one of these files."""
    return (HERE / name).read_text()
