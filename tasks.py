"""mlflow-stack tasks: provision a host, then drive the MLflow demo on it (`invoke --list`).

Each task parses its flags, calls one function and prints; `cli` holds what they share.
"""

from __future__ import annotations

from collections.abc import Sequence

from invoke import Collection, task

from mlflow_stack import cli, inputs, secrets, users_tasks
from mlflow_stack.secrets import mask

HOST_HELP = "host (default: the 'server' group)"
INVENTORY_HELP = "inventory file (default: inventory.yaml, or $MLFLOW_STACK_INVENTORY)"


def role_catalog(names: Sequence[str]):
    """The roles named, in order (imported only once SSH and the facts probe are under way)."""
    import roles

    return roles.ordered(names)


@task(
    help={
        "host": "inventory host or group, ssh_config alias, or user@address[:port] "
        "(comma-separated for several; default: the 'server' group, else the sandbox)",
        "roles": "comma-separated roles to run (default: the host's roles from the inventory)",
        "check": "plan only: report what would change, change nothing",
        "diff": "show unified diffs of the files that change",
        "json": "print one JSON object (recap per host) instead of step lines",
        "inventory": INVENTORY_HELP,
    }
)
def provision(c, host=None, roles=None, check=False, diff=False, json=False, inventory=None):
    """Converge the roles (anaconda, mysql, mlflow_server, jupyter, demo_files) on hosts."""
    from mlflow_stack import provision as provisioning
    from mlflow_stack.engine.report import Reporter
    from mlflow_stack.engine.runner import Options

    wanted = cli.parse_roles(roles)
    with cli.reporting(code=2):
        secrets.check_given()  # a secret given too short is refused before anything connects
    hosts = cli.hosts_for(host, inventory)
    if any(h.vars.backup.before_upgrade == "controller" for h in hosts):  # issue #19
        from mlflow_stack.actions.backup import before_upgrades

        with cli.reporting():
            for line in before_upgrades(hosts, check=check):
                cli.say(line)
    with cli.reporting():
        recaps = provisioning.provision(
            hosts,
            role_catalog,
            Reporter(json_mode=json, check=check),
            roles=wanted,
            options=Options(check=check, diff=diff),
        )
    failure = provisioning.first_failure(recaps)
    if failure:
        raise cli.fail(failure)


@task(
    help={
        "run": "serve the model logged by this run id",
        "model": "or serve a registry model: models:/NAME@ALIAS, models:/NAME/VERSION",
        "name": "instance name: the unit is mlflow-model@NAME (default: wine)",
        "port": "port on the host's 127.0.0.1 (default: 54321)",
        "workers": "uvicorn workers forked after one model load (default 0: one per CPU)",
        "stop": "stop and remove the instance NAME instead",
        "public": "also serve it at https://<site>/models/NAME/ behind the proxy, with a bearer "
        "token (the host must be public)",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def serve(c, run=None, model=None, name="wine", port=54321, workers=0, stop=False,
          public=False, host=None, inventory=None):  # fmt: skip
    """Serve a model as the systemd unit mlflow-model@NAME and print a ready curl."""
    from mlflow_stack.actions import serve as serving

    with cli.reporting(code=2):
        name = inputs.instance_name(name)  # on every path, --stop too: it names a unit
        if not stop and bool(run) == bool(model):
            raise inputs.InputError(
                "give exactly one of --run RUN_ID or --model models:/NAME@ALIAS"
            )
        ref = inputs.run_id(run) if run else inputs.model_uri(model) if model else ""
        req = serving.ServeRequest(
            name,
            ref,
            inputs.port(port),
            inputs.whole_number(workers, "--workers", 0, 16),
            public,
        )
        req.validate()
    with cli.on_host(host, inventory) as (resolved, h):
        if stop:
            done = serving.stop(h, name)
            cli.say(f"{'stopped' if done else 'nothing to stop:'} mlflow-model@{name} on {h.name}")
            return
        result = serving.serve(h, resolved.vars, req)
        if public:  # the public URL, and the pin its curl verifies against
            from mlflow_stack.actions import public as site

            client, _ = site.outside(h, resolved.vars, resolved.target.address)
    state = "started/updated" if result.changed else "already serving (no change)"
    cli.say(
        f"mlflow-model@{name} on {h.name}: {state} in {result.seconds:.1f}s",
        f"model: {result.uri}" + (f" (version {result.version})" if result.version else ""),
        f"url:   {result.url}  (on the host; `invoke tunnel` forwards it)",
        serving.curl_example(req.port),
    )
    if public:
        url = f"{client.site.url}models/{name}/invocations"
        cli.say(
            f"public: {url}  (bearer token: invoke urls --reveal)",
            serving.public_curl_example(url, client.cafile),
        )


@task(
    help={
        "name": "served instance (default: wine)",
        "port": "port of the model server (default: the instance's)",
        "data": "a JSON payload file (sent as is) or a CSV of wines (default: the sample wine)",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def predict(c, name="wine", port=None, data=None, host=None, inventory=None):
    """Score the sample wine (or --data) against a served model and print the prediction
    (a public model through its HTTPS URL, TLS verified, as an outside client would)."""
    from mlflow_stack.actions import predict as scoring

    with cli.reporting(code=2):
        name = inputs.instance_name(name)
        if data is not None:
            inputs.local_path(data, "--data")
        payload = scoring.load_payload(data)  # bad input fails before anything connects
        wanted_port = inputs.port(port) if port is not None else None
    with cli.on_host(host, inventory) as (resolved, h):
        predictions = scoring.predict_served(h, name, wanted_port, payload, resolved)
    cli.say(*(f"{value:.4f}" for value in predictions))


@task(name="check-mysql", help={"host": HOST_HELP, "inventory": INVENTORY_HELP})
def check_mysql(c, host=None, inventory=None):
    """Check the MLflow database: service, root socket, utf8mb4, tables, schema, client login."""
    from mlflow_stack.actions import check_mysql as checking
    from mlflow_stack.layout import Layout

    with cli.on_host(host, inventory) as (resolved, h):
        checks, counts = checking.check_mysql(h, Layout.of(resolved.vars))
    cli.say(checking.render_table(checks, counts))
    failed = [chk for chk in checks if not chk.ok]
    if failed:
        first = failed[0]
        raise cli.fail(f"{h.name}: {first.name}: {first.detail}; hint: {first.hint}")


@task(help={"host": HOST_HELP, "inventory": INVENTORY_HELP})
def status(c, host=None, inventory=None):
    """Show every unit (database, MLflow, Jupyter, served models), data sizes and free disk."""
    from mlflow_stack.actions import status as statuses
    from mlflow_stack.actions import storage
    from mlflow_stack.layout import Layout

    with cli.on_host(host, inventory) as (resolved, h):
        rows = statuses.gather(h, Layout.of(resolved.vars))
        usage = storage.gather(h, resolved.vars)  # sizes, free disk (issue #19)
        outside = statuses.outside_in(h, resolved)  # public mode: the site from outside
    cli.say(statuses.render_status(h.name, rows), *storage.render(usage))
    failed = [f"{r.unit} {r.state}/{r.health}" for r in rows if not r.ok]
    if outside is not None:
        cli.say(outside[0])
        failed += [f"{c.name}: {c.detail}" for c in outside[1]]
    if failed:
        raise cli.fail(f"{h.name}: " + ", ".join(failed))


@task(
    help={
        "reveal": "print the Jupyter token itself (it is a secret: mind your terminal)",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def urls(c, reveal=False, host=None, inventory=None):
    """Print the MLflow and Jupyter URLs and how to log in."""
    from mlflow_stack.actions import status as statuses

    with cli.on_host(host, inventory) as (resolved, h):
        lines = statuses.login_lines(h, resolved, reveal)
    text = "\n".join(lines)
    print(text if reveal else mask(text))  # --reveal: the user asked for the token itself


@task(
    help={
        "mysql": "also forward the database port (for admin tools)",
        "offset": "add this to each local port (e.g. 10000: 5000 → 15000)",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def tunnel(c, mysql=False, offset=0, host=None, inventory=None):
    """Forward MLflow, Jupyter and served-model ports over SSH until Ctrl-C."""
    from mlflow_stack.actions import tunnel as tunnels

    with cli.reporting(code=2):
        shift = inputs.whole_number(offset, "--offset", 0, 60000)
    with cli.on_host(host, inventory) as (resolved, h):
        pairs = tunnels.port_pairs(h, resolved.vars, shift, mysql)
        try:
            with tunnels.tunnel(h, pairs) as forwarding:
                for local, remote in pairs:
                    print(f"127.0.0.1:{local} -> {h.name}:127.0.0.1:{remote}", flush=True)
                print("forwarding; Ctrl-C to stop", flush=True)
                tunnels.wait_forever(forwarding)
        except KeyboardInterrupt:
            print("tunnel closed")


@task(
    help={
        "alpha": "regularisation strength (>= 0; default 0.5)",
        "l1_ratio": "balance between L1 and L2 penalties, in [0, 1] (default 0.1)",
        "experiment": "MLflow experiment name (default: wine)",
        "no_artifacts": "skip plots and tables (faster)",
        "quiet": "print only the result, not the training output",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def train(c, alpha="0.5", l1_ratio="0.1", experiment="wine", no_artifacts=False, quiet=False,
          host=None, inventory=None):  # fmt: skip
    """Train the wine model once on the host, tracked in MLflow; print run id and metrics."""
    from mlflow_stack.actions import train as training
    from mlflow_stack.layout import Layout

    with cli.reporting(code=2):
        a = inputs.number(alpha, "--alpha", 0.0)
        l1 = inputs.number(l1_ratio, "--l1-ratio", 0.0, 1.0)
        experiment = inputs.experiment(experiment)
    printer = (lambda line: None) if quiet else (lambda line: cli.say(f"  | {line}"))
    with cli.on_host(host, inventory) as (resolved, h):
        place = Layout.of(resolved.vars)
        result = training.train(h, place, a, l1, experiment, printer, not no_artifacts)
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result["metrics"].items()))
    cli.say(
        f"run {result['run_id']}  {metrics}",
        f"model: {result.get('model_uri', '-')}",
        f"view:  {training.run_url(place, result)}  (through `invoke tunnel`)",
    )


@task(
    help={
        "n_trials": "trials in all (default 100)",
        "study": "Optuna study name (default: a new one per run when shared)",
        "hosts": "comma-separated hosts that tune (default: the server)",
        "group": "or every host of this inventory group, e.g. workers (the server joins too)",
        "jobs_per_host": "tuning processes per host (default 1; >1 shares one study)",
        "experiment": "MLflow experiment (default: wine-tuning)",
        "quiet": "print only the result, not the tuning output",
        "inventory": INVENTORY_HELP,
    }
)
def tune(c, n_trials="100", study=None, hosts=None, group=None, jobs_per_host="1",
         experiment="wine-tuning", quiet=False, inventory=None):  # fmt: skip
    """Optuna search, every trial an MLflow run; the best model registered as champion."""
    from mlflow_stack.actions import tune as tuning

    with cli.reporting(code=2):
        total = inputs.whole_number(n_trials, "--n-trials", 1, 1_000_000)
        per_host = inputs.whole_number(jobs_per_host, "--jobs-per-host", 1, 64)
        experiment = inputs.experiment(experiment)
        if study is not None:
            study = inputs.study(study)
    with cli.reporting():
        server, chosen = tuning.choose_hosts(cli.load_inventory(inventory), hosts, group)
    printer = (
        (lambda who, line: None) if quiet else (lambda who, line: cli.say(f"  {who} | {line}"))
    )
    name = study or tuning.default_study(len(chosen) * per_host > 1)
    with cli.connected([server, *chosen]) as links:
        outcome = tuning.tune(server, chosen, links, total, name, experiment, per_host, printer)
    cli.say(*tuning.render_outcome(outcome))


@task(
    help={
        "fresh": "start from a new sandbox (stops and removes the current one)",
        "keep": "keep the sandbox running afterwards (default; --no-keep stops it)",
        "trials": "tuning trials (default 300)",
        "host": "inventory host to run it on (default: sandbox, started if needed)",
        "port": "port of the served champion (default: 54321)",
        "inventory": INVENTORY_HELP,
        "cpus": "a new sandbox's CPUs, e.g. 1 (the original t2.micro: --cpus 1 --memory 1G)",
        "memory": "a new sandbox's memory limit, e.g. 1G",
    }
)
def demo(c, fresh=False, keep=True, trials="300", host="sandbox", port=54321, inventory=None,
         cpus=None, memory=None):  # fmt: skip
    """The whole walkthrough on the local sandbox: provision, train, tune, serve, predict, check."""
    from mlflow_stack import demo as walkthrough

    with cli.reporting(code=2):
        n = inputs.whole_number(trials, "--trials", 1, 100_000)
        serve_port = inputs.port(port)
        cpus = inputs.whole_number(cpus, "--cpus", 1, 256) if cpus is not None else None
        host = inputs.name(host, "--host")
        secrets.check_given()
    inv = cli.load_inventory(inventory)
    try:
        with cli.reporting():
            walkthrough.run_demo(
                inv,
                role_catalog,
                fresh=fresh,
                trials=n,
                host_name=host,
                serve_port=serve_port,
                size={"cpus": cpus, "memory": memory},  # memory: checked by the sandbox
            )
    finally:
        if not keep:
            with cli.reporting():
                stopped = walkthrough.stop_sandbox(inv, host)
            if stopped:
                cli.say(f"sandbox {stopped} stopped (--no-keep)")


# --- backup and restore (issue #19) ------------------------------------------------------


@task(
    help={
        "to": "directory the backup goes into, as <host>-<UTC time>/ (default: backups)",
        "with_secrets": "also back up the host's secrets (the backup is then 0600: keep it safe)",
        "level": "zstd level on the host, 1-19 (default 1: fast); 0 sends it uncompressed",
        "quiet": "no progress line",
        "host": HOST_HELP,
        "inventory": INVENTORY_HELP,
    }
)
def backup(c, to="backups", with_secrets=False, level="1", quiet=False, host=None,
           inventory=None):  # fmt: skip
    """Back up a host (databases, auth DB, artifacts, notebooks, manifest) to a directory here."""
    from pathlib import Path

    from mlflow_stack.actions import backup as backups
    from mlflow_stack.actions.progress import Progress
    from mlflow_stack.layout import Layout

    with cli.reporting(code=2):
        zstd_level = inputs.whole_number(level, "--level", 0, 19)
        to = inputs.local_path(to, "--to")
    with cli.on_host(host, inventory) as (resolved, h):
        progress = None if quiet else Progress(f"backup of {h.name}")
        with cli.reporting():
            result = backups.backup(
                h,
                Layout.of(resolved.vars),
                Path(to),
                with_secrets=with_secrets,
                level=zstd_level,
                progress=progress,
            )
    cli.say(*backups.summary(result))


@task(
    name="restore",
    help={
        "from_": "a backup directory made by invoke backup",
        "host": "the host to restore onto (required: restoring replaces its data)",
        "force": "restore onto a host that holds data of its own (it is replaced)",
        "with_secrets": "also put the backup's secrets in place (then run invoke provision)",
        "quiet": "no progress line",
        "inventory": INVENTORY_HELP,
    },
)
def restore(c, from_=None, host=None, force=False, with_secrets=False, quiet=False,
            inventory=None):  # fmt: skip
    """Restore a backup onto a provisioned host; refuses a newer, corrupt or partial backup."""
    from pathlib import Path

    from mlflow_stack.actions import restore as restoring
    from mlflow_stack.actions.progress import Progress
    from mlflow_stack.layout import Layout

    with cli.reporting(code=2):
        if not from_:
            raise inputs.InputError("--from: give the backup directory to restore")
        if not host:
            raise inputs.InputError("--host: name the host to restore onto")
        from_ = inputs.local_path(from_, "--from")
    with cli.reporting():
        checking = None if quiet else Progress(f"backup {from_}")
        loaded = restoring.load(Path(from_), checking)
        if checking is not None:
            checking.finish()
    with cli.on_host(host, inventory) as (resolved, h):
        progress = None if quiet else Progress(f"restore onto {h.name}")
        with cli.reporting():
            result = restoring.restore(
                h,
                Layout.of(resolved.vars),
                loaded,
                force=force,
                with_secrets=with_secrets,
                progress=progress,
            )
    cli.say(*restoring.summary(result, loaded))
    if with_secrets:
        cli.say(f"secrets restored: run `invoke provision --host {h.name}` to apply them")
    if result.mismatches:
        raise cli.fail(f"{h.name}: restored, but " + "; ".join(result.mismatches))


ns = Collection(demo, provision, train, tune, serve, predict, check_mysql, status, urls, tunnel)
ns.add_collection(users_tasks.ns)  # MLflow accounts: users.add, .list, .passwd, .grant, .remove
ns.add_task(backup)
ns.add_task(restore)
try:
    from mlflow_stack import sandbox_tasks
except ImportError:  # the sandbox module is optional on machines that only provision
    sandbox_tasks = None
if sandbox_tasks is not None:
    ns.add_collection(sandbox_tasks.ns)
