"""Public mode from the outside: the session's host opened through the HTTPS proxy, first
with its own CA (no domain: the site is the host's address), then with a certificate from a
real ACME server (Let's Encrypt's test server pebble, run here), then closed again.

The host's "public" address is its address on the sandboxes' private network, which this
machine reaches directly. Tests run in file order: each mode's fixture provisions the host
for it, and the module ends with public mode off (its state at the start), which the last
test checks. Screenshots of the real browser go to tests/e2e/artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlflow_stack.sandbox import network
from tests.e2e.helpers import (
    ROOT,
    changed_steps,
    exposure,
    host,
    ok,
    provision_json,
    sh,
    wait_until,
)

# on a session sandbox and stack of their own, in the other test process (tests/conftest.py)
pytestmark = pytest.mark.e2e
ARTIFACTS = Path(__file__).parent / "artifacts"
DOMAIN = "mlflow.e2e.test"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"
PUBLIC_VARS = "mlflow: {public: true}\njupyter: {public: true}"
SERVE_PORT = 54450


def run_cli(inv: Path, *args: str, stdin: str | None = None, env: dict | None = None):
    """`invoke ARGS --inventory INV` as a user runs it (stdin given, never a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args, "--inventory", str(inv)],
        cwd=ROOT,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Site:
    """The public site as a user's tools reach it."""

    inv: Path
    name: str  # the domain, or the address
    address: str
    pin: Path  # what `invoke urls` pinned (the controller's copy)

    @property
    def base(self) -> str:
        return f"https://{self.name}"

    def resolve(self) -> list[str]:
        return [] if self.name == self.address else ["--resolve", f"{self.name}:443:{self.address}"]

    def curl(self, path: str, *args: str, pinned: bool = True) -> tuple[int, str, int]:
        """(curl's exit code, body, HTTP status) of a request to the site."""
        cmd = ["curl", "-sS", "-m", "20", "-o", "-", "-w", "\n%{http_code}", *self.resolve()]
        cmd += [*(["--cacert", str(self.pin)] if pinned else []), *args, f"{self.base}{path}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        body, _, code = proc.stdout.rpartition("\n")
        return proc.returncode, body, int(code or 0)

    def session(self, pinned: bool = True):
        """A `requests` session verifying with the pin (or the system's roots), connecting to
        the host's address with the site's name in SNI and Host (no DNS for the test domain)."""
        import requests
        from requests.adapters import HTTPAdapter

        name = self.name

        class ToTheHost(HTTPAdapter):
            def init_poolmanager(self, *args, **kwargs):
                kwargs["server_hostname"] = name
                kwargs["assert_hostname"] = name
                super().init_poolmanager(*args, **kwargs)

        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override `verify`
        s.verify = str(self.pin) if pinned else True
        s.headers["Host"] = name
        s.mount("https://", ToTheHost())
        return s

    def url(self, path: str) -> str:
        """What `requests` connects to (the address; the name goes in SNI and Host)."""
        return f"https://{self.address}{path}"

    def api(self, method: str, path: str, auth: tuple[str, str] | None, body=None):
        s = self.session()
        return s.request(method, self.url(path), auth=auth, json=body, timeout=30)


def provision_public(inv: Path) -> dict:
    code, report, proc = provision_json(inv)
    assert code == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report


def pinned_file(urls_out: str) -> Path:
    match = re.search(r"pinned at (\S+)", urls_out)
    assert match, urls_out
    return Path(match.group(1))


def admin_password(h) -> str:
    return sh(h, "cat /etc/mlflow-stack/secrets/mlflow_admin_password").strip()


@pytest.fixture(scope="module", autouse=True)
def closed_at_the_end(stack):
    """Whatever happens in the module, the host is back to its defaults (public off)."""
    yield
    provision_json(stack.inv)


@pytest.fixture(scope="module")
def ip_site(stack, tmp_path_factory) -> Site:
    """Public mode without a domain: the host's own CA, for its address."""
    inv = stack.with_vars(tmp_path_factory.mktemp("ip-site"), PUBLIC_VARS)
    provision_public(inv)
    pin = pinned_file(ok(run_cli(inv, "urls")))
    return Site(inv, stack.info.address, stack.info.address, pin)


# --- internal CA -------------------------------------------------------------------------


def test_only_the_proxy_and_ssh_face_the_network(stack, ip_site):
    h = host(stack.info)
    try:
        listening = sh(h, "ss -Hltn").split("\n")
        units = sh(h, "systemctl is-active mlflow-proxy; systemctl is-enabled caddy || true")
        constraint = sh(
            h, "openssl x509 -in /etc/mlflow-proxy/ca/root.crt -noout -ext nameConstraints"
        )
        # the demo account (a Jupyter user's) cannot reconfigure the proxy or read the logins
        as_demo = (
            "runuser -u demo -- curl -s -o /dev/null -w '%{http_code}' "
            '--unix-socket /run/mlflow-proxy/admin.sock http://admin/config/; echo " $?"; '
            "curl -s -o /dev/null -m 3 http://127.0.0.1:2019/config/; echo $?; "
            "runuser -u demo -- cat /etc/mlflow-stack/mlflow-client.env /etc/mlflow/admin.env "
            "/etc/mlflow-proxy/ca/root.key >/dev/null 2>&1; echo $?"
        )
        refused = sh(h, as_demo).split()
        score = exposure(h, "mlflow-proxy.service")
    finally:
        h.close()
    assert refused == ["000", "7", "7", "1"], refused  # no socket access, no :2019, no files
    print(f"systemd-analyze security mlflow-proxy.service: {score}")
    assert score <= 3.0  # like every unit we write (test_least_privilege_e2e.py)
    exposed = set()
    for line in filter(None, listening):
        address, _, port = line.split()[3].rpartition(":")
        if not address.startswith(("127.", "[::1]", "[::ffff:127.")):
            exposed.add(int(port))
    assert exposed == {22, 80, 443}, listening
    assert units.split() == ["active", "masked"]  # the package's default site never runs
    assert f"IP:{stack.info.address}/255.255.255.255" in constraint
    # the pin is the host's CA itself
    h = host(stack.info)
    try:
        assert ip_site.pin.read_text() == sh(h, "cat /etc/mlflow-proxy/ca/root.crt")
    finally:
        h.close()


def exercise(site: Site, stack, tag: str) -> None:
    """What a user's tools see at the site: TLS verifies with the pin only, port 80 only
    redirects, MLflow wants credentials, refuses a foreign Host header, and its accounts work
    (users added by `invoke users.add`, 403 without a grant, admin password rotation)."""
    import requests

    # curl and requests: verified with the pinned CA, refused without it
    code, body, status = site.curl(SEARCH)
    assert (code, status) == (0, 401), body
    code, _, _ = site.curl(SEARCH, pinned=False)
    assert code == 60  # curl: (60) SSL certificate problem
    assert site.session().get(site.url(SEARCH), timeout=30).status_code == 401
    with pytest.raises(requests.exceptions.SSLError):
        site.session(pinned=False).get(site.url(SEARCH), timeout=30)
    # port 80 only redirects, to the same path on HTTPS
    proc = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
         "-H", f"Host: {site.name}", f"http://{site.address}/x/y?z=1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.stdout == f"308 https://{site.name}/x/y?z=1"
    # MLflow: 401 without, 200 with; another Host header gets MLflow's 403
    h = host(stack.info)
    try:
        password = admin_password(h)
    finally:
        h.close()
    admin = ("admin", password)
    assert site.api("GET", SEARCH, admin).status_code == 200
    foreign = site.session().get(
        site.url(SEARCH), auth=admin, headers={"Host": "evil.example"}, timeout=30
    )
    assert foreign.status_code == 403 and "Invalid Host header" in foreign.text

    # accounts: one password on stdin, one generated; never in argv
    bob, alice = f"bob-{tag}", f"alice-{tag}"
    ok(run_cli(site.inv, "users.add", bob, stdin="bob-password-e2e-1\n"))
    out = ok(run_cli(site.inv, "users.add", alice, "--generate"))
    alice_pw = re.search(rf"password of {alice} \(shown once\): (\S+)", out).group(1)
    assert site.api("GET", "/api/2.0/mlflow/users/current", (alice, alice_pw)).status_code == 200
    bobs = site.api(
        "POST", "/api/2.0/mlflow/experiments/create", (bob, "bob-password-e2e-1"),
        {"name": f"e2e-{bob}"},
    ).json()["experiment_id"]  # fmt: skip
    run = {"experiment_id": bobs, "start_time": int(time.time() * 1000)}
    as_alice = (alice, alice_pw)
    # default READ: alice sees bob's experiment, cannot write to it
    assert site.api("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={bobs}", as_alice)
    assert site.api("POST", "/api/2.0/mlflow/runs/create", as_alice, run).status_code == 403
    rename = {"experiment_id": bobs, "new_name": f"e2e-{alice}-took-it"}
    assert (
        site.api("POST", "/api/2.0/mlflow/experiments/update", as_alice, rename).status_code == 403
    )
    ok(
        run_cli(
            site.inv, "users.grant", alice, "--experiment", f"e2e-{bob}", "--permission", "EDIT"
        )
    )
    assert site.api("POST", "/api/2.0/mlflow/runs/create", as_alice, run).status_code == 200
    listed = ok(run_cli(site.inv, "users.list"))
    assert alice in listed and bob in listed and f"experiment {bobs}: EDIT" in listed
    ok(run_cli(site.inv, "users.remove", alice))
    assert site.api("GET", "/api/2.0/mlflow/users/current", as_alice).status_code == 401

    # the admin's password rotated through the API, by `invoke users.passwd admin` ...
    new = f"admin-rotated-{tag}-0001"
    ok(run_cli(site.inv, "users.passwd", "admin", stdin=new + "\n"))
    assert site.api("GET", SEARCH, admin).status_code == 401
    assert site.api("GET", SEARCH, ("admin", new)).status_code == 200
    h = host(stack.info)
    try:
        assert admin_password(h) == new  # the secret store follows
    finally:
        h.close()
    # ... and by provisioning with a new MLFLOW_ADMIN_PASSWORD
    newer = f"admin-rotated-{tag}-0002"
    code, report, proc = provision_json(site.inv, env={"MLFLOW_ADMIN_PASSWORD": newer})
    assert code == 0, proc.stderr
    assert "mlflow_server: MLflow accounts (admin password, workload account)" in changed_steps(
        report
    )
    assert site.api("GET", SEARCH, ("admin", new)).status_code == 401
    assert site.api("GET", SEARCH, ("admin", newer)).status_code == 200
    status = ok(run_cli(site.inv, "status"))
    assert "from outside" in status and "BAD" not in status, status
    for secret in (password, new, newer, alice_pw):
        assert secret not in status + listed + proc.stdout + proc.stderr


def test_internal_ca_site_from_the_outside(stack, ip_site):
    urls = ok(run_cli(ip_site.inv, "urls"))
    assert f"MLflow   https://{ip_site.name}/" in urls
    assert f"Jupyter  https://{ip_site.name}/jupyter/lab?token=<token>" in urls
    assert "SHA-256 " in urls and "certutil -d sql:$HOME/.pki/nssdb" in urls
    exercise(ip_site, stack, "ip")


# --- a real browser ----------------------------------------------------------------------


def nss_home(tmp_path: Path, pin: Path) -> Path:
    """A HOME whose NSS database (which Chromium reads) trusts the pinned CA."""
    home = tmp_path / "home"
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{db}", "-n", "e2e-pin", "-t", "C,,", "-i", str(pin)],
        check=True,
    )
    return home


def browser(p, home: Path, *rules: str):
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", *rules]  # fmt: skip
    return p.chromium.launch(
        executable_path=shutil.which("chromium") or "/usr/bin/chromium",
        headless=True,
        env={**os.environ, "HOME": str(home)},
        args=args,
    )


def test_a_real_browser_uses_mlflow_and_jupyterlab_over_https(stack, ip_site, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    out = ok(run_cli(ip_site.inv, "train", "--alpha", "0.33", "--quiet"))  # as the host's account
    run_id = re.search(r"^run ([0-9a-f]{32})", out, re.M).group(1)
    h = host(stack.info)
    try:
        password = admin_password(h)
        token = sh(h, "cat /etc/mlflow-stack/secrets/jupyter_token").strip()
    finally:
        h.close()
    run = ip_site.api("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", ("admin", password))
    info = run.json()["run"]["info"]
    home = nss_home(tmp_path, ip_site.pin)
    base = ip_site.base
    with sync_playwright() as p:
        b = browser(p, home)
        try:
            # MLflow's UI, basic auth (not in the URL: MLflow's fetch() refuses such URLs)
            ctx = b.new_context(
                http_credentials={"username": "admin", "password": password},
                viewport={"width": 1400, "height": 800},
            )
            page = ctx.new_page()
            # MLflow's UI bundle and its first queries on a machine other tests keep busy
            page.goto(f"{base}/#/experiments/{info['experiment_id']}/runs", timeout=240000)
            page.get_by_role("link", name=info["run_name"]).first.wait_for(timeout=240000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_runs_https.png"))
            ctx.close()

            # JupyterLab: token login, a notebook, a cell run through the kernel's websocket;
            # the kernel reaches MLflow as the host's account
            source = (
                "import mlflow\nruns = mlflow.search_runs(experiment_names=['wine'])\n"
                "print('wine runs via the kernel:', len(runs) > 0, 6 * 7)"
            )
            cell = {"cell_type": "code", "metadata": {}, "outputs": [], "source": source,
                    "execution_count": None}  # fmt: skip
            kernel = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                      "language": "python"}  # fmt: skip
            nb = {"cells": [cell], "metadata": {"kernelspec": kernel}, "nbformat": 4,
                  "nbformat_minor": 5}  # fmt: skip
            put = ip_site.session().put(
                ip_site.url("/jupyter/api/contents/e2e-https.ipynb"),
                headers={"Authorization": f"token {token}"},
                json={"type": "notebook", "content": nb},
                timeout=30,
            )
            assert put.status_code in (200, 201), put.text
            ctx = b.new_context(viewport={"width": 1400, "height": 800})
            page = ctx.new_page()
            sockets = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.goto(f"{base}/jupyter/lab/tree/e2e-https.ipynb?token={token}", timeout=240000)
            cell = page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").first
            cell.wait_for(timeout=240000)
            # a kernel's start (its imports) on a machine other tests keep busy: minutes
            page.get_by_text("Python 3 (ipykernel) | Idle").first.wait_for(timeout=240000)
            dialog = page.locator(".jp-Dialog")
            if dialog.count():
                dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
            cell.locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")
            output = page.locator(".jp-OutputArea-output").filter(has_text="via the kernel")
            output.first.wait_for(timeout=120000)
            text = output.first.inner_text()
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_cell_https.png"))
            cookies = {c["name"]: c for c in ctx.cookies()}
            ctx.close()
        finally:
            b.close()
    assert "True 42" in text, text
    assert any(u.startswith(f"wss://{ip_site.name}/jupyter/api/kernels/") for u in sockets)
    assert cookies["_xsrf"]["secure"] and cookies["_xsrf"]["path"] == "/jupyter/"
    login = [c for name, c in cookies.items() if name.startswith("username-")]
    assert login and all(c["secure"] and c["httpOnly"] for c in login)


# --- served models, and what crosses the network in the clear ------------------------------


def test_a_public_model_and_no_credential_over_plain_http(stack, ip_site, tmp_path):
    out = ok(run_cli(ip_site.inv, "train", "--alpha", "0.5", "--quiet"))
    run_id = re.search(r"^run ([0-9a-f]{32})", out, re.M).group(1)
    serve = ok(
        run_cli(ip_site.inv, "serve", "--run", run_id, "--name", "e2e-pub", "--port",
                str(SERVE_PORT), "--public")
    )  # fmt: skip
    assert f"public: https://{ip_site.name}/models/e2e-pub/invocations" in serve
    curl_line = next(line for line in serve.splitlines() if "--cacert" in line)
    h = host(stack.info)
    try:
        token = sh(h, "cat /etc/mlflow-stack/secrets/model_e2e-pub_token").strip()
        password = admin_password(h)
        jupyter = sh(h, "cat /etc/mlflow-stack/secrets/jupyter_token").strip()
    finally:
        h.close()
    # the printed curl works as printed, with the token in $TOKEN
    answer = subprocess.run(
        ["bash", "-c", curl_line], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TOKEN": token},
    )  # fmt: skip
    assert '"predictions"' in answer.stdout, answer.stdout + answer.stderr
    assert ip_site.curl("/models/e2e-pub/invocations", "-X", "POST")[2] == 401

    # everything our tools send to ports 80 and 5000 of the host, captured on the bridge
    capture = tmp_path / "plain.pcap"
    tcpdump = subprocess.Popen(
        ["tcpdump", "-i", network.BRIDGE, "-U", "-s", "0", "-w", str(capture),
         f"host {stack.info.address} and (tcp port 80 or tcp port 5000)"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "listening on" in tcpdump.stderr.readline()
        outputs = [
            ok(run_cli(ip_site.inv, "urls", "--reveal")),
            ok(run_cli(ip_site.inv, "status")),
            ok(run_cli(ip_site.inv, "users.list")),
            ok(run_cli(ip_site.inv, "predict", "--name", "e2e-pub")),
        ]
        time.sleep(1)
    finally:
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(timeout=30)
    assert re.match(r"^\d+\.\d{4}$", outputs[3].strip())  # a prediction, through the proxy
    assert "model e2e-pub" in outputs[1] and "401 without a token, 200 with it" in outputs[1]
    dump = subprocess.run(
        ["tcpdump", "-nn", "-A", "-r", str(capture)], capture_output=True, text=True, check=True
    ).stdout
    assert f"{stack.info.address}.80:" in dump  # status looked at the redirect ...
    assert f"{stack.info.address}.5000:" not in dump  # ... and nothing talks to 5000
    assert "Authorization" not in dump and "authorization" not in dump
    for secret in (
        token,
        password,
        jupyter,
        base64.b64encode(f"admin:{password}".encode()).decode(),
    ):
        assert secret not in dump
    ok(run_cli(ip_site.inv, "serve", "--stop", "--name", "e2e-pub"))
    assert ip_site.curl("/models/e2e-pub/ping")[2] != 200  # the route went with it


def test_second_converge_of_a_public_host_changes_nothing(ip_site):
    code, report, proc = provision_json(ip_site.inv)
    assert code == 0, proc.stderr
    assert changed_steps(report) == []
    assert report["recap"]["e2e"]["ssh_commands"] <= 5


def leaf_serial(site: Site) -> str:
    served = subprocess.run(
        ["openssl", "s_client", "-connect", f"{site.address}:443", "-servername", site.name,
         "-CAfile", str(site.pin), "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in served.stdout, served.stdout[-1500:]
    serial = subprocess.run(
        ["openssl", "x509", "-noout", "-serial"], input=served.stdout, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    return serial.stdout.strip()


def leaf_serial_or_none(site: Site) -> str | None:
    """The serial, or None while the proxy is between certificates (a handshake that fails,
    or one whose output has no certificate to read)."""
    try:
        return leaf_serial(site)
    except (AssertionError, subprocess.CalledProcessError):
        return None


def test_certificates_renew_inside_the_proxy_without_restarting_anything(stack, ip_site, tmp_path):
    """With a 90 s certificate checked every 10 s (test-only settings), Caddy replaces the
    site's certificate by itself: MLflow, Jupyter and the proxy keep their processes, the
    pinned CA keeps verifying, requests keep being answered."""
    short = f"{PUBLIC_VARS}\ntest: {{proxy_leaf_lifetime: 90s, proxy_renew_interval: 10s}}"
    inv = stack.with_vars(tmp_path, short)
    h = host(stack.info)
    units = "mlflow-server jupyter mlflow-proxy"
    try:
        provision_public(inv)
        # the 12-hour certificate is still good: drop it so that Caddy issues a short one
        store = "/var/lib/caddy/.local/share/caddy/certificates/local"
        sh(h, f"runuser -u caddy -- rm -rf {store}/{ip_site.address}")
        sh(h, "systemctl restart mlflow-proxy")
        issued = wait_until(lambda: leaf_serial_or_none(ip_site), 60, "a certificate of 90 s")
        pids = sh(h, f"systemctl show -p MainPID --value {units}").split()
        seen = []

        def renewed() -> bool:
            seen.append(ip_site.curl(SEARCH)[2])
            serial = leaf_serial_or_none(ip_site)
            return serial is not None and serial != issued

        wait_until(renewed, 150, "the certificate renewed by Caddy")
        assert sh(h, f"systemctl show -p MainPID --value {units}").split() == pids
        assert set(seen) == {401}  # answered all along, TLS verified with the pin
        log = sh(h, "journalctl -u mlflow-proxy --no-pager -o cat -n 200")
        assert "certificate obtained successfully" in log or "renewed" in log
    finally:
        provision_public(ip_site.inv)  # the usual certificate lifetime again
        h.close()


# --- ACME, with Let's Encrypt's test server ----------------------------------------------


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pebble(stack, tmp_path_factory):
    """pebble on the sandboxes' gateway (this machine, as the hosts see it), validating for
    real: its DNS is pebble-challtestsrv, which answers the sandbox's address for any name.
    Yields (directory URL, PEM bundle: pebble's TLS CA + the root it issues from)."""
    if not shutil.which("pebble"):
        pytest.fail("pebble is not installed (scripts/setup installs it)")
    work = tmp_path_factory.mktemp("pebble")
    gw = str(network.gateway(network.subnet()))
    ports = {k: free_port(gw) for k in ("acme", "mgmt", "dns", "dnsmgmt")}
    ssl_cmd = ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*ssl_cmd, "-x509", "-days", "30", "-subj", "/CN=pebble e2e TLS CA",
                    "-keyout", work / "ca.key", "-out", work / "ca.pem"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([*ssl_cmd, "-subj", "/CN=pebble", "-keyout", work / "key.pem",
                    "-out", work / "req.csr"], check=True, capture_output=True)  # fmt: skip
    (work / "ext.cnf").write_text(f"subjectAltName=IP:{gw}\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", work / "req.csr", "-CA", work / "ca.pem",
                    "-CAkey", work / "ca.key", "-CAcreateserial", "-days", "30",
                    "-extfile", work / "ext.cnf", "-out", work / "cert.pem"], check=True,
                   capture_output=True)  # fmt: skip
    config = {
        "pebble": {
            "listenAddress": f"{gw}:{ports['acme']}",
            "managementListenAddress": f"{gw}:{ports['mgmt']}",
            "certificate": str(work / "cert.pem"),
            "privateKey": str(work / "key.pem"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (work / "pebble.json").write_text(json.dumps(config))
    logs = [open(work / "challtestsrv.log", "w"), open(work / "pebble.log", "w")]  # noqa: SIM115
    dns = subprocess.Popen(
        ["pebble-challtestsrv", "-defaultIPv4", stack.info.address, "-defaultIPv6", "",
         "-dns01", f"{gw}:{ports['dns']}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-management", f"{gw}:{ports['dnsmgmt']}"],
        stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    acme = subprocess.Popen(
        ["pebble", "-config", str(work / "pebble.json"), "-dnsserver", f"{gw}:{ports['dns']}",
         "-strict"],
        stdout=logs[1], stderr=subprocess.STDOUT, env={**os.environ, "PEBBLE_VA_NOSLEEP": "1"},
    )  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(work / "ca.pem"))

        def root() -> str | None:
            try:
                with urllib.request.urlopen(
                    f"https://{gw}:{ports['mgmt']}/roots/0", context=context, timeout=3
                ) as answer:
                    return answer.read().decode()
            except OSError:
                return None

        wait_until(lambda: root() is not None, 30, "pebble's management interface")
        bundle = work / "acme-roots.pem"
        bundle.write_text((work / "ca.pem").read_text() + root())
        yield f"https://{gw}:{ports['acme']}/dir", bundle, work
    finally:
        for proc in (acme, dns):
            proc.terminate()
            proc.wait(timeout=10)
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def acme_site(stack, pebble, tmp_path_factory) -> Site:
    directory, bundle, _ = pebble
    variables = (
        f"{PUBLIC_VARS}\npublic: {{domain: {DOMAIN}, acme_directory: '{directory}', "
        f"acme_roots: '{bundle}'}}"
    )
    inv = stack.with_vars(tmp_path_factory.mktemp("acme-site"), variables)
    provision_public(inv)
    pin = pinned_file(ok(run_cli(inv, "urls")))
    return Site(inv, DOMAIN, stack.info.address, pin)


def test_acme_certificate_from_pebble_validated_for_real(stack, pebble, acme_site):
    _, bundle, work = pebble
    assert acme_site.pin.read_text() == bundle.read_text()  # the private ACME CA's roots
    served = subprocess.run(
        ["openssl", "s_client", "-connect", f"{stack.info.address}:443", "-servername", DOMAIN,
         "-CAfile", str(bundle), "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in served.stdout, served.stdout[-2000:]
    assert f"s:CN = {DOMAIN}" in served.stdout and "i:CN = Pebble Intermediate CA" in served.stdout
    log = (work / "pebble.log").read_text()
    assert "http-01" in log.lower() or "validation" in log.lower(), log[-2000:]
    urls = ok(run_cli(acme_site.inv, "urls"))
    assert f"MLflow   https://{DOMAIN}/" in urls and "private ACME CA" in urls
    exercise(acme_site, stack, "acme")


# --- closing ----------------------------------------------------------------------------


def test_switching_public_off_closes_the_path(stack):
    code, report, proc = provision_json(stack.inv)
    assert code == 0, proc.stderr
    h = host(stack.info)
    try:
        listening = sh(h, "ss -Hltn")
        proxy = sh(
            h, "systemctl is-active mlflow-proxy || true; systemctl is-enabled mlflow-proxy || true"
        )
        client_env = sh(h, "test -e /etc/mlflow-stack/mlflow-client.env && echo yes || echo no")
    finally:
        h.close()
    assert ":443 " not in listening and ":80 " not in listening, listening
    assert proxy.split() == ["inactive", "disabled"]
    assert client_env.strip() == "no"
    with pytest.raises(OSError):
        socket.create_connection((stack.info.address, 443), timeout=5).close()
    # MLflow is back on loopback without accounts, through the tunnel as before
    with urllib.request.urlopen(f"{stack.tracking_uri}{SEARCH}", timeout=10) as answer:
        assert answer.status == 200
    assert "from outside" not in ok(run_cli(stack.inv, "status"))
    code, report, _ = provision_json(stack.inv)
    assert code == 0 and changed_steps(report) == []
