"""Public mode as plans: the site's name and certificate mode, the proxy role's steps and
Caddyfile, MLflow's accounts, Jupyter behind the proxy, public models, the outside-in checks'
parsing, and the users action's input rules."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from mlflow_stack import layout, public
from mlflow_stack.actions import public as site
from mlflow_stack.actions import users
from mlflow_stack.actions.remote import ActionError, demo_command
from mlflow_stack.actions.serve import ServeRequest, serve_steps
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.steps import PlanContext, Run, Service, StepError
from mlflow_stack.errors import UserError
from mlflow_stack.secrets import Secret, SecretError
from mlflow_stack.sizing import Sizing
from mlflow_stack.vars import validate
from roles import jupyter, mlflow_auth, proxy
from tests.unit.test_facts import DEBIAN_12
from tests.unit.test_roles import SANDBOX_SIZE, T2_MICRO

PUBLIC = {"mlflow": {"public": True}, "jupyter": {"public": True}}


def context(address: str = "203.0.113.10", stored: dict | None = None, **vars) -> RoleContext:
    return RoleContext(
        "web",
        F.OsRelease().parse(DEBIAN_12, 0),
        validate(vars),
        SANDBOX_SIZE,
        {"jupyter_token": "tok-from-host", **(stored or {})},
        address=address,
    )


def by_label(steps, label):
    return next(s for s in steps if s.label == label)


# --- the site -----------------------------------------------------------------------------


def test_the_site_is_the_domain_with_acme_else_the_address_with_the_hosts_ca():
    assert public.site(validate(PUBLIC), "203.0.113.10") == public.Site("203.0.113.10", "internal")
    named = public.site(validate({**PUBLIC, "public": {"domain": "ml.example.org"}}), "x")
    assert (named.name, named.tls, named.acme_directory) == (
        "ml.example.org",
        "acme",
        public.LETS_ENCRYPT,
    )
    assert not named.pins_own_ca  # Let's Encrypt: the system's roots
    own = public.site(
        validate({"public": {"domain": "ml.internal.example", "tls": "internal"}}), "x"
    )
    assert own.tls == "internal" and own.pins_own_ca
    moved = public.site(validate({"public": {"address": "198.51.100.7", "https_port": 8443}}), "x")
    assert moved.url == "https://198.51.100.7:8443/"
    assert moved.host_headers == ["198.51.100.7", "198.51.100.7:8443"]
    assert not public.is_public(validate({})) and public.is_public(validate(PUBLIC))


@pytest.mark.parametrize(
    "bad",
    [
        {"tls": "acme"},  # ACME needs a domain
        {"domain": "Under_Score.example"},
        {"domain": "no-dot"},
        {"acme_directory": "http://acme.example/dir"},  # the directory over HTTPS only
        {"https_port": 80},  # same as http_port
        {"default_permission": "EDIT"},
        {"acme_email": "not an email"},
        {"acme_email": "ops@example.org}\n\timport /etc/passwd"},  # a Caddyfile injection
        {"acme_email": "{$HOME}@example.org"},
        {"domain": "ml.example.org evil.example"},
        {"address": "203.0.113.10 {"},
        {"acme_directory": "https://acme.example/dir {"},
    ],
)
def test_public_vars_refuse(bad):
    with pytest.raises(ValidationError):
        validate({"public": bad})


# --- the proxy role -------------------------------------------------------------------------


def test_nothing_public_means_the_proxy_stopped_and_disabled():
    (step,) = proxy.build(context())
    assert isinstance(step, Service) and step.unit == "mlflow-proxy.service"
    assert (step.enabled, step.running) == (False, False)


def test_proxy_with_the_hosts_own_ca():
    steps = proxy.build(context(**PUBLIC))
    labels = [s.label for s in steps]
    # the package's own unit is masked before the package is installed
    assert labels.index("masked caddy.service (the package's default site)") < labels.index(
        "packages caddy openssl curl"
    )
    assert labels.index("host CA for 203.0.113.10") < labels.index("service mlflow-proxy.service")
    caddyfile = by_label(steps, "file /etc/mlflow-proxy/Caddyfile")
    text = caddyfile.content
    assert (caddyfile.owner, caddyfile.group, caddyfile.mode) == ("root", "caddy", 0o640)
    assert "admin unix//run/mlflow-proxy/admin.sock" in text  # not localhost:2019
    assert "https://203.0.113.10 {\n\ttls internal" in text and "default_sni 203.0.113.10" in text
    assert "cert /etc/mlflow-proxy/ca/root.crt" in text and "skip_install_trust" in text
    assert "protocols h1 h2" in text  # no HTTP/3 listener
    # errors are logged with the request: Jupyter's token hidden in its URL and Referer
    assert "request>uri query {\n\t\t\t\t\treplace token REDACTED" in text
    assert "request>headers>Referer regexp token=" in text
    assert "handle /jupyter/* {\n\t\treverse_proxy 127.0.0.1:8888" in text
    assert "import /etc/mlflow-proxy/models/*.caddy" in text
    assert "reverse_proxy 127.0.0.1:5000" in text and "https:// {" in text
    assert "acme_ca" not in text
    wait = steps[-1]
    assert (
        wait.schedule.name == "AT_END" and "--cacert /etc/mlflow-proxy/ca/root.crt" in wait.curl()
    )
    assert "--resolve 203.0.113.10:443:127.0.0.1" in wait.curl()


def test_proxy_with_acme_from_a_private_ca(tmp_path):
    roots = tmp_path / "roots.pem"
    roots.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    pv = {"domain": "ml.example.org", "acme_directory": "https://acme.example/dir",
          "acme_roots": str(roots), "acme_email": "ops@example.org"}  # fmt: skip
    steps = proxy.build(context(mlflow={"public": True}, public=pv))
    labels = [s.label for s in steps]
    assert not any(label.startswith("host CA") for label in labels)
    assert by_label(steps, "file /etc/mlflow-proxy/acme-roots.pem").content == roots.read_text()
    text = by_label(steps, "file /etc/mlflow-proxy/Caddyfile").content
    assert "acme_ca https://acme.example/dir" in text
    assert "acme_ca_root /etc/mlflow-proxy/acme-roots.pem" in text
    assert "email ops@example.org" in text
    assert "https://ml.example.org {" in text and "tls internal" not in text
    assert "/jupyter/" not in text  # Jupyter is not public here
    roots.write_text("not a certificate")
    with pytest.raises(StepError, match="no PEM certificate"):
        proxy.build(context(mlflow={"public": True}, public=pv))


def test_only_jupyter_public_leaves_mlflow_off_the_site():
    text = by_label(
        proxy.build(context(jupyter={"public": True})), "file /etc/mlflow-proxy/Caddyfile"
    )
    assert "reverse_proxy 127.0.0.1:5000" not in text.content
    assert 'respond "not found" 404' in text.content


@pytest.mark.parametrize(
    ("name", "constraint"),
    [
        ("203.0.113.10", "permitted;IP:203.0.113.10/255.255.255.255"),
        ("2001:db8::1", "permitted;IP:2001:db8::1/" + "FFFF:" * 7 + "FFFF"),
        ("ml.example.org", "permitted;DNS:ml.example.org"),
    ],
)
def test_the_hosts_ca_vouches_for_the_site_alone(name, constraint):
    assert proxy.name_constraint(name) == constraint
    script = proxy.ca_script(name, "web")
    assert "pathlen:1" in script and f"nameConstraints=critical,{constraint}" in script
    assert "chgrp caddy" in script and "chmod 640" in script  # the key: root and caddy only
    assert "runuser -u caddy -- rm -rf" in script  # Caddy's old intermediate, as its account


def test_ca_made_only_when_missing_or_for_another_name():
    (step,) = proxy.ca_steps("203.0.113.10", "web")
    fact = proxy.ca_fact()
    plan = step.plan(PlanContext({fact.key: F.ShellResult(0, "203.0.113.10\n")}))
    assert plan is None
    assert step.plan(PlanContext({fact.key: F.ShellResult(1, "")})) is not None
    assert step.plan(PlanContext({fact.key: F.ShellResult(0, "198.51.100.7\n")})) is not None


def test_a_changed_caddyfile_is_reloaded_unless_the_proxy_restarts_anyway():
    step = proxy.reload_step()
    unit = F.Unit(layout.PROXY_UNIT)
    active = F.UnitInfo("loaded", "active", "running", "enabled", False)
    facts = {unit.key: active}
    changed = {f"file:{layout.PROXY_CONFIG}"}
    assert step.plan(PlanContext(facts, changed=changed)) is not None
    assert step.plan(PlanContext(facts)) is None
    assert step.plan(PlanContext(facts, changed=changed, pending={layout.PROXY_UNIT})) is None
    restarted = {layout.PROXY_UNIT}
    assert step.plan(PlanContext(facts, restarted=restarted, changed=changed)) is None


def test_the_https_wait_is_done_once_the_site_answers():
    wait = proxy.WaitHttps("proxy answers", public.Site("203.0.113.10", "internal"), "/ca.pem")
    key = wait.fact().key
    assert wait.plan(PlanContext({key: F.ShellResult(0, "401")})) is None
    change = wait.plan(PlanContext({key: F.ShellResult(0, "000")}))
    assert change is not None and not change.counts
    fresh = PlanContext({key: F.ShellResult(0, "401")}, restarted={layout.PROXY_UNIT})
    assert wait.plan(fresh) is not None


def test_proxy_unit_binds_low_ports_with_one_capability():
    unit = proxy.unit_text(Sizing.of(SANDBOX_SIZE))
    assert "GOMEMLIMIT" not in unit
    assert "Environment=GOMEMLIMIT=96MiB" in proxy.unit_text(Sizing.of(T2_MICRO))
    assert "User=caddy" in unit and "PrivateUsers" not in unit
    # the hardening's empty sets come first; the one capability is added after them
    assert unit.index("CapabilityBoundingSet=\n") < unit.index(
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"
    )
    assert "ExecReload=/usr/bin/caddy reload" in unit and "--environ" not in unit


# --- MLflow's accounts ---------------------------------------------------------------------


def test_accounts_are_synced_when_the_passwords_or_the_auth_database_change():
    digest = mlflow_auth.accounts_digest("admin-pw", "demo-pw")
    synced = F.ShellResult(0, f"{digest} 1234\n1234\n")
    assert mlflow_auth.accounts_synced(synced, digest)
    assert not mlflow_auth.accounts_synced(synced, mlflow_auth.accounts_digest("new", "demo-pw"))
    assert not mlflow_auth.accounts_synced(F.ShellResult(0, f"{digest} 1234\n999\n"), digest)
    assert not mlflow_auth.accounts_synced(F.ShellResult(0, "none\nnone\n"), digest)
    steps = mlflow_auth.account_steps(context(**PUBLIC))
    sync = steps[-1]
    assert isinstance(sync, Run) and sync.flush_before  # after MLflow's restart
    assert "admin-pw" not in sync.script and "mlflow_accounts.py" in sync.script


def test_a_new_admin_password_keeps_the_old_one_until_mlflow_has_it(monkeypatch):
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", "the-new-admin-password")
    ctx = context(stored={"mlflow_admin_password": "the-old-admin-password\n"}, **PUBLIC)
    steps, env = mlflow_auth.config_steps(ctx)
    previous = by_label(steps, "secret mlflow_admin_password_previous")
    assert previous.content == "the-old-admin-password\n" and previous.mode == 0o600
    sync = mlflow_auth.account_steps(ctx)[-1]
    import json

    assert json.loads(sync.stdin)["passwords"] == [
        "the-new-admin-password",
        "the-old-admin-password",
    ]
    assert "flask_secret_key" in env
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", "short")
    with pytest.raises(SecretError, match="12 characters"):
        mlflow_auth.config_steps(context(**PUBLIC))


def test_public_off_removes_the_workload_login():
    steps = mlflow_auth.off_steps()
    fact = F.PathState(layout.MLFLOW_CLIENT_ENV)
    mark = F.PathState(mlflow_auth.ACCOUNTS_MARK)
    present = F.PathInfo("file", 0o600, "root", "root", 10)
    ctx = PlanContext({fact.key: present, mark.key: None})
    assert [s.plan(ctx) is not None for s in steps] == [False, True]


def test_the_hosts_work_logs_in_through_root_not_argv():
    script = demo_command(layout.Layout(), ["-m", "demo_wine.train"])
    assert script.index(". /etc/mlflow-stack/mlflow-client.env") < script.index("runuser")
    assert "MLFLOW_TRACKING_PASSWORD" not in script


# --- Jupyter behind the proxy ----------------------------------------------------------------


def test_jupyter_behind_the_proxy_gets_secure_cookies_and_its_prefix():
    steps = jupyter.build(context(**PUBLIC))
    import json

    config = json.loads(
        by_label(steps, "file /etc/jupyter-demo/jupyter_server_config.json").content
    )
    server = config["ServerApp"]
    assert server["base_url"] == "/jupyter/" and server["trust_xheaders"] is True
    assert server["allow_origin"] == "https://203.0.113.10"
    assert server["tornado_settings"]["xsrf_cookie_kwargs"] == {"path": "/jupyter/", "secure": True}
    assert server["terminado_settings"] == {"shell_command": ["/bin/bash"]}  # kept
    assert config["IdentityProvider"]["secure_cookie"] is True
    assert config["IdentityProvider"]["token"] == "tok-from-host"
    unit = by_label(steps, "file /etc/systemd/system/jupyter.service").content
    assert "--ServerApp.ip=127.0.0.1" in unit
    assert "EnvironmentFile=-/etc/mlflow-stack/mlflow-client.env" in unit
    # kernels start under the hardening: ZeroMQ's netlink and thread scheduling calls
    assert "RestrictAddressFamilies=AF_NETLINK" in unit
    assert "SystemCallFilter=sched_setscheduler" in unit
    assert layout.Layout.of(validate(PUBLIC)).jupyter_url == "http://127.0.0.1:8888/jupyter"


# --- public models ---------------------------------------------------------------------------


def test_a_public_model_gets_a_route_with_its_own_token():
    ctx = context(**PUBLIC)
    req = ServeRequest("wine", "r", 54321, 1, public=True)
    steps = serve_steps(req, "models:/m-1", layout.Layout(), ctx)
    route = by_label(steps, "file /etc/mlflow-proxy/models/wine.caddy")
    token = ctx.secret("model_wine_token").reveal()
    assert (route.owner, route.group, route.mode, route.secret) == ("root", "caddy", 0o640, True)
    assert f'not header Authorization "Bearer {token}"' in route.content
    assert "handle_path /models/wine/*" in route.content
    assert "reverse_proxy 127.0.0.1:54321" in route.content
    assert "header_up -Authorization" in route.content  # the token stays at the proxy
    labels = [s.label for s in steps]
    assert labels.index("model wine answers /ping") < labels.index("reload the proxy's routes")
    assert "secret model_wine_token" in labels
    private = serve_steps(ServeRequest("wine", "r", 54321, 1), "models:/m-1", layout.Layout(), ctx)
    assert private[-1].label == "no public route to model wine"


# --- the outside-in checks -------------------------------------------------------------------

SS = """\
LISTEN 0      128        10.77.0.5:22        0.0.0.0:*
LISTEN 0      2048       127.0.0.1:5000      0.0.0.0:*
LISTEN 0      128                *:443             *:*
LISTEN 0      128                *:80              *:*
LISTEN 0      80         127.0.0.1:3306      0.0.0.0:*
LISTEN 0      128            [::1]:8888         [::]:*
LISTEN 0      128          0.0.0.0:8888      0.0.0.0:*
"""


def test_listeners_beyond_ssh_and_the_proxy_are_named():
    found = site.parse_listeners(SS)
    assert ("127.0.0.1", 5000) in found and ("*", 443) in found
    assert site.exposed(found, {22, 80, 443}) == ["0.0.0.0:8888"]
    check = site.listener_check(SS, public.Site("10.77.0.5", "internal"), 22)
    assert not check.ok and "0.0.0.0:8888" in check.detail


def test_mlflows_host_header_refusal_names_the_fix():
    client = site.Outside(public.Site("203.0.113.10", "internal"), "203.0.113.10", None)
    refused = site.Answer(403, {}, b"Invalid Host header - possible DNS rebinding attack detected")
    assert "mlflow.allowed_hosts" in site.host_header_hint(refused, client)
    assert site.host_header_hint(site.Answer(403, {}, b"Permission denied"), client) == ""


def test_public_models_and_tokens_from_the_host():
    models = site.parse_models(F.ShellResult(0, "wine tok-1\nnew \n"))
    assert models["wine"].reveal() == "tok-1" and models["new"] is None
    assert str(models["wine"]) == "********"


def test_pins_are_per_host_and_site(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = site.pin_path("web", public.Site("203.0.113.10", "internal"))
    assert path == tmp_path / "mlflow-stack" / "pins" / "web_203.0.113.10.pem"
    assert site.pin_source(public.Site("x", "internal")) == layout.PROXY_CA_CERT
    assert site.pin_source(public.Site("x", "acme")) is None  # a public CA
    assert site.pin_source(public.Site("x", "acme", acme_roots="/r.pem")) == layout.PROXY_ACME_ROOTS


# --- users -----------------------------------------------------------------------------------


class Stdin(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_passwords_come_on_stdin_or_are_generated():
    password, generated = users.read_password(False, Stdin("a-long-password-1\n"))
    assert password.reveal() == "a-long-password-1" and not generated
    with pytest.raises(ActionError, match="12 characters"):
        users.read_password(False, Stdin("short\n"))
    with pytest.raises(ActionError, match="no password on stdin"):
        users.read_password(False, Stdin(""))
    new, generated = users.read_password(True, Stdin(""))
    assert generated and len(new.reveal()) >= 20


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "a;b", "a\nb"])
def test_user_names_are_checked(name):
    with pytest.raises(UserError):
        users.check_username(name, "add")


@pytest.mark.parametrize(
    "bad", [" leading-blank-password", "a-long-pass\tword", "a-long\x00password"]
)
def test_passwords_with_control_characters_or_blanks_around_are_refused_unshown(bad):
    with pytest.raises(ActionError) as info:
        users.read_password(False, Stdin(bad + "\n"))
    assert bad.strip() not in str(info.value)


def test_grant_targets_hold_no_control_characters():
    with pytest.raises(UserError):
        users.check_grant("wine\nx", None, "READ")
    with pytest.raises(UserError):
        users.check_grant(None, "m\x00", "READ")
    assert users.check_grant('it\'s "wine" $(x)', None, "read") == "READ"


def test_the_bootstrap_admin_password_is_quoted_for_systemd():
    text = public.admin_env(Secret('a "given" $password'))
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="a \\"given\\" \\$password"\n' in text


def test_a_changed_host_ca_is_noticed_when_pinned_again(tmp_path):
    pin = tmp_path / "pins" / "h.pem"
    assert site.write_pin(pin, "A") is False  # first pin
    assert site.write_pin(pin, "A") is False and pin.read_text() == "A"
    assert site.write_pin(pin, "B") is True and pin.read_text() == "B"
    assert oct(pin.stat().st_mode & 0o777) == "0o644"
    assert oct(pin.parent.stat().st_mode & 0o777) == "0o700"


def make_ca(directory, name: str) -> tuple[str, str]:
    import subprocess

    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(key), str(cert)


def serve_https_once(directory) -> tuple[int, str]:
    """A one-request HTTPS server on 127.0.0.1 (a leaf for IP 127.0.0.1 from its own CA);
    (port, that CA's file)."""
    import socket
    import ssl
    import subprocess
    import threading

    ca_key, ca = make_ca(directory, "server-ca")
    key, csr, cert = (directory / n for n in ("leaf.key", "leaf.csr", "leaf.pem"))
    subprocess.run(
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=leaf", "-keyout", key, "-out", csr], check=True, capture_output=True,
    )  # fmt: skip
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "1", "-extfile", directory / "ext", "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=answer, daemon=True).start()
    return listener.getsockname()[1], ca


def test_requests_verify_tls_against_the_pin_before_sending_anything(tmp_path):
    port, server_ca = serve_https_once(tmp_path)
    _, other_ca = make_ca(tmp_path, "other-ca")
    where = public.Site("127.0.0.1", "internal", https_port=port)
    stranger = site.Outside(where, "127.0.0.1", other_ca)
    with pytest.raises(ActionError, match="does not verify against the pin"):
        stranger.request("GET", "/x", auth=("admin", Secret("not-sent-at-all")))
    pinned = site.Outside(where, "127.0.0.1", server_ca)
    assert pinned.request("GET", "/x").status == 401
