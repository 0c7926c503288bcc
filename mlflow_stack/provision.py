"""`invoke provision`: converge hosts with their roles, SSH and the facts probe started first.

The roles come from a catalog the caller passes (tasks.py hands in `roles.ordered`), so this
layer never imports the roles package: the SSH handshakes and the probe of the facts the last
run read start before the roles are imported and their steps built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlflow_stack import role_facts
from mlflow_stack.engine.host import Host
from mlflow_stack.engine.probing import Prefetch, plan_path
from mlflow_stack.engine.report import HostRecap, Reporter
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.runner import HostJob, Options, converge
from mlflow_stack.targets import ResolvedHost

RoleCatalog = Callable[[Sequence[str]], list[Role]]


def provision(
    hosts: list[ResolvedHost],
    catalog: RoleCatalog,
    reporter: Reporter,
    *,
    roles: Sequence[str] | None = None,
    options: Options | None = None,
) -> list[HostRecap]:
    """Converge `hosts` with `roles` (default: each host's own) in parallel; their recaps."""
    assert role_facts.KINDS  # the roles' fact kinds are known before plans are rebuilt
    links = [Host(h.target) for h in hosts]
    for link in links:
        link.connect_soon()  # SSH handshakes overlap the imports below
    prefetches = [
        Prefetch(link, plan_path(link, roles or h.roles))
        for link, h in zip(links, hosts, strict=True)
    ]
    try:
        jobs = [
            HostJob(
                link,
                catalog(roles or h.roles),
                h.vars,
                prefetch,
                private_address=h.peer_address,
                workers=h.workers,
            )
            for link, h, prefetch in zip(links, hosts, prefetches, strict=True)
        ]
        return converge(jobs, options or Options(), reporter)
    finally:
        for link in links:
            link.close()


def first_failure(recaps: list[HostRecap]) -> str | None:
    """One line naming the first host's failure, or None when every host converged."""
    return next((f for f in (r.failure() for r in recaps) if f), None)
