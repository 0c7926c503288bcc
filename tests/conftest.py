"""Suite-wide rules: under CI a skipped test is a failure; elsewhere skips are reported loudly.
The suite runs in two processes (pytest-xdist, `--dist loadgroup`).

CI runs `.ci/run` with `CI=true`; `MLFLOW_STACK_NO_SKIP=1` asks for the same anywhere. Then a
test that would skip (no sandbox host on this machine, a missing library) fails instead, with
its skip reason, so the suite cannot go green by skipping.

Processes: every test on the session's sandbox (the `sandbox` fixture, so `stack` too) runs
in one process, in collection order (tests that reboot it last), except the modules marked
SECOND_STACK, which run on a sandbox and stack of their own in the other process; every other
module goes whole to one process, so its module fixtures are made once. The two sandbox
chains, the longest, are handed out first, then the other e2e modules, then the fast tier
(`--no-loadscope-reorder` keeps this order). `-n 0` runs it all in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

STRICT_ENV = ("CI", "MLFLOW_STACK_NO_SKIP")
E2E = Path(__file__).parent / "e2e"
SANDBOX_GROUP = "session-sandbox"
# Modules marked with this group run on a session sandbox (and stack) of their own, in the
# other process, beside the first chain: the long chain is split in two.
SECOND_STACK = pytest.mark.xdist_group("second-stack")
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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test's process group, and the order the groups are handed out in."""

    def rank(item: pytest.Item) -> tuple[int, bool]:
        e2e = E2E in Path(str(item.path)).parents
        restart = item.get_closest_marker("host_restart") is not None
        return (0 if "sandbox" in item.fixturenames else 1 if e2e else 2), restart

    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue  # a module that asks for a stack of its own (SECOND_STACK)
        on_sandbox = "sandbox" in item.fixturenames
        module = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(SANDBOX_GROUP if on_sandbox else module))
    items.sort(key=rank)  # stable: collection order within a rank


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
