"""Trust on the wire, attacked on real sandboxes (issue #16).

- An impostor: a host is pinned on first contact (accept-new into a known_hosts of the
  test's own); then it stops and a *different* sandbox (new host key, same address and port,
  willing to accept our login key) takes its place. provision, train, tune across hosts,
  tunnel and check-mysql (OpenSSH and Paramiko) all refuse with one line naming the host, the
  fingerprint offered, the fingerprint expected and the fix; the impostor's journal shows no
  accepted login and none of the commands, no file was created, no secret arrived (an
  impostor offering only a key of another type is refused too). A pinned
  fingerprint (the EC2 console format) refuses a wrong key at first contact; the user's own
  `~/.ssh/config` `StrictHostKeyChecking yes` is honoured.
- Hostile strings through every operator input and every inventory string, on the
  provisioned stack; a registered model named with quotes and `$()`, created through MLflow's
  REST API, is served safely; a canary any injection would create never appears.
- Secrets, in plain, URL-encoded and JSON-escaped form, appear in no output of provision,
  train, tune (its stream included), check-mysql, status or urls.

No test writes to the real ~/.ssh: every host reached by address has its own known_hosts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from mlflow_stack import sandbox as sb
from mlflow_stack.engine import hostkeys
from tests.e2e.helpers import error_line, host, invoke, ok, sh

pytestmark = pytest.mark.e2e
REAL_SSH = Path.home() / ".ssh"


@pytest.fixture(autouse=True)
def real_ssh_untouched():
    """No test of this module changes the user's own ~/.ssh."""

    def state() -> dict[str, bytes]:
        if not REAL_SSH.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in REAL_SSH.iterdir() if p.is_file()}

    before = state()
    yield
    assert state() == before, "~/.ssh was written"


class Isolated:
    """invoke with its own SSH directory and caches (masters never shared between tests)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wt-"))  # short: unix socket paths
        self.ssh = self.dir / "ssh"
        self.env = {"MLFLOW_STACK_SSH_DIR": str(self.ssh), "XDG_CACHE_HOME": str(self.dir / "c")}

    def __call__(self, *args: str, env: dict | None = None, timeout: int = 600):
        return invoke(*args, env={**self.env, **(env or {})}, timeout=timeout)

    def close_masters(self) -> None:
        if self.ssh.is_dir():
            for sock in self.ssh.iterdir():
                if sock.is_socket():
                    subprocess.run(
                        ["ssh", "-O", "exit", "-S", str(sock), "x"], capture_output=True, timeout=10
                    )


@pytest.fixture
def run():
    """`invoke` isolated for one test; its masters closed and its directory removed after."""
    isolated = Isolated()
    try:
        yield isolated
    finally:
        isolated.close_masters()
        shutil.rmtree(isolated.dir, ignore_errors=True)


def ed25519(known_hosts: Path) -> str:
    """The SHA256 fingerprint of the ed25519 key in a known_hosts file."""
    keys = hostkeys.read_known_hosts(known_hosts)
    return next(k.fingerprint for k in keys if k.key_type == "ssh-ed25519")


def fingerprints(info: sb.SandboxInfo) -> set[str]:
    """The fingerprints of all of a sandbox's host keys."""
    return {k.fingerprint for k in hostkeys.read_known_hosts(info.known_hosts)}


def container_pid(info: sb.SandboxInfo) -> int:
    """PID 1 of the sandbox's container (the child of its systemd-nspawn)."""
    children = Path(f"/proc/{info.pid}/task/{info.pid}/children").read_text().split()
    return int(children[0])


def inside(info: sb.SandboxInfo, script: str) -> str:
    """Run `script` in the sandbox's namespaces from the controller: no SSH session."""
    proc = subprocess.run(
        [
            "nsenter",
            "-t",
            str(container_pid(info)),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def accepted_logins(info: sb.SandboxInfo) -> list[str]:
    journal = inside(info, "journalctl -u ssh --no-pager -o cat || true")
    return [line for line in journal.splitlines() if line.startswith("Accepted ")]


def files_holding(root: Path, needles: list[str]) -> list[str]:
    """Files under `root` whose bytes contain any of `needles`."""
    wanted = [n.encode() for n in needles]
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(n in data for n in wanted):
                    hits.append(str(path))
        except OSError:
            continue
    return hits


def console_block(info: sb.SandboxInfo) -> list[str]:
    """What the EC2 console prints between BEGIN/END SSH HOST KEY FINGERPRINTS, for `info`."""
    upper = info.state_dir / "upper/etc/ssh"
    lines = []
    for pub in sorted(upper.glob("ssh_host_*_key.pub")):
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
        ).stdout
        lines.append(out.strip())
    return lines


def test_an_impostor_on_a_pinned_hosts_address_receives_nothing(
    stack, fresh_sandbox, tmp_path, run
):
    victim = fresh_sandbox()
    marker = f"wire-marker-{uuid.uuid4().hex[:10]}"
    given = f"given-db-password-{uuid.uuid4().hex}"
    known = tmp_path / "known_hosts"
    inv = tmp_path / "inventory.yaml"
    inv.write_text(
        "groups:\n  server:\n    hosts: [e2e]\n  workers:\n    hosts: [victim]\n"
        f"hosts:\n  e2e:\n    sandbox: {stack.info.name}\n"
        f"  victim:\n    address: {victim.address}\n    key: {victim.key_file}\n"
        f"    known_hosts: {known}\n"
    )
    # first contact: accept-new pins the host's key in this test's known_hosts
    ok(
        run(
            "provision",
            "--host",
            "victim",
            "--roles",
            "demo_files",
            "--check",
            "--inventory",
            str(inv),
        )
    )
    expected = ed25519(victim.known_hosts)
    pinned_now = {k.fingerprint for k in hostkeys.read_known_hosts(known)}
    assert expected in pinned_now and pinned_now <= fingerprints(victim)
    run.close_masters()

    sb.down(victim.name, keep=True)
    impostor = fresh_sandbox(address=victim.address)
    assert (impostor.address, impostor.port) == (victim.address, victim.port)
    offered = ed25519(impostor.known_hosts)
    assert offered != expected
    # the impostor would even accept our login key: only the host key check stands between
    public = Path(f"{victim.key_file}.pub").read_text().strip()
    inside(impostor, f"echo '{public}' >> /home/ubuntu/.ssh/authorized_keys")
    logins = accepted_logins(impostor)
    stack_password = sh(host(stack.info), "cat /etc/mlflow-stack/secrets/db_password").strip()

    attacks = {
        "provision": ["provision", "--host", "victim"],
        "train": ["train", "--host", "victim", "--experiment", marker],
        "tune across hosts": [
            "tune",
            "--group",
            "workers",
            "--n-trials",
            "4",
            "--experiment",
            marker,
            "--study",
            marker,
        ],
        "tunnel": ["tunnel", "--host", "victim", "--offset", "20000"],
        "check-mysql": ["check-mysql", "--host", "victim"],
        "status": ["status", "--host", "victim"],
    }
    for transport in ("openssh", "paramiko"):
        for what, args in attacks.items():
            proc = run(
                *args,
                "--inventory",
                str(inv),
                timeout=120,
                env={"MLFLOW_DB_PASSWORD": given, "MLFLOW_STACK_SSH": transport},
            )
            line = error_line(proc)
            assert line.startswith(
                f"error: victim: host key of ubuntu@{victim.address}:22 has changed: "
                f"offered {offered} (ssh-ed25519), expected {expected} (ssh-ed25519"
            ), f"{transport} {what}: {line}"
            assert "nothing was sent to it" in line and "ssh-keygen -R" in line, line
            assert given not in proc.stdout + proc.stderr

    # the impostor received nothing: no login, none of our commands, no file, no secret
    assert accepted_logins(impostor) == logins
    assert marker not in inside(impostor, "journalctl --no-pager -o cat")
    assert (
        inside(
            impostor,
            "ls -d /etc/mlflow-stack /opt/demo /var/lib/mlflow-stack "
            "/etc/mlflow 2>/dev/null || true",
        ).strip()
        == ""
    )
    assert files_holding(impostor.state_dir / "upper", [given, stack_password, marker]) == []
    # ... and the real server ran nothing of the refused tune: no experiment of that name
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={marker}"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=30)
    assert missing.value.code == 404

    # a pinned fingerprint (EC2's console format) refuses a wrong key at the first contact
    pinned = tmp_path / "pinned.yaml"
    block = console_block(victim)
    assert any(line.endswith("(ED25519)") for line in block)
    pins = "".join(f"      - {json.dumps(line)}\n" for line in block)
    pinned.write_text(
        f"hosts:\n  victim:\n    address: {victim.address}\n    key: {victim.key_file}\n"
        f"    known_hosts: {tmp_path / 'empty_known_hosts'}\n    host_key:\n{pins}"
    )
    for transport in ("openssh", "paramiko"):
        line = error_line(
            run(
                "status",
                "--host",
                "victim",
                "--inventory",
                str(pinned),
                env={"MLFLOW_STACK_SSH": transport},
                timeout=120,
            )
        )
        assert f"does not match the inventory's pin: offered {offered}" in line, line
        assert f"{expected} (ssh-ed25519)" in line and "(inventory host_key)" in line, line
    assert not (tmp_path / "empty_known_hosts").exists()  # a pinned host writes nothing
    assert accepted_logins(impostor) == logins

    # control: pinning the impostor's own key, the same login works (the key was the reason)
    (tmp_path / "control.yaml").write_text(
        pinned.read_text().split("    host_key:")[0] + f"    host_key: {offered}\n"
    )
    ok(
        run(
            "provision",
            "--host",
            "victim",
            "--roles",
            "demo_files",
            "--check",
            "--inventory",
            str(tmp_path / "control.yaml"),
        )
    )
    assert len(accepted_logins(impostor)) == len(logins) + 1
    run.close_masters()

    # an impostor offering only a key of another type (RSA) is refused as changed too
    inside(
        impostor,
        "sed -i '/^HostKey/d' /etc/ssh/sshd_config && "
        "echo 'HostKey /etc/ssh/ssh_host_rsa_key' >> /etc/ssh/sshd_config && "
        "systemctl restart ssh",
    )
    for transport in ("openssh", "paramiko"):
        line = error_line(
            run(
                "status",
                "--host",
                "victim",
                "--inventory",
                str(inv),
                env={"MLFLOW_STACK_SSH": transport},
                timeout=120,
            )
        )
        assert " has changed: offered SHA256:" in line and "(ssh-rsa), expected " in line, line
    assert len(accepted_logins(impostor)) == len(logins) + 1
    run.close_masters()


def test_the_users_own_ssh_config_is_honoured(fresh_sandbox, tmp_path, run):
    box = fresh_sandbox()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    config = home / ".ssh/config"
    config.write_text(f"Host {box.address}\n  StrictHostKeyChecking yes\n")
    config.chmod(0o600)
    inv = tmp_path / "inventory.yaml"  # no known_hosts, no policy: ~/.ssh/config decides
    inv.write_text(f"hosts:\n  box:\n    address: {box.address}\n    key: {box.key_file}\n")
    offered = ed25519(box.known_hosts)
    for transport in ("openssh", "paramiko"):
        line = error_line(
            run(
                "status",
                "--host",
                "box",
                "--inventory",
                str(inv),
                timeout=120,
                env={"HOME": str(home), "MLFLOW_STACK_SSH": transport},
            )
        )
        assert f"host key of ubuntu@{box.address}:22 is unknown and host keys are checked " in line
        assert f"offered {offered}" in line and f"{home}/.ssh/known_hosts" in line, line
        assert f"host_key: {offered}" in line  # the fix names the pin to write
    assert not (home / ".ssh/known_hosts").exists()
    run.close_masters()
    config.unlink()  # without it: accept-new into the known_hosts ssh would use ($HOME's)
    ok(
        run(
            "provision",
            "--host",
            "box",
            "--roles",
            "demo_files",
            "--check",
            "--inventory",
            str(inv),
            env={"HOME": str(home)},
        )
    )
    learned = {k.fingerprint for k in hostkeys.read_known_hosts(home / ".ssh/known_hosts")}
    assert offered in learned and learned <= fingerprints(box)
    run.close_masters()


# --- hostile inputs on the provisioned stack --------------------------------------------------

CANARY = f"wire-canary-{uuid.uuid4().hex[:8]}"
HOSTILE = {
    "quote": "it's",
    "double quote": 'say "hi"',
    "backtick": f"`touch /tmp/{CANARY}`",
    "command substitution": f"$(touch /tmp/{CANARY})",
    "semicolon": f"x; touch /tmp/{CANARY}",
    "pipe": f"x | touch /tmp/{CANARY}",
    "ampersand": f"x & touch /tmp/{CANARY}",
    "backslash": "a\\b\\",
    "newline": f"x\nExecStartPre=+/bin/touch /tmp/{CANARY}",
    "spaces": "a b  c",
    "non-ASCII": "wéin-ümlaut-😀",
    "very long": "x" * 3000,
}  # NUL cannot be an argument: tests/unit/test_wire_trust.py feeds it in-process
REFUSED_TEXT = {"newline", "very long"}


def assert_no_canary(stack) -> None:
    places = "/tmp /var/tmp /root /home/ubuntu /opt/demo /opt/mlflow /"
    found = sh(
        host(stack.info),
        f"for d in {places}; do ls -a $d; done 2>/dev/null | grep -c {CANARY} || true",
    )
    assert found.strip() == "0", "an injection ran on the host"
    assert not list(Path("/tmp").glob(f"{CANARY}*")), "an injection ran on the controller"


def test_hostile_strings_through_every_input_on_the_stack(stack, tmp_path, run):
    inv = ["--inventory", str(stack.inv)]
    strict = {
        "serve --stop --name": lambda v: ["serve", "--stop", "--name", v],
        "predict --name": lambda v: ["predict", "--name", v],
        "serve --run": lambda v: ["serve", "--run", v],
        "tune --study": lambda v: ["tune", "--study", v, "--n-trials", "1"],
        "provision --host": lambda v: ["provision", "--host", v],
        "provision --host user@": lambda v: ["provision", "--host", f"{v}@10.77.0.250"],
        "predict --data": lambda v: ["predict", "--data", v],
    }
    jobs = [
        (what, case, make(value))
        for what, make in strict.items()
        for case, value in HOSTILE.items()
    ]
    jobs += [
        ("train --experiment", case, ["train", "--experiment", HOSTILE[case]])
        for case in REFUSED_TEXT
    ]

    def refused(job):
        what, case, args = job
        proc = run(*args, *inv, timeout=120)
        return what, case, proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        for what, case, proc in pool.map(refused, jobs):
            line = error_line(proc)  # one line, no traceback
            assert proc.returncode != 0, (what, case)
            assert "host key" not in line and "Traceback" not in proc.stderr, (what, case, line)

    # free text (experiment names) reaches the host as one quoted argument: inert
    runs, models = {}, {}
    for case, value in HOSTILE.items():
        if case in REFUSED_TEXT:
            continue
        out = ok(run("train", "--experiment", value, "--no-artifacts", "--quiet", *inv))
        runs[case] = re.search(r"^run ([0-9a-f]{32}) ", out, re.M)[1]
        models[case] = re.search(r"^model: (models:/m-\S+)", out, re.M)[1]
    api = f"{stack.tracking_uri}/api/2.0/mlflow"
    for case, run_id in runs.items():
        with urllib.request.urlopen(f"{api}/runs/get?run_id={run_id}") as answer:
            experiment_id = json.load(answer)["run"]["info"]["experiment_id"]
        with urllib.request.urlopen(f"{api}/experiments/get?experiment_id={experiment_id}") as a:
            assert json.load(a)["experiment"]["name"] == HOSTILE[case], case

    # inventory strings that reach the host: each refused with one line naming the key
    keys = {
        "hosts.e2e (name)": "hosts:\n  VALUE:\n    sandbox: SANDBOX\n",
        "address": "hosts:\n  e2e:\n    address: VALUE\n",
        "user": "hosts:\n  e2e:\n    sandbox: SANDBOX\n    user: VALUE\n",
        "python.prefix": "defaults:\n  vars:\n    python: {prefix: VALUE}\n",
        "mysql.bind_address": "defaults:\n  vars:\n    mysql: {bind_address: VALUE}\n",
        "mysql.allow_from": "defaults:\n  vars:\n    mysql: {allow_from: [VALUE]}\n",
        "mlflow.allowed_hosts": "defaults:\n  vars:\n    mlflow: {allowed_hosts: [VALUE]}\n",
        "demo.data_url": "defaults:\n  vars:\n    demo: {data_url: VALUE}\n",
        "demo.data_sha256": "defaults:\n  vars:\n    demo: {data_sha256: VALUE}\n",
    }

    def provision_with(job):
        key, case = job
        path = tmp_path / f"inv-{abs(hash(job))}.yaml"
        text = keys[key].replace("VALUE", json.dumps(HOSTILE[case]))
        if "hosts:" not in text:
            text += "hosts:\n  e2e:\n    sandbox: SANDBOX\n"
        path.write_text(text.replace("SANDBOX", stack.info.name))
        return key, case, run("provision", "--check", "--host", "e2e", "--inventory", str(path))

    with ThreadPoolExecutor(max_workers=4) as pool:
        for key, case, proc in pool.map(provision_with, [(k, c) for k in keys for c in HOSTILE]):
            assert error_line(proc).startswith("error: inv-"), (key, case, proc.stderr)

    # a registered model named with quotes and $(): created through MLflow's REST API, then
    # served and scored safely (MLflow refuses / and : in names: the canary goes to ~)
    name = f"wine'\"$(cd;touch {CANARY})`cd;touch {CANARY}`;x"

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{api}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path}: {exc.code} {exc.read()[:500]!r}") from None

    post("registered-models/create", {"name": name})
    version = post(
        "model-versions/create",
        {
            "name": name,
            "source": models["quote"],
            "run_id": runs["quote"],
            "model_id": models["quote"].removeprefix("models:/"),
        },
    )
    post(
        "registered-models/alias",
        {"name": name, "alias": "champion", "version": version["model_version"]["version"]},
    )
    try:
        out = ok(
            run(
                "serve",
                "--model",
                f"models:/{name}@champion",
                "--name",
                "hostile",
                "--port",
                "54460",
                *inv,
            )
        )
        assert "started/updated" in out
        prediction = ok(run("predict", "--name", "hostile", *inv)).strip()
        assert float(prediction) == pytest.approx(float(prediction))
        unknown = error_line(
            run(
                "serve",
                "--model",
                f"models:/{name}@nosuch",
                "--name",
                "hostile",
                "--port",
                "54460",
                *inv,
            )
        )
        assert "unknown model alias" in unknown
    finally:
        run("serve", "--stop", "--name", "hostile", *inv)
        run.close_masters()
    assert_no_canary(stack)


# --- secrets in every form --------------------------------------------------------------------


def forms(value: str) -> list[str]:
    return [value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]]


def test_secrets_in_every_form_never_leave_the_tool(stack, run):
    inv = ["--inventory", str(stack.inv)]
    h = host(stack.info)
    stored = {
        env: sh(h, f"cat /etc/mlflow-stack/secrets/{name}").strip()
        for env, name in (
            ("MLFLOW_DB_PASSWORD", "db_password"),
            ("MLFLOW_TUNING_DB_PASSWORD", "db_tuning_password"),
            ("JUPYTER_TOKEN", "jupyter_token"),
        )
    }
    h.close()
    short = run("provision", "--host", "e2e", *inv, env={"MLFLOW_DB_PASSWORD": "too-short"})
    assert error_line(short) == (
        "error: MLFLOW_DB_PASSWORD: the secret given is refused: shorter than 12 characters; "
        "give a longer one (at least 12 characters) or unset it to have one generated"
    )
    tag = uuid.uuid4().hex[:6]
    special = {  # full of what URLs and JSON encode
        "MLFLOW_DB_PASSWORD": f'Wire p@ss/"{tag}" \\ 100%+&=x',
        "MLFLOW_TUNING_DB_PASSWORD": f'Tune p@ss/"{tag}" \\ 50%+&=y',
    }
    # a tuning password that can also be a study name: the tune's streamed lines name it
    streamable = {"MLFLOW_TUNING_DB_PASSWORD": f"WireStreamSecret-{uuid.uuid4().hex[:12]}"}
    study = streamable["MLFLOW_TUNING_DB_PASSWORD"]
    outputs: list[str] = []
    try:
        for given in (special, streamable):
            for args in (
                ["provision", "--host", "e2e"],
                ["provision", "--host", "e2e", "--diff"],
                ["provision", "--host", "e2e", "--json"],
            ):
                proc = run(*args, *inv, env=given)
                outputs.append(ok(proc) + proc.stderr)
            actions = [
                ["train", "--alpha", "0.3"],
                ["tune", "--n-trials", "6", "--jobs-per-host", "2"],  # shared: URL on stdin
                ["check-mysql"],
                ["status"],
                ["urls"],
            ]
            if given is streamable:  # each process's streamed result line names its study
                actions.append(
                    ["tune", "--n-trials", "4", "--jobs-per-host", "2", "--study", study]
                )
            for args in actions:
                proc = run(*args, *inv)
                outputs.append(ok(proc) + proc.stderr)
        streamed = outputs[-1]
        assert '"study": "********"' in streamed and "study ********: 4 trials" in streamed
        text = "\n".join(outputs)
        for secret in [*special.values(), study, *stored.values()]:
            for form in forms(secret):
                assert form not in text, f"a form of a secret leaked: {form[:4]}…"
    finally:  # the stack gets its own secrets back
        proc = run("provision", "--host", "e2e", *inv, env=stored)
        run.close_masters()
    assert proc.returncode == 0, proc.stderr[-2000:]
