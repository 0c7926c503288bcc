"""Least privilege on the host, proved by attacks: whatever runs as `demo` (notebooks, runs,
served models) or as `mlflow` (the tracking server) cannot make root write, chown, show or
delete files of its choosing, cannot read a secret or get a database credential beyond the
tuning account's, cannot plant bytecode root runs, and cannot log in over SSH.

Each attack runs on the session's provisioned stack, as the account itself, while root
provisions; the canary is a root-owned file the attacks aim root at.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pymysql
import pytest

from mlflow_stack import layout
from tests.e2e.helpers import (
    ROOT,
    exposure,
    host,
    invoke,
    ok,
    provision_json,
    sh,
    wait_until,
)

pytestmark = pytest.mark.e2e
CANARY = "/etc/e2e-canary"
CANARY_TEXT = "root's canary, not to be read, chowned or deleted\n"

# Where root writes for each account's services (root-owned now), and the account's own area.
TREES = {
    "demo": [
        layout.DEMO_ROOT,
        layout.DEMO_CODE,
        f"{layout.DEMO_CODE}/notebooks",
        f"{layout.DEMO_CODE}/data",
        layout.JUPYTER_CONF_DIR,
        layout.MODELS_CONF_DIR,
        layout.HOSTSIDE_DIR,
        layout.DEMO_STATE,
        layout.DEMO_WORKSPACE,
    ],
    "mlflow": [
        layout.MLFLOW_HOME,
        layout.MLFLOW_CONF_DIR,
        layout.MLFLOW_PYCACHE,
        layout.MLFLOW_STATE,
        layout.MLFLOW_ARTIFACTS,
    ],
}
AREAS = {"demo": layout.DEMO_STATE, "mlflow": layout.MLFLOW_STATE}


def attack_script(account: str) -> str:
    """Run as `account`, forever: every temp file root might be writing in the trees becomes
    a symlink to the canary, and symlinks to the canary are planted where root would write,
    prune or show a diff. What it managed is logged in the account's own area."""
    log = f"{AREAS[account]}/attack.log"
    dirs = " ".join(TREES[account])
    return (
        f": > {log}; n=0; while :; do n=$((n + 1)); for d in {dirs}; do "
        'for f in "$d"/.mlflow-stack.* "$d"/.download.* "$d"/.*.ipynb.*; do '
        '[ -e "$f" ] || continue; '
        f'if rm -f "$f" 2>/dev/null && ln -s {CANARY} "$f" 2>/dev/null; then '
        f'echo "swapped $f" >> {log}; fi; done; '
        f"for name in README setenv.sh extra.py e2e-planted.py server.py mlflow.env; do "
        f'if ln -s {CANARY} "$d/$name" 2>/dev/null; then echo "planted $d/$name" >> {log}; '
        "fi; done; done; "
        f'echo "$n" > {AREAS[account]}/attack.count; done'
    )


def canary_state(h) -> str:
    return sh(h, f"stat -c '%U:%G %a %s' {CANARY}; sha256sum < {CANARY}")


@pytest.fixture
def canary(stack):
    h = host(stack.info)
    sh(h, f"printf %s {CANARY_TEXT!r} > {CANARY} && chmod 600 {CANARY}")
    before = canary_state(h)
    try:
        yield h, before
    finally:
        sh(h, f"rm -f {CANARY}")
        h.close()


def start_attacks(h, accounts) -> None:
    for account in accounts:
        script = attack_script(account)
        sh(h, f"systemd-run --quiet --collect --unit=e2e-attack-{account} "
              f"--uid={account} --gid={account} sh -c {shq(script)}")  # fmt: skip


def stop_attacks(h, accounts) -> dict[str, tuple[int, str]]:
    """Stop the loops; per account, (rounds done, what it managed)."""
    out = {}
    for account in accounts:
        h.run(f"systemctl stop e2e-attack-{account}")
        area = AREAS[account]
        rounds = int(sh(h, f"cat {area}/attack.count 2>/dev/null || echo 0").strip() or 0)
        out[account] = (rounds, sh(h, f"cat {area}/attack.log 2>/dev/null || true"))
    return out


def shq(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_symlink_swaps_never_reach_what_root_writes_prunes_or_shows(stack, canary, tmp_path):
    """The attack that handed /etc/passwd to `demo` through a routine provision (root's temp
    file swapped for a symlink, then chowned), and /etc/shadow to the operator's --diff."""
    h, before = canary
    accounts = ("demo", "mlflow")
    touched = {  # files root will rewrite, prune or diff, changed behind its back
        f"{layout.DEMO_ROOT}/README": "append",
        f"{layout.DEMO_CODE}/model.py": "append",
        layout.JUPYTER_CONFIG: "append",
        layout.MLFLOW_LAUNCHER: "append",
        layout.MLFLOW_ENV_FILE: "append",
        f"{layout.DEMO_CODE}/extra.py": "create",  # pruned
    }
    start_attacks(h, accounts)
    try:
        time.sleep(1)  # the loops are running
        for path, how in touched.items():
            sh(h, f"echo '# changed' >> {path}" if how == "append" else f"echo x > {path}")
        code, _, proc = provision_json(stack.inv)
        assert code == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        for path, how in touched.items():
            if how == "append":
                sh(h, f"echo '# changed again' >> {path}")
        checked = invoke("provision", "--check", "--diff", "--inventory", str(stack.inv))
        assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
        assert "# changed again" in checked.stdout  # --diff really read the files
        final = ok(invoke("provision", "--inventory", str(stack.inv)))
    finally:
        results = stop_attacks(h, accounts)
    for account, (rounds, log) in results.items():
        assert rounds > 5, f"the {account} loop did not run"
        for line in log.splitlines():  # only in its own area did anything work
            assert line.split()[1].startswith(AREAS[account] + "/"), (account, line)
    assert canary_state(h) == before  # owner, group, mode, size, content
    for output in (proc.stdout, proc.stderr, checked.stdout, checked.stderr, final):
        assert CANARY_TEXT.strip() not in output
    assert sh(h, f"test -e {layout.DEMO_CODE}/extra.py || echo pruned").strip() == "pruned"
    assert "all healthy" in ok(invoke("status", "--inventory", str(stack.inv)))


def secret(h, name: str) -> str:
    return sh(h, f"cat {layout.secret_path(name)}").strip()


def readable_files_holding(h, account: str, values: list[str]) -> list[str]:
    """Every file `account` can read (outside /proc, /sys, /dev) that holds one of `values`
    (plain, URL-encoded or JSON-escaped); the patterns reach grep on a descriptor root opens."""
    forms = {f for v in values for f in (v, quote(v, safe=""), v.replace('"', '\\"'))}
    sh(h, "install -m 600 /dev/null /root/e2e-patterns && cat > /root/e2e-patterns",
       stdin="\n".join(forms) + "\n")  # fmt: skip
    try:
        found = h.run(
            f"runuser -u {account} -- sh -c 'find / -xdev \\( -path /proc -o -path /sys -o "
            "-path /dev -o -path /run \\) -prune -o -type f -readable -size -20M -print0 "
            "2>/dev/null | xargs -0 -r grep -l -F -f /dev/fd/3 2>/dev/null' 3</root/e2e-patterns",
            timeout=600,
        )
        return found.stdout.split()
    finally:
        sh(h, "rm -f /root/e2e-patterns")


def test_no_secret_and_no_database_credential_reaches_demo_or_mlflow(stack):
    h = host(stack.info)
    try:
        db, tuning, token = (
            secret(h, "db_password"),
            secret(h, "db_tuning_password"),
            secret(h, "jupyter_token"),
        )
        for account in ("demo", "mlflow"):
            for name in sh(h, f"ls {layout.SECRETS_DIR}").split():
                read = h.run(f"runuser -u {account} -- cat {layout.secret_path(name)}")
                assert not read.ok and "Permission denied" in read.stderr, (account, name)
        # demo's own token is in the Jupyter config it runs with; nothing else of ours
        assert readable_files_holding(h, "demo", [db, tuning]) == []
        # mlflow reads its own database credential in its env file, nothing else of ours
        found = readable_files_holding(h, "mlflow", [tuning, token])
        assert found == [], found
        # During a shared tune, every process environment demo can read: the tuning account's
        # storage URL (its own processes') and never the tracking database's credential.
        proc = subprocess.Popen(
            [ROOT / ".venv/bin/python", "-m", "invoke", "tune", "--n-trials", "60",
             "--jobs-per-host", "2", "--quiet", "--inventory", str(stack.inv)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            scan = (
                "runuser -u demo -- sh -c 'for e in /proc/[0-9]*/environ; do "
                '{ tr "\\0" "\\n" < "$e"; } 2>/dev/null; done; true\''
            )

            def tuning_environ() -> str:
                text = sh(h, scan)
                return text if "DEMO_WINE_STORAGE=" in text else ""

            environ = wait_until(tuning_environ, 300, "a tuning process")
        finally:
            out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
        assert quote(tuning, safe="") in environ  # the scan sees what it may
        assert db not in environ and quote(db, safe="") not in environ
        assert "DEMO_WINE_MLFLOW_DB" not in environ
        assert re.search(r"trial runs recorded via: e2e#0 service, e2e#1 service", out), out
    finally:
        h.close()
    # The only credential demo can get (the tuning account's) opens Optuna's database alone.
    for user in ("mlflow", "root"):
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(host="127.0.0.1", port=stack.db_port, user=user, password=tuning)
    conn = pymysql.connect(host="127.0.0.1", port=stack.db_port, user="optuna", password=tuning)
    with conn.cursor() as cur:
        cur.execute("SHOW DATABASES")
        assert {r[0] for r in cur.fetchall()} == {"information_schema", "optuna"}
        with pytest.raises(pymysql.err.OperationalError):
            cur.execute("SELECT COUNT(*) FROM mlflow.runs")
    conn.close()


RAN = f"{layout.MLFLOW_STATE}/e2e-pyc-ran"  # root and the server could both write it
PLANT = f"""
import importlib.util, os, sys
from importlib._bootstrap_external import _code_to_timestamp_pyc
source = importlib.util.find_spec("uvicorn").origin
st = os.stat(source)
code = "import os\\nopen({RAN!r}, 'w').write(str(os.getuid()))\\n"
data = _code_to_timestamp_pyc(compile(code, source, "exec"), st.st_mtime, st.st_size)
name = "__init__." + sys.implementation.cache_tag + ".pyc"
targets = [os.path.dirname(source) + "/__pycache__/" + name]  # beside the source
targets += [prefix + os.path.dirname(source) + "/" + name for prefix in sys.argv[1:]]
for target in targets:
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(data)
        print("planted", target)
    except OSError as exc:
        print("refused", target, exc.strerror)
"""


def test_bytecode_planted_by_mlflow_never_runs_as_root(stack):
    """The mlflow account plants a .pyc for uvicorn in every cache a Python of the stack
    might use; root then compiles the server's bytecode again (an env re-sync does that):
    the planted code never runs as root (nor as the server)."""
    h = host(stack.info)
    python = "/opt/anaconda/envs/mlflow/bin/python"
    prefixes = [layout.MLFLOW_PYCACHE, f"{layout.MLFLOW_STATE}/.cache/pycache", "/var/tmp/pyc"]
    try:
        sh(h, f"rm -f {RAN}; cat > /var/tmp/e2e-plant.py", stdin=PLANT)
        planted = sh(h, f"cd / && runuser -u mlflow -- {python} /var/tmp/e2e-plant.py "
                        + " ".join(prefixes))  # fmt: skip
        assert f"refused {layout.MLFLOW_PYCACHE}" in planted  # root's cache: not theirs
        assert "refused /opt/anaconda/envs/mlflow/" in planted  # root's env: not theirs
        assert "planted" in planted  # where the account may write, it did
        # Root compiles the server's bytecode again (as after an env sync), then the server
        # restarts with its cache; neither runs what mlflow planted.
        sh(h, f"rm -rf {layout.MLFLOW_PYCACHE}")
        out = ok(invoke("provision", "--inventory", str(stack.inv)))
        assert "bytecode of the MLflow server: ran" in out
        sh(h, f"systemctl restart {layout.MLFLOW_UNIT}")
        wait_until(lambda: h.run("curl -sf http://127.0.0.1:5000/health").ok, 120, "MLflow up")
        assert sh(h, f"cat {RAN} 2>/dev/null || echo never").strip() == "never"
    finally:
        h.run(f"rm -rf /var/tmp/e2e-plant.py /var/tmp/pyc {RAN} {layout.MLFLOW_STATE}/.cache")
        h.close()


# Every unit the stack writes that runs a process, and its exposure before this round's
# hardening (systemd-analyze security on the sandbox, fcd5c90); the goal is at most 3.0.
# (The proxy's unit, there only in public mode, is scored by test_public_https_e2e.py.)
HARDENED_UNITS = {
    layout.MLFLOW_UNIT: 4.2,
    layout.RECORDER_UNIT: None,  # new this round
    layout.JUPYTER_UNIT: 4.2,
    layout.WARM_UNIT: 6.5,
    "mlflow-model@e2e-exposure.service": 4.2,
}


def test_every_unit_we_write_is_hardened_to_an_exposure_of_at_most_3(stack):
    """systemd's own score of each unit (a template instance is scored by its template)."""
    h = host(stack.info)
    try:
        scores = {unit: exposure(h, unit) for unit in HARDENED_UNITS}
    finally:
        h.close()
    for unit, before in HARDENED_UNITS.items():
        print(f"systemd-analyze security {unit}: {before or '-'} -> {scores[unit]}")
    assert {u: s for u, s in scores.items() if s > 3.0} == {}


def test_the_service_accounts_cannot_log_in_over_ssh(stack, tmp_path):
    info = stack.info
    h = host(info)
    try:
        for account, home in (("demo", layout.DEMO_ROOT), ("mlflow", layout.MLFLOW_HOME)):
            entry = sh(h, f"getent passwd {account}").strip().split(":")
            assert entry[5:] == [home, layout.NOLOGIN]
            assert sh(h, f"stat -c %U {home}").strip() == "root"
            planted = h.run(
                f"runuser -u {account} -- sh -c 'mkdir -p {home}/.ssh && "
                f"cat >> {home}/.ssh/authorized_keys'",
                stdin=(info.key_file.with_suffix(".pub")).read_text(),
            )
            assert not planted.ok and "Permission denied" in planted.stderr
    finally:
        h.close()
    # Even with the key of the sandbox's own login user, an SSH login as demo is refused.
    login = subprocess.run(
        ["ssh", *info.ssh_options(), "-o", "ConnectTimeout=10", f"demo@{info.address}", "id"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert login.returncode != 0 and "uid=" not in login.stdout


def test_a_host_in_the_older_layout_is_taken_over_without_losing_data(stack, tmp_path):
    """The layout before this one: /opt/mlflow (artifacts inside) the mlflow account's and
    /opt/demo (the Jupyter root, the user's notebooks and edits inside) the demo account's.
    Provisioning moves the data out as the account itself, then takes the trees over."""
    import mlflow

    h = host(stack.info)
    mlflow.set_tracking_uri(stack.tracking_uri)
    (tmp_path / "kept.txt").write_text("an artifact of the older layout\n")
    with mlflow.start_run(experiment_id=mlflow.set_experiment("e2e-takeover").experiment_id) as r:
        mlflow.log_artifact(str(tmp_path / "kept.txt"))
    try:
        sh(h, f"systemctl stop {layout.MLFLOW_UNIT} {layout.JUPYTER_UNIT} {layout.WARM_UNIT}")
        sh(
            h,  # the older layout, as that version left it
            f"mv {layout.MLFLOW_ARTIFACTS} {layout.MLFLOW_HOME}/artifacts && "
            f"chown -R mlflow:mlflow {layout.MLFLOW_HOME} && chmod 750 {layout.MLFLOW_HOME} && "
            f"echo 'my notes' > {layout.DEMO_ROOT}/my-notes.txt && "
            f"echo 'my edit' >> {layout.DEMO_CODE}/notebooks/01_explore_data.ipynb && "
            f"chown -R demo:demo {layout.DEMO_ROOT}",
        )
        out = ok(invoke("provision", "--inventory", str(stack.inv)))
        assert f"{layout.MLFLOW_HOME} to root (its data to {layout.MLFLOW_STATE}): ran" in out
        assert f"{layout.DEMO_ROOT} to root" in out and "failed=0" in out
        kept = f"{layout.DEMO_WORKSPACE}/previous-opt-demo"
        assert sh(h, f"cat {kept}/my-notes.txt") == "my notes\n"
        edited = f"{kept}/shipped-notebooks-as-edited/01_explore_data.ipynb"
        assert sh(h, f"tail -1 {edited}") == "my edit\n"
        owners = sh(h, f"stat -c %U {layout.MLFLOW_HOME} {layout.DEMO_ROOT} {layout.DEMO_CODE}")
        assert owners.split() == ["root", "root", "root"]
        again = provision_json(stack.inv)[1]
        assert [s for s in again["hosts"]["e2e"] if s["status"] == "changed"] == []
        stack.tunnel.restart()
        local = mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, artifact_path="kept.txt", dst_path=str(tmp_path / "dl")
        )
        assert Path(local).read_text() == "an artifact of the older layout\n"
    finally:
        h.run(f"rm -rf {layout.DEMO_WORKSPACE}/previous-opt-demo")
        h.close()
