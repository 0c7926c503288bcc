"""The prefetch: last run's fact plan probed early; values always read in this run."""

from __future__ import annotations

import json
import os

import pytest

from mlflow_stack.engine import facts as F
from mlflow_stack.engine import probing
from mlflow_stack.engine.report import Reporter, Status
from mlflow_stack.engine.runner import HostJob, Options, Role, converge_host
from mlflow_stack.engine.steps import Run
from tests.unit.test_runner import LocalHost


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_known_facts_are_parsed_and_only_the_rest_probed():
    host = LocalHost()
    hello, other = F.Shell("hello", "echo hello"), F.Shell("other", "echo other")
    known = {hello.key: (hello.command(), "from before\n", 0)}
    values = probing.probe(host, [hello, other], known)
    assert values[hello.key].output.strip() == "from before"
    assert values[other.key].output.strip() == "other"
    assert host.commands == 1
    assert probing.probe(host, [hello], known) and host.commands == 1  # nothing left to probe


def test_a_known_fact_read_by_another_command_is_probed_again():
    host = LocalHost()
    fact = F.Shell("greeting", "echo new")
    known = {fact.key: ("echo old", "old\n", 0)}
    assert probing.probe(host, [fact], known)[fact.key].output.strip() == "new"
    assert host.commands == 1


def test_no_plan_no_prefetch_and_a_broken_plan_is_no_plan(tmp_path):
    host = LocalHost()
    path = probing.plan_path(host, ("a",))
    prefetch = probing.Prefetch(host, path)
    assert prefetch.result() == {} and host.commands == 0
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert probing.load_plan(path) == []


def test_a_plan_is_private_keeps_keys_only_and_is_saved_only_when_it_changes(tmp_path):
    host = LocalHost()
    path = probing.plan_path(host, ("a", "b"))
    assert path != probing.plan_path(host, ("a",))
    (tmp_path / "one").write_text("1")
    one, two = F.PathState(str(tmp_path / "one")), F.PathState(str(tmp_path / "two"))
    facts = [one, one, two, F.Shell("adhoc", "echo 2")]
    probing.save_plan(path, facts)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    # keys only (no command text), and an ad-hoc Shell snippet not at all
    assert json.loads(path.read_text()) == {"version": 2, "facts": [one.key, two.key]}
    prefetch = probing.Prefetch(host, path)
    known = prefetch.result()
    assert set(known) == {one.key, two.key}
    assert known[one.key][0] == one.command()  # the command this code builds
    assert one.parse(*known[one.key][1:]).size == 1 and known[two.key][1] == ""
    before = path.stat().st_mtime_ns
    prefetch.remember(facts)
    assert path.stat().st_mtime_ns == before
    prefetch.remember(facts[:1])
    assert len(probing.load_plan(path)) == 1


CANARY_PAYLOADS = [
    "touch {canary}",
    "x; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "'; touch {canary}; '",
    "a\ntouch {canary}",
]


def test_a_tampered_plan_runs_nothing_it_added(tmp_path):
    host = LocalHost()
    path = probing.plan_path(host, ("r",))
    canary = tmp_path / "canary"
    good = F.PathState(str(tmp_path))
    payloads = [c.format(canary=canary) for c in CANARY_PAYLOADS]
    keys = [good.key, "os:"]
    keys += [f"shell:{p}" for p in payloads]  # ad-hoc snippets are never rebuilt
    keys += [f"path:{p}" for p in payloads]  # hostile arguments: refused
    keys += [f"unit:{p}" for p in payloads] + [f"user:{p}" for p in payloads]
    keys += [f"packages:{p}" for p in payloads] + [f"env-stamp:{p}" for p in payloads]
    keys += ["http:http://169.254.169.254/latest/meta-data/", f"nosuchkind:{payloads[0]}", 7]
    keys += [f'env-stamp:["/opt/x","$(touch {canary})"]']
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": 2, "facts": keys}))
    path.chmod(0o600)
    ran: list[str] = []
    original = host.run
    host.run = lambda script, **kw: ran.append(kw.get("stdin") or script) or original(script, **kw)
    planned = probing.Prefetch(host, path).planned
    assert [f.key for f in planned] == [good.key, "os:"]
    probing.Prefetch(host, path).result()
    assert not canary.exists()
    assert all(str(canary) not in script for script in ran)
    # the plan format that kept command text is not read at all
    path.write_text(json.dumps({"facts": [[good.key, f"touch {canary}"], ["os:", "true"]]}))
    assert probing.load_plan(path) == []
    assert not canary.exists()


def test_a_plan_in_a_directory_others_can_write_is_not_used(tmp_path, capsys):
    host = LocalHost()
    path = probing.plan_path(host, ("r",))
    fact = F.PathState(str(tmp_path))
    probing.save_plan(path, [fact])
    assert probing.load_plan(path) == [fact]
    path.parent.chmod(0o777)
    assert probing.load_plan(path) == []  # ignored, with a warning
    assert "writable by others (mode 0777): not used" in capsys.readouterr().err
    probing.save_plan(path, [fact, F.OsRelease()])  # and not written either
    path.parent.chmod(0o700)
    assert probing.load_plan(path) == [fact]
    path.chmod(0o666)
    assert probing.load_plan(path) == []  # the file itself too
    path.chmod(0o600)
    path.parent.parent.chmod(0o775)  # mlflow-stack/ itself
    assert probing.load_plan(path) == []
    path.parent.parent.chmod(0o700)
    target = tmp_path / "elsewhere.json"
    target.write_text(path.read_text())
    path.unlink()
    path.symlink_to(target)  # a link planted in its place
    assert probing.load_plan(path) == []


def test_only_the_newest_plans_are_kept(monkeypatch):
    monkeypatch.setattr(probing, "KEEP_PLANS", 2)
    paths = [probing.plan_path(LocalHost(), (f"r{i}",)) for i in range(3)]
    for index, path in enumerate(paths):
        probing.save_plan(path, [F.Shell("x", "true")])
        os.utime(path, (index, index))
    assert sorted(p.name for p in paths[0].parent.glob("*.json")) == sorted(
        p.name for p in paths[1:]
    )


def test_a_prefetch_error_is_raised_by_the_run():
    class Unreachable(LocalHost):
        def run(self, script, **kwargs):
            raise probing.HostError("local: cannot reach it")

    host = Unreachable()
    path = probing.plan_path(host, ("r",))
    probing.save_plan(path, [F.Shell("x", "true")])
    job = HostJob(host, [], None, probing.Prefetch(host, path))
    recap = converge_host(job, Options(), Reporter(json_mode=True))
    assert recap.error == "local: cannot reach it"


def converge(host: LocalHost, marker) -> tuple[list, int]:
    """One run of a role that creates `marker` when it is missing, with a prefetch."""
    exists = F.PathState(str(marker))
    role = Role(
        "r", lambda ctx: [Run("create", f"touch {marker}", lambda c: c[exists] is None, (exists,))]
    )
    before = host.commands
    prefetch = probing.Prefetch(host, probing.plan_path(host, ("r",)))
    recap = converge_host(
        HostJob(host, [role], None, prefetch), Options(), Reporter(json_mode=True)
    )
    assert not recap.failed, recap
    return [r.status for r in recap.results], host.commands - before


def test_a_no_op_is_one_probe_and_a_change_behind_our_back_is_still_seen(tmp_path):
    host, marker = LocalHost(), tmp_path / "marker"
    assert converge(host, marker) == ([Status.CHANGED], 3)  # base probe, facts probe, touch
    assert converge(host, marker) == ([Status.OK], 1)  # the prefetch answers both probes
    marker.unlink()  # the host changes between runs
    assert converge(host, marker) == ([Status.CHANGED], 2)  # read fresh: seen and fixed
    assert marker.exists()


def test_an_adhoc_shell_fact_is_read_after_the_build_not_prefetched(tmp_path):
    host = LocalHost()
    exists = F.Shell("marker", f"test -e {tmp_path}/m")
    role = Role("r", lambda ctx: [Run("create", "true", lambda c: False, (exists,))])

    def once() -> int:
        before = host.commands
        prefetch = probing.Prefetch(host, probing.plan_path(host, ("r",)))
        converge_host(HostJob(host, [role], None, prefetch), Options(), Reporter(json_mode=True))
        return host.commands - before

    assert once() == 2 and once() == 2  # base facts (prefetched), then the snippet


def test_batched_path_facts_read_as_one_fact_each_would(tmp_path):
    (tmp_path / "file").write_text("data\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "odd | name").write_text("x")
    names = ["file", "empty", "dir", "link", "odd | name", "missing", "back\\slash"]
    facts = [F.PathState(str(tmp_path / n)) for n in names]
    host = LocalHost()
    batched = probing.probe(host, facts)
    assert host.commands == 1
    one_by_one = {f.key: f.parse(*run_alone(host, f)) for f in facts}
    assert batched == one_by_one
    assert batched[facts[0].key].sha256 and batched[facts[5].key] is None
    assert batched[facts[3].key].kind == "link" and batched[facts[3].key].sha256 is None


def run_alone(host: LocalHost, fact: F.Fact) -> tuple[str, int]:
    result = host.run(fact.command())
    return result.stdout, result.rc


def test_only_standard_path_facts_join_the_batch():
    path = "/etc/hostname"
    assert probing._batched_path(f"path:{path}", F.PathState(path).command()) == path
    assert probing._batched_path(f"path:{path}", "stat something else") is None
    assert probing._batched_path("path:/a\nb", F.PathState("/a\nb").command()) is None
    assert probing._batched_path("shell:x", "true") is None
