"""The schema of the role variables (the `vars:` of inventory.yaml), with their defaults.

Validated once on load; roles and actions then read the result as `HostVars`. Every string
that reaches the host (a shell, a unit file, a config or env file, SQL, a URL) has a strict
pattern where one exists (paths, hosts, checksums) and is checked by `inputs`; no string
anywhere in `vars:` may hold a control character (newline, NUL, …).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from mlflow_stack import inputs
from mlflow_stack.host_vars import HostVars

WINE_SHA256 = "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


HostPath = Annotated[str, AfterValidator(lambda v: inputs.safe_path(v, None))]
Url = Annotated[str, AfterValidator(lambda v: inputs.url(v, None))]
Sha256 = Annotated[str, AfterValidator(lambda v: inputs.sha256(v, None))]
Arch = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,20}$")]
BindAddress = Annotated[str, AfterValidator(lambda v: inputs.bind_address(v, None))]
MysqlHost = Annotated[str, AfterValidator(lambda v: inputs.mysql_host(v, None))]
HostPattern = Annotated[str, AfterValidator(lambda v: inputs.host_pattern(v, None))]
LocalPath = Annotated[str, AfterValidator(lambda v: inputs.local_path(v, None))]


def _url_template(value: str) -> str:
    """A URL that may hold `{arch}` (replaced on the host by `uname -m`)."""
    inputs.url(value.replace("{arch}", "arch"), None)
    return value


TemplateUrl = Annotated[str, AfterValidator(_url_template)]


MINIFORGE_VERSION = "24.11.3-0"


class PythonVars(_Section):
    manager: Literal["uv", "conda"] = "uv"
    prefix: HostPath = "/opt/anaconda"
    # conda only: the Miniforge installer ({arch} is `uname -m`) and its sha256 (required).
    miniforge_url: TemplateUrl = (
        "https://github.com/conda-forge/miniforge/releases/download/"
        f"{MINIFORGE_VERSION}/Miniforge3-{MINIFORGE_VERSION}-Linux-{{arch}}.sh"
    )
    miniforge_sha256: dict[Arch, Sha256] = Field(default_factory=dict)  # {x86_64: …, aarch64: …}
    # uv only: an env's hashed requirements file on the controller instead of the pinned one
    # (roles/files/requirements/<env>.txt), e.g. an older MLflow to test upgrades from.
    requirements: dict[Literal["mlflow", "demo"], LocalPath] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _conda_needs_checksums(self, info: ValidationInfo) -> PythonVars:
        partial = bool(info.context and info.context.get("partial"))
        if self.manager == "conda" and not self.miniforge_sha256 and not partial:
            raise ValueError(
                "manager conda needs miniforge_sha256 ({x86_64: <sha256>, ...}) "
                "from the Miniforge release page"
            )
        return self


class MysqlVars(_Section):
    server: Literal["auto", "mariadb", "mysql"] = "auto"  # auto: MySQL on Ubuntu, else MariaDB
    bind_address: BindAddress = "127.0.0.1"
    port: int = Field(default=3306, ge=1, le=65535)
    allow_from: list[MysqlHost] = Field(default_factory=list)  # extra clients of user mlflow


class SizingVars(_Section):
    # auto: small below 2 GiB of memory (the 1 vCPU / 1 GiB instance), else standard
    profile: Literal["auto", "small", "standard"] = "auto"


class MlflowVars(_Section):
    backend: Literal["mysql", "sqlite"] = "mysql"
    port: int = Field(default=5000, ge=1, le=65535)
    workers: int | None = Field(default=None, ge=1, le=64)  # None: by the sizing profile
    public: bool = False
    allowed_hosts: list[HostPattern] = Field(default_factory=list)


class JupyterVars(_Section):
    port: int = Field(default=8888, ge=1, le=65535)
    public: bool = False
    auth: Literal["token", "password"] = "token"


class DemoVars(_Section):
    # The wine data: the copy shipped in demo_wine/data unless one of these replaces it.
    data_url: Url | None = None  # downloaded on the host
    data_file: LocalPath | None = None  # a local file uploaded
    data_sha256: Sha256 = WINE_SHA256
    # A process with MLflow and scikit-learn imported, from which `invoke train` forks its
    # runs. true: always running; false: every run starts Python cold; unset: by the sizing
    # profile (small: started by the first run, stopped when idle).
    warm_runner: bool | None = None

    @model_validator(mode="after")
    def _one_data_source(self) -> DemoVars:
        if self.data_url and self.data_file:
            raise ValueError("give data_url or data_file, not both")
        return self


# --- public mode (issue 17): the HTTPS proxy in front of what `mlflow.public` and
# `jupyter.public` expose, and of models served with `invoke serve --public` -------------


def _optional(check):
    """An AfterValidator for a string that may be empty (unset), else passes `check`."""
    return AfterValidator(lambda v: check(v, None) if v else v)


class PublicVars(_Section):
    # A DNS name pointing at the host: its certificate comes from ACME (Let's Encrypt unless
    # `acme_directory` says otherwise). Without one, the host's own CA issues a certificate
    # for `address` (default: the address in the inventory), and clients pin that CA.
    domain: Annotated[str, _optional(inputs.dns_name)] = ""
    address: Annotated[str, _optional(inputs.host_address)] = ""
    tls: Literal["auto", "acme", "internal"] = "auto"  # auto: acme with a domain, else internal
    acme_directory: Annotated[
        str, AfterValidator(lambda v: inputs.url(v, None, schemes=("https",)))
    ] = "https://acme-v02.api.letsencrypt.org/directory"
    acme_email: Annotated[str, _optional(inputs.email)] = ""
    # A private ACME CA (a PEM file on the controller): trusted by the proxy for the ACME
    # directory, and pinned by clients for the site. Not needed with Let's Encrypt.
    acme_roots: Annotated[str, _optional(inputs.local_path)] = ""
    https_port: int = Field(default=443, ge=1, le=65535)
    http_port: int = Field(default=80, ge=1, le=65535)
    # What an MLflow account may do with experiments and models it was granted nothing on:
    # READ (a team's shared demo: everyone browses, writes need a grant) or NO_PERMISSIONS.
    default_permission: Literal["READ", "NO_PERMISSIONS"] = "READ"

    @model_validator(mode="after")
    def _acme_needs_a_domain(self) -> PublicVars:
        if self.tls == "acme" and not self.domain:
            raise ValueError("tls acme needs a domain (a DNS name pointing at the host)")
        if self.https_port == self.http_port:
            raise ValueError("https_port and http_port must differ")
        return self


# --- backup, restore, safe upgrades, gc (issue #19) ----------------------------------------

# `mlflow gc --older-than`'s format: 30d, 12h, 1d2h3m4s (empty: gc off)
GC_AGE = r"^(\d+(\.\d+)?d)?(\d+(\.\d+)?h)?(\d+(\.\d+)?m)?(\d+(\.\d+)?s)?$"
SIZE = r"^\d+(\.\d+)?\s*([kKMGT]i?B?|B)?$"


class BackupVars(_Section):
    # Before a converge migrates the schema to a new MLflow: `host` keeps a dump of the
    # tracking and auth databases on the host (the newest 3, /var/backups/mlflow-stack), put
    # back if the migration fails; `controller` also streams a whole `invoke backup` into `dir`.
    before_upgrade: Literal["host", "controller"] = "host"
    dir: LocalPath = "backups"  # on the controller (relative to where invoke runs)


class GcVars(_Section):
    # A systemd timer runs `mlflow gc` for runs deleted longer ago than this ("" turns it off).
    older_than: str = Field(default="30d", pattern=GC_AGE)
    on_calendar: str = Field(default="daily", pattern=r"^[\w*:,./~ -]+$")  # systemd OnCalendar


class DiskVars(_Section):
    # `invoke status` warns when the disk holding MLflow's data has less free than this.
    warn_free_below: str = Field(default="2GB", pattern=SIZE)


class StackVars(_Section):
    sizing: SizingVars = Field(default_factory=SizingVars)
    python: PythonVars = Field(default_factory=PythonVars)
    mysql: MysqlVars = Field(default_factory=MysqlVars)
    mlflow: MlflowVars = Field(default_factory=MlflowVars)
    jupyter: JupyterVars = Field(default_factory=JupyterVars)
    demo: DemoVars = Field(default_factory=DemoVars)
    public: PublicVars = Field(default_factory=PublicVars)

    backup: BackupVars = Field(default_factory=BackupVars)
    gc: GcVars = Field(default_factory=GcVars)
    disk: DiskVars = Field(default_factory=DiskVars)
    test: dict = Field(default_factory=dict)  # free-form, for engine tests only

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        inputs.no_control(data)
        return data


def sections() -> tuple[str, ...]:
    """The `StackVars` fields that are sections (models of their own)."""
    return tuple(
        name
        for name, info in StackVars.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    )


def view(stack_vars: StackVars) -> HostVars:
    """Validated `stack_vars` as roles and actions read them."""
    return HostVars(stack_vars.model_dump(), sections())


def validate(data: dict) -> HostVars:
    """`data` (a `vars:` mapping) validated; pydantic's `ValidationError` when it is not."""
    return view(StackVars.model_validate(data))


def defaults() -> HostVars:
    """Every variable at its default."""
    return view(StackVars())
