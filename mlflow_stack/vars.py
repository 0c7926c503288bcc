"""Typed role variables (the `vars:` of inventory.yaml), with their defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WINE_SHA256 = "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836"
WINE_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/wine-quality/winequality-white.csv"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PythonVars(_Section):
    manager: Literal["uv", "conda"] = "uv"
    prefix: str = "/opt/anaconda"


class MysqlVars(_Section):
    bind_address: str = "127.0.0.1"
    port: int = Field(default=3306, ge=1, le=65535)
    allow_from: list[str] = Field(default_factory=list)  # extra client hosts for the mlflow user


class MlflowVars(_Section):
    backend: Literal["mysql", "sqlite"] = "mysql"
    port: int = Field(default=5000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    public: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)


class JupyterVars(_Section):
    port: int = Field(default=8888, ge=1, le=65535)
    public: bool = False
    auth: Literal["token", "password"] = "token"


class DemoVars(_Section):
    data_url: str = WINE_URL
    data_sha256: str = Field(default=WINE_SHA256, pattern=r"^[0-9a-f]{64}$")
    data_file: str | None = None  # a local file uploaded instead of downloading data_url


class StackVars(_Section):
    python: PythonVars = Field(default_factory=PythonVars)
    mysql: MysqlVars = Field(default_factory=MysqlVars)
    mlflow: MlflowVars = Field(default_factory=MlflowVars)
    jupyter: JupyterVars = Field(default_factory=JupyterVars)
    demo: DemoVars = Field(default_factory=DemoVars)
    test: dict = Field(default_factory=dict)  # free-form, for engine tests only
