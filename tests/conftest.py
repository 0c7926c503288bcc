"""Suite-wide rules: under CI a skipped test is a failure; elsewhere skips are reported loudly.
The suite runs in two processes (pytest-xdist), in chains.

CI runs `.ci/run` with `CI=true`; `MLFLOW_STACK_NO_SKIP=1` asks for the same anywhere. Then a
test that would skip (no sandbox host on this machine, a missing library) fails instead, with
its skip reason, so the suite cannot go green by skipping.

Processes: the modules on the session's sandbox (the `sandbox` fixture, so `stack` too) run as
one chain in one process, in collection order (tests that reboot it last); those of
SECOND_CHAIN as another, on a sandbox and stack of their own, in the other process; every
other module goes whole to one process (its module fixtures are made once). The two chains,
the longest, are handed out first, then the other e2e modules, then the fast tier. A module
that uses the session sandbox without being in a chain is a collection error (it would make
a stack of its own). `-n 0` runs everything in one process, in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

STRICT_ENV = ("CI", "MLFLOW_STACK_NO_SKIP")
E2E = Path(__file__).parent / "e2e"
SANDBOX_CHAIN = tuple(
    f"tests/e2e/test_{name}.py"
    for name in (
        "actions_e2e", "demo_e2e", "engine_e2e", "faults_e2e", "least_privilege_e2e",
        "multihost_e2e", "sandbox", "stack_e2e", "walkthrough_e2e", "wire_trust_e2e",
    )
)  # fmt: skip
SECOND_CHAIN = ("tests/e2e/test_backup_e2e.py", "tests/e2e/test_public_https_e2e.py")
_e2e_ran = False  # set on the controller as reports arrive


def strict() -> bool:
    """True when skips must fail (CI, or asked for)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in STRICT_ENV
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and strict() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and skips are failures under CI=true: {reason}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped and not strict():
        terminalreporter.write_sep(
            "!", f"{len(skipped)} test(s) SKIPPED: this run proves less than CI's", red=True
        )


def chain_of(nodeid: str) -> str:
    """The process chain a test belongs to: a sandbox chain, else its module."""
    module = nodeid.split("::", 1)[0]
    if module in SANDBOX_CHAIN:
        return "sandbox chain"
    if module in SECOND_CHAIN:
        return "second sandbox chain"
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order chains are handed out in (and run in with `-n 0`)."""

    def rank(item: pytest.Item) -> int:
        if chain_of(item.nodeid) != item.nodeid.split("::", 1)[0]:
            return 0
        return 1 if E2E in Path(str(item.path)).parents else 2

    for item in items:
        if "sandbox" in item.fixturenames and rank(item) != 0:
            raise pytest.UsageError(
                f"{item.nodeid} uses the session sandbox: add its module to SANDBOX_CHAIN or "
                "SECOND_CHAIN in tests/conftest.py"
            )
    items.sort(key=rank)  # stable: collection order within a rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole chains to one process each, in the order above (pytest 9.2 ignores xdist's own
    `xdist_group` marks: they rewrite a node id pytest no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class Chains(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return chain_of(nodeid)

    return Chains(config, log)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _e2e_ran
    if report.nodeid.startswith("tests/e2e/"):
        _e2e_ran = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Once every sandbox of the run is gone, the private network must be gone too."""
    if hasattr(session.config, "workerinput") or not _e2e_ran:
        return  # a worker (the controller checks, after all of them), or no sandbox ran
    from tests.e2e.conftest import network_left_behind

    left = network_left_behind()
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED after the last sandbox went: network left behind: {left}", red=True
            )
