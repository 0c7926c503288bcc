"""Role `proxy`: HTTPS in front of everything public, with Caddy from the distribution.

Why Caddy (Debian 12 and Ubuntu 24.04 ship 2.6) rather than nginx: it obtains and renews its
certificates itself, in-process: from an ACME directory (Let's Encrypt by default, any other
by URL) for a host with a domain, or from a CA of the host's own for an IP-only host, with
no certbot, no cron job, no reload hook and no restart of anything (a renewal does not even
drop Jupyter's websockets). Redirecting port 80 while answering ACME challenges there,
websockets and the X-Forwarded-* headers need no configuration. nginx proxies faster, but at
this host's loads (MLflow and model servers do a few thousand requests a second at most) the
difference does not matter, while a certbot setup would be three more moving parts.

When `mlflow.public` or `jupyter.public` is set, `mlflow-proxy.service` runs Caddy as the
package's `caddy` account with `/etc/mlflow-proxy/Caddyfile`: 443 serves MLflow at `/`,
Jupyter at `/jupyter/` and each public model at `/models/<name>/` (bearer token, one file per
model written by `invoke serve --public`); 80 only redirects and answers ACME challenges.
The package's own `caddy.service` (a default site on :80) is masked before the package is
installed, so it never starts. Caddy's admin API is a socket only root and `caddy` reach.
Without a domain, the host gets its own CA (`/etc/mlflow-proxy/ca/root.crt`, ten years, name
constrained to the site's address, so trusting it vouches for this host and nothing else);
the controller fetches it over SSH and pins it. When nothing is public the proxy is stopped
and disabled: nothing listens on 443 or 80.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow_stack import layout, public, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import (
    Apt,
    Change,
    Cmd,
    Directory,
    File,
    PlanContext,
    Run,
    Schedule,
    Service,
    Step,
    StepError,
    q,
)
from mlflow_stack.engine.templating import render
from mlflow_stack.layout import (
    PROXY_CA_CERT,
    PROXY_CA_DIR,
    PROXY_CA_KEY,
    PROXY_CONF_DIR,
    PROXY_CONFIG,
    PROXY_PACKAGE_UNIT,
    PROXY_STATE,
    PROXY_UNIT,
    PROXY_USER,
)
from mlflow_stack.sizing import Sizing

CA_NAMES = layout.PROXY_CA_NAMES  # the name the CA is constrained to, one line
CA_DAYS = 3650
# Caddy's own copies made with an earlier CA (its intermediate, the site's certificates).
CADDY_DATA = f"{PROXY_STATE}/.local/share/caddy"


def site_address(site: public.Site) -> str:
    """The Caddyfile's site address: `https://name[:port]`."""
    return f"https://{site.authority}"


def caddyfile(site: public.Site, host_vars) -> str:
    hv = host_vars
    # tests only (vars `test:`): short-lived certificates, checked often, to see renewals
    test = hv.test if isinstance(hv.test, dict) else {}
    return render(
        "proxy/Caddyfile.j2",
        admin_socket=layout.PROXY_ADMIN_SOCKET,
        http_port=site.http_port,
        https_port=site.https_port,
        tls=site.tls,
        name=site.name,
        ca_cert=PROXY_CA_CERT,
        ca_key=PROXY_CA_KEY,
        acme_directory=site.acme_directory,
        acme_roots=layout.PROXY_ACME_ROOTS if site.acme_roots else "",
        acme_email=site.acme_email,
        jupyter=hv.jupyter.public,
        jupyter_prefix=public.JUPYTER_PREFIX,
        jupyter_port=hv.jupyter.port,
        models_dir=layout.PROXY_MODELS_DIR,
        mlflow=hv.mlflow.public,
        mlflow_port=hv.mlflow.port,
        site_address=site_address(site),
        leaf_lifetime=test.get("proxy_leaf_lifetime", ""),
        renew_interval=test.get("proxy_renew_interval", ""),
    )


def unit_text(sizing: Sizing) -> str:
    return render(
        "systemd/mlflow-proxy.service.j2",
        go_memory_limit=sizing.go_memory_limit,
        user=PROXY_USER,
        state=PROXY_STATE,
        state_name=PROXY_STATE.removeprefix("/var/lib/"),
        config=PROXY_CONFIG,
    )


def name_constraint(name: str) -> str:
    """An X.509 permitted subtree for exactly `name` (an address or a DNS name)."""
    if public.is_ip(name):
        import ipaddress

        ip = ipaddress.ip_address(name)
        full = "255.255.255.255" if ip.version == 4 else "FFFF:" * 7 + "FFFF"
        return f"permitted;IP:{name}/{full}"
    return f"permitted;DNS:{name}"


def ca_script(name: str, host: str) -> str:
    """Make the host's CA: a P-256 root valid ten years, allowed to sign one intermediate
    (Caddy's) and name-constrained to `name`; its key readable by the proxy account only.
    Caddy's copies made with an earlier CA are dropped (as that account) so it starts anew."""
    subject = f"/O=mlflow-stack/CN=mlflow-stack CA for {host} ({name})"
    exts = (
        "-addext basicConstraints=critical,CA:TRUE,pathlen:1 "
        "-addext keyUsage=critical,keyCertSign,cRLSign "
        f"-addext {q('nameConstraints=critical,' + name_constraint(name))}"
    )
    d = PROXY_CA_DIR
    return (
        f"set -e; install -d -m 0750 -o root -g {PROXY_USER} {d}; umask 077; "
        f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days {CA_DAYS} "
        f"-subj {q(subject)} {exts} -keyout {d}/root.key.new -out {d}/root.crt.new 2>/dev/null; "
        f"chgrp {PROXY_USER} {d}/root.key.new && chmod 640 {d}/root.key.new && "
        f"chmod 644 {d}/root.crt.new; mv -f {d}/root.key.new {PROXY_CA_KEY}; "
        f"mv -f {d}/root.crt.new {PROXY_CA_CERT}; printf '%s\\n' {q(name)} > {CA_NAMES}; "
        f"if [ -d {CADDY_DATA} ]; then runuser -u {PROXY_USER} -- rm -rf "
        f"{CADDY_DATA}/pki/authorities/local {CADDY_DATA}/certificates/local; fi"
    )


def ca_fact() -> F.Fact:
    """The name the host's CA is constrained to (empty when there is none)."""
    return role_facts.ProxyCa()


def ca_steps(name: str, host: str) -> list[Step]:
    fact = ca_fact()
    return [
        Run(
            f"host CA for {name}",
            ca_script(name, host),
            when=lambda c: c[fact].output.strip() != name,
            needs=(fact,),
            notify=(PROXY_UNIT,),
            id="proxy:ca",
        )
    ]


@dataclass
class WaitHttps(Step):
    """Wait until the proxy answers HTTPS for the site on this host, its certificate verified
    (the host's CA or the system's roots): for ACME, until the certificate is issued."""

    label: str = field()
    site: public.Site
    cafile: str = ""
    timeout: int = 180
    schedule: Schedule = Schedule.AT_END

    def __post_init__(self) -> None:
        self.id = f"wait:{self.site.url}"

    def fact(self) -> role_facts.ProxyAnswers:
        s = self.site
        host = f"[{s.name}]" if ":" in s.name else s.name
        return role_facts.ProxyAnswers(s.url, f"{host}:{s.https_port}:127.0.0.1", self.cafile)

    def curl(self) -> str:
        return self.fact().command()

    def facts(self) -> list[F.Fact]:
        return [self.fact()]

    def plan(self, ctx: PlanContext) -> Change | None:
        code = ctx[self.fact()].output.strip()
        if code not in ("", "000") and PROXY_UNIT not in ctx.restarted:
            return None
        script = (
            f"end=$(( $(date +%s) + {self.timeout} )); while :; do code=$({self.curl()}); "
            'case "$code" in 000|"") ;; *) exit 0;; esac; '
            f'[ "$(date +%s)" -ge "$end" ] && {{ echo "no verified HTTPS answer from '
            f'{self.site.url} on the host; see journalctl -u {PROXY_UNIT}" >&2; exit 1; }}; '
            "sleep 0.5; done"
        )
        return Change(
            f"wait for {self.site.url}", [Cmd(script, timeout=self.timeout + 10)], counts=False
        )


def masked_package_unit() -> Run:
    """Mask the package's caddy.service before the package is installed: its postinst would
    start it with the default site on :80. (A mask the package did not make stays.)"""
    fact = F.Unit(PROXY_PACKAGE_UNIT)
    return Run(
        f"masked {PROXY_PACKAGE_UNIT} (the package's default site)",
        f"systemctl disable --now {PROXY_PACKAGE_UNIT} 2>/dev/null; "
        f"systemctl mask {PROXY_PACKAGE_UNIT}",
        when=lambda c: c[fact].load_state != "masked",
        needs=(fact,),
        id="proxy:mask-package-unit",
    )


def reload_step() -> Run:
    """A changed Caddyfile applies through Caddy's graceful reload (a bad one is refused and
    the old one keeps serving), unless the proxy is (re)started in this run anyway."""
    config_id = f"file:{PROXY_CONFIG}"
    unit = F.Unit(PROXY_UNIT)
    return Run(
        "reload the proxy's configuration",
        f"systemctl reload {PROXY_UNIT}",
        when=lambda c: (
            config_id in c.changed
            and PROXY_UNIT not in c.restarted
            and PROXY_UNIT not in c.pending
            and c[unit].active
        ),
        needs=(unit,),
        id="proxy:reload",
    )


def off_steps() -> list[Step]:
    """Nothing public: the proxy stopped and disabled (its files stay for the next time)."""
    return [Service(PROXY_UNIT, enabled=False, running=False)]


def build(ctx: RoleContext) -> list[Step]:
    if not public.is_public(ctx.vars):
        return off_steps()
    site = public.site(ctx.vars, ctx.address)
    if not site.name:
        raise StepError("public mode needs public.domain or public.address (no address known)")
    steps: list[Step] = [
        masked_package_unit(),
        Apt(("caddy", "openssl", "curl")),
        Directory(PROXY_CONF_DIR, "root", PROXY_USER, 0o750),
        Directory(layout.PROXY_MODELS_DIR, "root", PROXY_USER, 0o750),
    ]
    cafile = ""
    if site.tls == "internal":
        steps += ca_steps(site.name, ctx.host)
        cafile = PROXY_CA_CERT
    elif site.acme_roots:
        path = Path(site.acme_roots).expanduser()
        try:
            roots = path.read_text()
        except OSError as exc:
            raise StepError(f"public.acme_roots {site.acme_roots}: {exc.strerror}") from None
        if "BEGIN CERTIFICATE" not in roots:
            raise StepError(f"public.acme_roots {site.acme_roots}: no PEM certificate in it")
        steps.append(File(layout.PROXY_ACME_ROOTS, roots, "root", "root", 0o644))
        cafile = layout.PROXY_ACME_ROOTS
    steps += [
        File(PROXY_CONFIG, caddyfile(site, ctx.vars), "root", PROXY_USER, 0o640),
        File(
            layout.unit_file(PROXY_UNIT),
            unit_text(ctx.sizing),
            notify=(PROXY_UNIT,),
            unit_file=True,
        ),
        Service(PROXY_UNIT),
        reload_step(),
        WaitHttps(f"proxy answers {site.url}", site, cafile),
    ]
    return steps


role = Role("proxy", build)
