"""The public site from the outside: what the controller trusts, and HTTPS requests to it.

What a client must trust is fetched from the host over SSH (an authenticated channel) and
pinned on the controller, in `~/.cache/mlflow-stack/pins/<host>@<site>.pem`:
* internal CA (no domain): the host's CA certificate (`/etc/mlflow-proxy/ca/root.crt`);
* ACME from a private CA (`public.acme_roots`): that CA's roots, as the host has them;
* ACME from a public CA (Let's Encrypt): nothing; the system's roots verify it.
Every request verifies TLS against that; credentials and tokens are only ever sent over a
verified HTTPS connection, never over plain HTTP (which only checks the redirect).

Requests go to the address the controller reaches the host on (the inventory's), with the
site's name in SNI and the Host header: the host as outside clients see it, whatever DNS
says on this machine.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from mlflow_stack import layout, public
from mlflow_stack.actions.remote import ActionError, Check
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.probing import probe
from mlflow_stack.engine.user_cache import cache_dir

if TYPE_CHECKING:
    from mlflow_stack.engine.host import Host
    from mlflow_stack.host_vars import HostVars
    from mlflow_stack.secrets import Secret


def pin_source(site: public.Site) -> str | None:
    """The file on the host holding what clients must trust (None: the system's roots)."""
    if site.tls == "internal":
        return layout.PROXY_CA_CERT
    if site.acme_roots:
        return layout.PROXY_ACME_ROOTS
    return None


def pin_fact(site: public.Site) -> F.Shell | None:
    source = pin_source(site)
    return F.Shell("public pin", f"cat {source}") if source else None


def pin_path(host_name: str, site: public.Site) -> Path:
    safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in f"{host_name}@{site.name}")
    return cache_dir("pins") / f"{safe}.pem"


def write_pin(path: Path, pem: str) -> bool:
    """The pin file (0644 in a 0700 directory), replaced atomically when it changed; whether
    it replaced a different one (the host's CA changed: browsers must import it again)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else None
    if old == pem:
        return False
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(pem)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return old is not None


def fingerprint(pem: str) -> str:
    """SHA-256 fingerprint of the first certificate in `pem` (as browsers show it)."""
    der = ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def message(self) -> str:
        """MLflow's error message (or the body's first line)."""
        return str(self.json().get("message") or self.text.strip().splitlines()[:1] or "")


@dataclass
class Outside:
    """The public site as the controller reaches it: TLS verified against `cafile` (None:
    the system's roots), connecting to `address` with the site's name in SNI and Host."""

    site: public.Site
    address: str
    cafile: str | None
    timeout: float = 15.0
    repinned: bool = False  # the host's CA differs from the one pinned here before
    _context: ssl.SSLContext | None = field(default=None, repr=False)

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            # with a cafile, the pin alone (not the system's roots)
            self._context = ssl.create_default_context(cafile=self.cafile)
        return self._context

    def _connect(self, port: int) -> socket.socket:
        try:
            return socket.create_connection((self.address, port), timeout=self.timeout)
        except OSError as exc:
            raise ActionError(
                f"{self.address}:{port} does not answer ({exc.strerror or exc}); is the "
                "proxy running and the port open (security group, firewall)?"
            ) from None

    def tls_socket(self) -> ssl.SSLSocket:
        """A verified TLS connection to the site (ssl.SSLCertVerificationError if not)."""
        raw = self._connect(self.site.https_port)
        try:
            return self.context().wrap_socket(raw, server_hostname=self.site.name)
        except BaseException:
            raw.close()
            raise

    def request(
        self,
        method: str,
        path: str,
        *,
        auth: tuple[str, Secret] | None = None,
        bearer: Secret | None = None,
        body: dict | bytes | None = None,
        params: dict | None = None,
        host_header: str | None = None,
    ) -> Answer:
        """One HTTPS request, TLS verified first; credentials go in the verified channel."""
        conn = http.client.HTTPSConnection(
            self.site.name, self.site.https_port, timeout=self.timeout, context=self.context()
        )
        trusted = f"the pin {self.cafile}" if self.cafile else "the system's roots"
        try:
            conn.sock = self.tls_socket()
        except ssl.SSLCertVerificationError as exc:
            raise ActionError(
                f"{self.site.url}: the certificate does not verify against {trusted} "
                f"({exc.verify_message}); invoke status says more"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise ActionError(f"{self.site.url}: no TLS connection ({exc})") from None
        headers = {"Host": host_header or self.site.authority, "Accept": "application/json"}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1].reveal()}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer.reveal()}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if params:
            path += ("&" if "?" in path else "?") + urlencode(params)
        return exchange(
            conn, method, path, data, headers, f"{method} {self.site.url}{path.lstrip('/')}"
        )

    def plain(self, path: str = "/") -> Answer:
        """A GET over plain HTTP (no credentials, ever): only to see the redirect."""
        conn = http.client.HTTPConnection(self.site.name, self.site.http_port, timeout=10)
        conn.sock = self._connect(self.site.http_port)
        http_host = f"[{self.site.name}]" if ":" in self.site.name else self.site.name
        if self.site.http_port != 80:
            http_host = f"{http_host}:{self.site.http_port}"
        return exchange(conn, "GET", path, None, {"Host": http_host}, f"http://{http_host}{path}")


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    data: bytes | None,
    headers: dict[str, str],
    where: str,
) -> Answer:
    """One request on an open connection, read whole and closed; a failure is one line."""
    try:
        conn.request(method, path, body=data, headers=headers)
        answer = conn.getresponse()
        return Answer(answer.status, dict(answer.getheaders()), answer.read())
    except (OSError, http.client.HTTPException) as exc:
        raise ActionError(f"{where}: {exc}") from None
    finally:
        conn.close()


def outside(
    host: Host, host_vars: HostVars, address: str, extra: list[F.Fact] = ()
) -> tuple[Outside, dict]:
    """The site as seen from here, its pin fetched over SSH (with `extra` facts in the same
    probe); (client, values of the facts)."""
    site = public.site(host_vars, address)
    fact = pin_fact(site)
    values = probe(host, [*([fact] if fact else []), *extra])
    cafile, repinned = None, False
    if fact is not None:
        result: F.ShellResult = values[fact.key]
        if not result.ok or "BEGIN CERTIFICATE" not in result.output:
            raise ActionError(
                f"{host.name}: no {pin_source(site)} on the host (public mode not provisioned); "
                f"run: invoke provision --host {host.name}"
            )
        path = pin_path(host.name, site)
        repinned = write_pin(path, result.output)
        cafile = str(path)
    return Outside(site, address, cafile, repinned=repinned), values


def trust_lines(client: Outside) -> list[str]:
    """How to trust the site: nothing (public CA), or the pinned file, its fingerprint, and
    how to import it in a browser."""
    site = client.site
    if client.cafile is None:
        return [f"TLS      certificate from {site.acme_directory} (publicly trusted)"]
    pem = Path(client.cafile).read_text()
    what = (
        "the host's own CA (name-constrained to this site)"
        if site.tls == "internal"
        else "the private ACME CA's roots"
    )
    changed = (
        ["         (it changed since it was last pinned here: import it again in browsers)"]
        if client.repinned
        else []
    )
    return [
        f"TLS      certificate from {what}, pinned at {client.cafile}",
        *changed,
        f"         SHA-256 {fingerprint(pem)}",
        f"         curl --cacert {client.cafile} {site.url}health",
        "         to trust it in a browser, import that file as a certificate authority:",
        "           Chrome/Edge: Settings > Privacy and security > Security > Manage "
        "certificates > Authorities > Import",
        "           Firefox: Settings > Privacy & Security > Certificates > View "
        "Certificates > Authorities > Import",
        f"           Linux (NSS): certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n "
        f"mlflow-stack-{site.name} -i {client.cafile}",
        "           macOS: sudo security add-trusted-cert -d -r trustRoot -k "
        f"/Library/Keychains/System.keychain {client.cafile}",
    ]


# --- `invoke status`, from the outside in ------------------------------------------------


SEARCH = "/api/2.0/mlflow/experiments/search"
LOCAL_ADDRESSES = ("127.", "[::1]", "::1", "[::ffff:127.")


def tls_check(client: Outside) -> Check:
    trusted = "the pinned CA" if client.cafile else "the system's roots"
    try:
        with client.tls_socket() as tls:
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "TLS",
            False,
            f"certificate not verified against {trusted}: {exc.verify_message}",
            "the proxy may still be obtaining it (journalctl -u mlflow-proxy on the host); "
            "for an IP-only host, public.address must be the address clients use",
        )
    except (OSError, ssl.SSLError) as exc:
        return Check("TLS", False, f"no TLS connection: {exc}", "is mlflow-proxy running?")
    issuer = dict(pair[0] for pair in cert.get("issuer", ()))
    left = ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()
    when = f"{left / 86400:.0f} days" if left > 2 * 86400 else f"{left / 3600:.0f} h"
    by = issuer.get("commonName") or issuer.get("organizationName") or "?"
    return Check("TLS", True, f"verified against {trusted}; issued by {by}, {when} left")


def redirect_check(client: Outside) -> Check:
    try:
        answer = client.plain("/")
    except ActionError as exc:
        return Check("HTTP", False, str(exc), "port 80 must be open (redirects, ACME)")
    location = answer.headers.get("Location", "")
    wanted = f"https://{client.site.name.split('%')[0]}"
    ok = answer.status in (301, 302, 307, 308) and location.startswith(wanted)
    detail = f"plain HTTP answers {answer.status} -> {location or '(no Location)'}"
    return Check("HTTP", ok, detail, "" if ok else "port 80 must only redirect to HTTPS")


def host_header_hint(answer: Answer, client: Outside) -> str:
    if answer.status == 403 and "Invalid Host header" in answer.text:
        return (
            f"MLflow refuses the Host header {client.site.authority!r}: add the name clients "
            "use to mlflow.allowed_hosts (or set public.domain / public.address), then provision"
        )
    return ""


def mlflow_checks(client: Outside, admin: tuple[str, Secret] | None) -> list[Check]:
    anon = client.request("GET", SEARCH, params={"max_results": 1})
    hint = host_header_hint(anon, client)
    checks = [
        Check(
            "MLflow login",
            anon.status == 401,
            f"{anon.status} without credentials"
            + (" (it must ask for them: 401)" if anon.status == 200 else ""),
            hint,
        )
    ]
    if admin is not None and not hint:
        answer = client.request("GET", SEARCH, auth=admin, params={"max_results": 1})
        version = client.request("GET", "/version", auth=admin)
        shown = f" (MLflow {version.text.strip()})" if version.status == 200 else ""
        checks.append(
            Check(
                "MLflow admin",
                answer.status == 200,
                f"{answer.status} as {admin[0]}{shown}",
                ""
                if answer.status == 200
                else "the admin password in the secret store does not log in: "
                "invoke provision (it applies the stored one) or invoke users.passwd admin",
            )
        )
    return checks


def jupyter_check(client: Outside) -> Check:
    api = client.request("GET", f"{public.JUPYTER_PREFIX}api/status")
    lab = client.request("GET", f"{public.JUPYTER_PREFIX}lab")
    login = lab.headers.get("Location", "")
    ok = api.status == 403 and lab.status == 302 and "/login" in login
    return Check(
        "Jupyter login",
        ok,
        f"api {api.status} without a token, lab {lab.status} -> {login or '-'}",
        "" if ok else "Jupyter must ask for its token or password",
    )


def model_check(client: Outside, name: str, token: Secret | None) -> Check:
    path = f"{public.MODELS_PREFIX}{name}/ping"
    anon = client.request("GET", path)
    detail = f"{anon.status} without a token"
    ok = anon.status == 401
    if token is not None:
        answer = client.request("GET", path, bearer=token)
        detail += f", {answer.status} with it"
        ok = ok and answer.status == 200
    return Check(f"model {name}", ok, detail, "" if ok else f"invoke serve --name {name} --public")


def parse_listeners(output: str) -> list[tuple[str, int]]:
    """(address, port) of each listening TCP socket in `ss -Hltn` output."""
    found = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and ":" in fields[3]:
            address, _, port = fields[3].rpartition(":")
            if port.isdigit():
                found.append((address, int(port)))
    return found


def exposed(listeners: list[tuple[str, int]], allowed: set[int]) -> list[str]:
    """Listeners on a non-loopback address other than the `allowed` ports."""
    return sorted(
        {
            f"{address}:{port}"
            for address, port in listeners
            if not address.startswith(LOCAL_ADDRESSES) and port not in allowed
        }
    )


def listener_check(output: str, site: public.Site, ssh_port: int) -> Check:
    allowed = {ssh_port, site.http_port, site.https_port}
    extra = exposed(parse_listeners(output), allowed)
    ports = ", ".join(str(p) for p in sorted(allowed))
    if extra:
        return Check(
            "listeners",
            False,
            f"also on the network: {', '.join(extra)}",
            "only SSH and the proxy should listen on a non-loopback address",
        )
    return Check("listeners", True, f"only {ports} on non-loopback addresses")


def dns_check(site: public.Site, address: str) -> Check | None:
    """For a domain: where it resolves from here (informational)."""
    if public.is_ip(site.name):
        return None
    try:
        found = sorted({info[4][0] for info in socket.getaddrinfo(site.name, None)})
    except OSError:
        return Check("DNS", True, f"{site.name} does not resolve here (checked via {address})")
    same = address in found
    return Check(
        "DNS",
        True,
        f"{site.name} -> {', '.join(found)}"
        + ("" if same else f" (not {address}, the address checked)"),
    )


def secret_fact(name: str) -> F.Shell:
    return F.Shell(f"secret {name}", f"cat {layout.secret_path(name)} 2>/dev/null")


def models_fact() -> F.Shell:
    """Public models and their bearer tokens, one `NAME TOKEN` line each."""
    return F.Shell(
        "public models",
        f"cd {layout.PROXY_MODELS_DIR} 2>/dev/null && for f in *.caddy; do "
        '[ -f "$f" ] || continue; n=${f%.caddy}; '
        f'printf \'%s %s\\n\' "$n" "$(cat {layout.SECRETS_DIR}/model_"$n"_token 2>/dev/null)"; '
        "done; true",
    )


def parse_models(result: F.ShellResult) -> dict[str, Secret | None]:
    from mlflow_stack.secrets import Secret

    models: dict[str, Secret | None] = {}
    for line in result.output.splitlines():
        name, _, token = line.strip().partition(" ")
        if name:
            models[name] = Secret(token.strip()) if token.strip() else None
    return models


def site_checks(
    host: Host, host_vars: HostVars, address: str, ssh_port: int
) -> tuple[Outside, list[Check]]:
    """`invoke status` from the outside in: TLS verified against the pin, the redirect, the
    logins MLflow and Jupyter ask for, each public model's token, what listens."""
    from mlflow_stack.secrets import Secret

    admin_fact = secret_fact("mlflow_admin_password")
    listeners = F.Shell("listeners", "ss -Hltn")
    models = models_fact()
    client, values = outside(host, host_vars, address, [admin_fact, listeners, models])
    checks = [tls_check(client), redirect_check(client)]
    dns = dns_check(client.site, address)
    if dns:
        checks.append(dns)
    if checks[0].ok:  # credentials only ever go to a verified site
        admin_text = values[admin_fact.key].output.strip()
        admin = (layout.MLFLOW_ADMIN, Secret(admin_text)) if admin_text else None
        if host_vars.mlflow.public:
            checks += mlflow_checks(client, admin)
        if host_vars.jupyter.public:
            checks.append(jupyter_check(client))
        for name, token in parse_models(values[models.key]).items():
            checks.append(model_check(client, name, token))
    checks.append(listener_check(values[listeners.key].output, client.site, ssh_port))
    return client, checks


def render_checks(client: Outside, checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"from outside ({client.site.url}, via {client.address}):"]
    for c in checks:
        lines.append(f"  {'ok ' if c.ok else 'BAD'} {c.name:<{width}}  {c.detail}")
        if c.hint and not c.ok:
            lines.append(f"      {'':<{width}}  hint: {c.hint}")
    return "\n".join(lines)


# --- `invoke urls` ---------------------------------------------------------------------


def url_lines(
    host: Host, host_vars: HostVars, address: str, token: str | None, reveal: bool
) -> list[str]:
    """The public site's URLs, how to log in, and what to trust (the pin, fetched now)."""
    models = models_fact()
    client, values = outside(host, host_vars, address, [models])
    site = client.site
    lines = []
    if host_vars.mlflow.public:
        lines += [
            f"MLflow   {site.url}",
            f"         user {layout.MLFLOW_ADMIN}; password: sudo cat "
            f"{layout.secret_path('mlflow_admin_password')} (on the host); "
            "accounts for others: invoke users.add NAME",
        ]
    jv = host_vars.jupyter
    if jv.public:
        base = f"{site.url}{public.JUPYTER_PREFIX.lstrip('/')}lab"
        if jv.auth == "token":
            lines.append(f"Jupyter  {base}?token={token if (reveal and token) else '<token>'}")
        else:
            lines.append(f"Jupyter  {base}  (password login)")
    for name, secret in parse_models(values[models.key]).items():
        shown = secret.reveal() if (reveal and secret) else "<token>"
        lines.append(
            f"Model    {site.url}{public.MODELS_PREFIX.lstrip('/')}{name}/invocations  "
            f"(header Authorization: Bearer {shown})"
        )
    if not reveal and ((jv.auth == "token" and jv.public) or values[models.key].output.strip()):
        lines.append("         (`invoke urls --reveal` prints the tokens)")
    return lines + trust_lines(client)
