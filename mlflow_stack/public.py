"""Public mode: what is exposed through the HTTPS proxy, under which name, with which certificate.

Read by the roles (`proxy`, `mlflow_server`, `jupyter`) and by the controller's actions
(`status`, `urls`, `users`, `serve --public`, `predict`), so both sides agree on the site's
name, its certificate mode and what a client must trust. Nothing here talks to a host.

A host is public when `mlflow.public` or `jupyter.public` is set: then Caddy (role `proxy`)
listens on 443 (HTTPS) and 80 (redirects and ACME challenges only); MLflow, Jupyter and the
served models stay on 127.0.0.1 behind it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow_stack.host_vars import HostVars
    from mlflow_stack.secrets import Secret

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
JUPYTER_PREFIX = "/jupyter/"  # Jupyter's base_url behind the proxy (one site for everything)
MODELS_PREFIX = "/models/"  # /models/<name>/… goes to the served model <name>
DEFAULT_PERMISSION = "READ"


def is_public(host_vars: HostVars) -> bool:
    """Whether anything is exposed, i.e. whether the proxy runs."""
    return bool(host_vars.mlflow.public or host_vars.jupyter.public)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Site:
    """The public site of a host: its name, how it gets its certificate, its ports."""

    name: str  # the DNS name (ACME) or the address clients use (internal CA)
    tls: str  # "acme" or "internal"
    https_port: int = 443
    http_port: int = 80
    acme_directory: str = LETS_ENCRYPT
    acme_email: str = ""
    acme_roots: str = ""  # a private ACME CA's roots (a file on the controller), if any

    @property
    def authority(self) -> str:
        """`name` or `name:port` as it appears in URLs and Host headers (IPv6 bracketed)."""
        host = f"[{self.name}]" if ":" in self.name else self.name
        return host if self.https_port == 443 else f"{host}:{self.https_port}"

    @property
    def url(self) -> str:
        return f"https://{self.authority}/"

    @property
    def origin(self) -> str:
        return f"https://{self.authority}"

    @property
    def host_headers(self) -> list[str]:
        """Host headers the site is reached with: browsers drop the default port."""
        host = f"[{self.name}]" if ":" in self.name else self.name
        return [host, f"{host}:{self.https_port}"]

    @property
    def pins_own_ca(self) -> bool:
        """A client must trust a CA of the host's (internal) or the private ACME CA's roots."""
        return self.tls == "internal" or bool(self.acme_roots)


def site(host_vars: HostVars, inventory_address: str) -> Site:
    """The public site: `public.domain` (ACME unless `public.tls: internal`), else
    `public.address` or the address the controller reaches the host on (internal CA)."""
    pv = host_vars.public
    name = pv.domain or pv.address or inventory_address
    tls = pv.tls if pv.tls != "auto" else ("acme" if pv.domain else "internal")
    return Site(
        name=name,
        tls=tls,
        https_port=pv.https_port,
        http_port=pv.http_port,
        acme_directory=pv.acme_directory,
        acme_email=pv.acme_email,
        acme_roots=pv.acme_roots if tls == "acme" else "",
    )


def admin_env(password: Secret) -> str:
    """MLflow's bootstrap admin env file (read only when MLflow first creates its admin),
    the password quoted for systemd: a given one may hold spaces, quotes or `$`."""
    from mlflow_stack.engine.templating import render

    return render("mlflow/admin.env.j2", password=password.reveal())
