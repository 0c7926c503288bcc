"""mlflow-stack tasks: provision a host, then drive the MLflow demo on it (`invoke --list`)."""

from __future__ import annotations

from invoke import Collection, task

from mlflow_stack import cli


@task(
    help={
        "host": "inventory host or group, ssh_config alias, or user@address[:port] "
        "(comma-separated for several; default: the 'server' group, else the sandbox)",
        "roles": "comma-separated roles to run (default: the host's roles from the inventory)",
        "check": "plan only: report what would change, change nothing",
        "diff": "show unified diffs of the files that change",
        "json": "print one JSON object (recap per host) instead of step lines",
        "inventory": "inventory file (default: inventory.yaml, or $MLFLOW_STACK_INVENTORY)",
    }
)
def provision(c, host=None, roles=None, check=False, diff=False, json=False, inventory=None):
    """Converge the roles (anaconda, mysql, mlflow_server, jupyter, demo_files) on hosts."""
    from mlflow_stack.engine.host import Host
    from mlflow_stack.engine.probing import Prefetch, plan_path

    wanted = cli.parse_roles(roles)
    hosts = cli.hosts_for(host, inventory)
    connections = [Host(h.target) for h in hosts]
    for connection in connections:
        connection.connect_soon()  # SSH handshakes overlap the imports below
    # The facts the last run read start being probed now, while the roles are imported/built.
    prefetches = [
        Prefetch(c, plan_path(c, wanted or h.roles))
        for c, h in zip(connections, hosts, strict=True)
    ]
    try:
        import roles as role_registry
        from mlflow_stack.engine.report import Reporter
        from mlflow_stack.engine.runner import HostJob, Options, converge

        jobs = [
            HostJob(connection, role_registry.ordered(wanted or h.roles), h.vars, prefetch)
            for connection, h, prefetch in zip(connections, hosts, prefetches, strict=True)
        ]
        reporter = Reporter(json_mode=json, check=check)
        recaps = converge(jobs, Options(check=check, diff=diff), reporter)
    finally:
        for connection in connections:
            connection.close()
    failed = [r for r in recaps if r.failed]
    if failed:
        first = failed[0]
        reason = first.error or next(
            (f"{s.role}: {s.step}: {s.summary}" for s in first.results if s.status == "failed"), ""
        )
        raise cli.fail(f"{first.host}: {reason}" if not first.error else reason)


@task(
    help={
        "run": "serve the model logged by this run id",
        "model": "or serve a registry model: models:/NAME@ALIAS, models:/NAME/VERSION",
        "name": "instance name: the unit is mlflow-model@NAME (default: wine)",
        "port": "port on the host's 127.0.0.1 (default: 54321)",
        "workers": "uvicorn workers forked after one model load (default 0: one per CPU)",
        "stop": "stop and remove the instance NAME instead",
        "host": "host (default: the 'server' group)",
        "inventory": "inventory file",
    }
)
def serve(
    c,
    run=None,
    model=None,
    name="wine",
    port=54321,
    workers=0,
    stop=False,
    host=None,
    inventory=None,
):
    """Serve a model as the systemd unit mlflow-model@NAME and print a ready curl."""
    from mlflow_stack.actions import serve as serving
    from mlflow_stack.actions.remote import ActionError, Layout

    if not stop and bool(run) == bool(model):
        raise cli.fail("give exactly one of --run RUN_ID or --model models:/NAME@ALIAS")
    port = cli.positive_int(port, "--port", 1024, 65535)
    workers = cli.positive_int(workers, "--workers", 0, 16)
    resolved, h = cli.first_host(host, inventory)
    try:
        if stop:
            done = serving.stop(h, name)
            print(f"{'stopped' if done else 'nothing to stop:'} mlflow-model@{name} on {h.name}")
            return
        req = serving.ServeRequest(name, run or model, port, workers)
        result = serving.serve(h, Layout.of(resolved), req, resolved.vars)
    except ActionError as exc:
        raise cli.fail(str(exc)) from None
    finally:
        h.close()
    state = "started/updated" if result.changed else "already serving (no change)"
    print(f"mlflow-model@{name} on {h.name}: {state} in {result.seconds:.1f}s")
    print(f"model: {result.uri}" + (f" (version {result.version})" if result.version else ""))
    print(f"url:   {result.url}  (on the host; `invoke tunnel` forwards it)")
    print(serving.curl_example(port))


@task(
    help={
        "name": "served instance (default: wine)",
        "port": "port of the model server (default: the instance's)",
        "data": "a JSON payload file (sent as is) or a CSV of wines (default: the sample wine)",
        "host": "host (default: the 'server' group)",
        "inventory": "inventory file",
    }
)
def predict(c, name="wine", port=None, data=None, host=None, inventory=None):
    """Score the sample wine (or --data) against a served model and print the prediction."""
    from mlflow_stack.actions import predict as scoring
    from mlflow_stack.actions import serve as serving
    from mlflow_stack.actions.remote import ActionError

    try:
        payload = scoring.load_payload(data)  # bad input fails before anything connects
    except ActionError as exc:
        raise cli.fail(str(exc), code=2) from None
    _, h = cli.first_host(host, inventory)
    try:
        if port is None:
            port = serving.served(h).get(name)
            if port is None:
                raise ActionError(
                    f"no served model named {name!r} on {h.name}; start one with invoke serve"
                )
        predictions = scoring.predict(h, int(port), payload)
    except ActionError as exc:
        raise cli.fail(str(exc)) from None
    finally:
        h.close()
    for value in predictions:
        print(f"{value:.4f}")


@task(
    name="check-mysql",
    help={"host": "host (default: the 'server' group)", "inventory": "inventory file"},
)
def check_mysql(c, host=None, inventory=None):
    """Check the MLflow database: service, root socket, utf8mb4, tables, schema, client login."""
    from mlflow_stack.actions import check_mysql as checking
    from mlflow_stack.actions.remote import Layout

    resolved, h = cli.first_host(host, inventory)
    try:
        checks, counts = checking.check_mysql(h, Layout.of(resolved), resolved.vars.mysql.port)
    finally:
        h.close()
    print(checking.render_table(checks, counts))
    failed = [chk for chk in checks if not chk.ok]
    if failed:
        first = failed[0]
        raise cli.fail(f"{h.name}: {first.name}: {first.detail}; hint: {first.hint}")


@task(help={"host": "host (default: the 'server' group)", "inventory": "inventory file"})
def status(c, host=None, inventory=None):
    """Show every unit (database, MLflow, Jupyter, served models): state, health, version."""
    from mlflow_stack.actions import status as statuses
    from mlflow_stack.actions.remote import Layout

    resolved, h = cli.first_host(host, inventory)
    try:
        rows = statuses.gather(h, Layout.of(resolved))
    finally:
        h.close()
    print(statuses.render_status(h.name, rows))
    if not all(r.ok for r in rows):
        raise cli.fail(
            f"{h.name}: " + ", ".join(f"{r.unit} {r.state}/{r.health}" for r in rows if not r.ok)
        )


@task(
    help={
        "reveal": "print the Jupyter token itself (it is a secret: mind your terminal)",
        "host": "host (default: the 'server' group)",
        "inventory": "inventory file",
    }
)
def urls(c, reveal=False, host=None, inventory=None):
    """Print the MLflow and Jupyter URLs and how to log in."""
    from mlflow_stack.actions import status as statuses
    from mlflow_stack.actions.remote import ActionError, Layout, read_secret

    resolved, h = cli.first_host(host, inventory)
    v = resolved.vars
    try:
        address = resolved.target.address
        if v.mlflow.public or v.jupyter.public:
            address = statuses.public_address(h, address)
        token = None
        if reveal and v.jupyter.auth == "token":
            token = read_secret(h, "jupyter_token").reveal()
    except ActionError as exc:
        raise cli.fail(str(exc)) from None
    finally:
        h.close()
    print("\n".join(statuses.urls(Layout.of(resolved), v, address, token, reveal)))


@task(
    help={
        "mysql": "also forward the database port (for admin tools)",
        "offset": "add this to each local port (e.g. 10000: 5000 → 15000)",
        "host": "host (default: the 'server' group)",
        "inventory": "inventory file",
    }
)
def tunnel(c, mysql=False, offset=0, host=None, inventory=None):
    """Forward MLflow, Jupyter and served-model ports over SSH until Ctrl-C."""
    import threading

    from mlflow_stack.actions import serve as serving
    from mlflow_stack.actions import tunnel as tunnels
    from mlflow_stack.engine.host import HostError

    offset = cli.positive_int(offset, "--offset", 0, 60000)
    resolved, h = cli.first_host(host, inventory)
    v = resolved.vars
    ports = [v.mlflow.port, v.jupyter.port]
    ports += sorted(serving.served(h).values())
    if mysql:
        ports.append(v.mysql.port)
    pairs = tunnels.forwards(ports, offset)
    too_high = [local for local, _ in pairs if local > 65535]
    if too_high:
        h.close()
        raise cli.fail(f"--offset {offset}: local port {too_high[0]} is above 65535")
    try:
        with tunnels.tunnel(h, pairs):
            for local, remote in pairs:
                print(f"127.0.0.1:{local} -> {h.name}:127.0.0.1:{remote}", flush=True)
            print("forwarding; Ctrl-C to stop", flush=True)
            threading.Event().wait()
    except HostError as exc:
        raise cli.fail(str(exc)) from None
    except KeyboardInterrupt:
        print("tunnel closed")
    finally:
        h.close()


@task(
    help={
        "alpha": "regularisation strength (>= 0; default 0.5)",
        "l1_ratio": "balance between L1 and L2 penalties, in [0, 1] (default 0.1)",
        "experiment": "MLflow experiment name (default: wine)",
        "no_artifacts": "skip plots and tables (faster)",
        "quiet": "print only the result, not the training output",
        "host": "host (default: the 'server' group)",
        "inventory": "inventory file",
    }
)
def train(
    c,
    alpha="0.5",
    l1_ratio="0.1",
    experiment="wine",
    no_artifacts=False,
    quiet=False,
    host=None,
    inventory=None,
):
    """Train the wine model once on the host, tracked in MLflow; print run id and metrics."""
    from mlflow_stack.actions import train as training
    from mlflow_stack.actions.remote import ActionError, Layout

    try:
        a = training.parse_float("--alpha", alpha, 0.0)
        l1 = training.parse_float("--l1-ratio", l1_ratio, 0.0, 1.0)
    except ActionError as exc:
        raise cli.fail(str(exc), code=2) from None
    resolved, h = cli.first_host(host, inventory)
    layout = Layout.of(resolved)
    printer = (lambda line: None) if quiet else (lambda line: print(f"  | {line}", flush=True))
    try:
        result = training.train(h, layout, a, l1, experiment, printer, not no_artifacts)
    except ActionError as exc:
        raise cli.fail(str(exc)) from None
    finally:
        h.close()
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result["metrics"].items()))
    print(f"run {result['run_id']}  {metrics}")
    print(f"model: {result.get('model_uri', '-')}")
    print(f"view:  {training.run_url(layout, result)}  (through `invoke tunnel`)")


@task(
    help={
        "n_trials": "trials in all (default 100)",
        "study": "Optuna study name (default: a new one per run when shared)",
        "hosts": "comma-separated hosts that tune (default: the server)",
        "group": "or every host of this inventory group, e.g. workers (the server joins too)",
        "jobs_per_host": "tuning processes per host (default 1; >1 shares one study)",
        "experiment": "MLflow experiment (default: wine-tuning)",
        "quiet": "print only the result, not the tuning output",
        "inventory": "inventory file",
    }
)
def tune(
    c,
    n_trials="100",
    study=None,
    hosts=None,
    group=None,
    jobs_per_host="1",
    experiment="wine-tuning",
    quiet=False,
    inventory=None,
):
    """Optuna search, every trial an MLflow run; the best model registered as champion."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mlflow_stack.actions import tune as tuning
    from mlflow_stack.actions.remote import ActionError
    from mlflow_stack.inventory import InventoryError, resolve

    total = cli.positive_int(n_trials, "--n-trials", 1, 1_000_000)
    per_host = cli.positive_int(jobs_per_host, "--jobs-per-host", 1, 64)
    if hosts and group:
        raise cli.fail("give --hosts or --group, not both")
    inv, servers = cli.select_hosts(None, inventory)
    server = servers[0]
    try:
        chosen = resolve(hosts or group, inv) if (hosts or group) else [server]
    except InventoryError as exc:
        raise cli.fail(str(exc)) from None
    if group and server.name not in [h.name for h in chosen]:
        chosen = [server, *chosen]
    shared = len(chosen) * per_host > 1
    study = study or (f"wine-{time.strftime('%Y%m%d-%H%M%S')}" if shared else "wine-elasticnet")
    with ThreadPoolExecutor(max_workers=len(chosen) + 1) as pool:
        connections = dict(
            zip(
                [h.name for h in [server, *chosen]],
                pool.map(cli.connect, [server, *chosen]),
                strict=True,
            )
        )
    printer = (
        (lambda who, line: None)
        if quiet
        else (lambda who, line: print(f"  {who} | {line}", flush=True))
    )
    try:
        outcome = tuning.tune(
            server, chosen, connections, total, study, experiment, per_host, printer
        )
    except ActionError as exc:
        raise cli.fail(str(exc)) from None
    finally:
        for h in connections.values():
            h.close()
    final = outcome.final
    print(
        f"study {outcome.study}: {sum(outcome.trials_per_host.values())} trials in "
        f"{outcome.seconds:.1f}s  ("
        + ", ".join(f"{k}: {v}" for k, v in outcome.trials_per_host.items())
        + ")"
    )
    params = ", ".join(f"{k}={v:.4g}" for k, v in (final.get("best_params") or {}).items())
    print(
        f"best: {params}  val_rmse={final.get('best_value', float('nan')):.4f}  "
        f"run {final.get('best_run_id')}"
    )
    version = final.get("registered_version")
    print(
        f"champion: models:/wine-elasticnet@champion -> version {version}"
        if version
        else "champion: not changed (the best trial was registered before)"
    )
    for failure in outcome.failures:
        print(f"warning: {failure}")


@task(
    help={
        "fresh": "start from a new sandbox (stops and removes the current one)",
        "keep": "keep the sandbox running afterwards (default; --no-keep stops it)",
        "trials": "tuning trials (default 300)",
        "host": "inventory host to run it on (default: sandbox, started if needed)",
        "port": "port of the served champion (default: 54321)",
        "inventory": "inventory file",
    }
)
def demo(c, fresh=False, keep=True, trials="300", host="sandbox", port=54321, inventory=None):
    """The whole walkthrough on the local sandbox: provision, train, tune, serve, predict, check."""
    from mlflow_stack import demo as walkthrough

    n = cli.positive_int(trials, "--trials", 1, 100_000)
    inv = cli.load_inventory(inventory)
    try:
        walkthrough.run_demo(
            inv,
            fresh=fresh,
            trials=n,
            host_name=host,
            serve_port=cli.positive_int(port, "--port", 1024, 65535),
        )
    except walkthrough.DemoError as exc:
        raise cli.fail(str(exc)) from None
    except Exception as exc:  # sandbox and SSH errors carry one-line messages
        if type(exc).__name__ in ("SandboxError", "HostError", "InventoryError"):
            raise cli.fail(str(exc)) from None
        raise
    finally:
        name = walkthrough.sandbox_of(inv, host)
        if not keep and name:
            from mlflow_stack import sandbox

            sandbox.down(name)
            print(f"sandbox {name} stopped (--no-keep)")


ns = Collection(demo, provision, train, tune, serve, predict, check_mysql, status, urls, tunnel)
try:
    from mlflow_stack import sandbox_tasks
except ImportError:  # the sandbox module is optional on machines that only provision
    sandbox_tasks = None
if sandbox_tasks is not None:
    ns.add_collection(sandbox_tasks.ns)
