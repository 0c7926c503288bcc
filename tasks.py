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
    import roles as role_registry
    from mlflow_stack.engine.host import Host
    from mlflow_stack.engine.report import Reporter
    from mlflow_stack.engine.runner import HostJob, Options, converge

    wanted = cli.parse_roles(roles)
    _, hosts = cli.select_hosts(host, inventory)
    jobs = [
        HostJob(Host(h.target), role_registry.ordered(wanted or h.roles), h.vars) for h in hosts
    ]
    reporter = Reporter(json_mode=json, check=check)
    try:
        recaps = converge(jobs, Options(check=check, diff=diff), reporter)
    finally:
        for job in jobs:
            job.host.close()
    failed = [r for r in recaps if r.failed]
    if failed:
        first = failed[0]
        reason = first.error or next(
            (f"{s.role}: {s.step}: {s.summary}" for s in first.results if s.status == "failed"), ""
        )
        raise cli.fail(f"{first.host}: {reason}" if not first.error else reason)


ns = Collection(provision)
try:
    from mlflow_stack import sandbox_tasks
except ImportError:  # the sandbox module is optional on machines that only provision
    sandbox_tasks = None
if sandbox_tasks is not None:
    ns.add_collection(sandbox_tasks.ns)
