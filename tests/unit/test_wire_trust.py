"""Trust on the wire, without a host: hostile strings at every input and sink, host key pins
and policy, masking of every form of a secret, caches that cannot inject.

The hostile table is fed to every operator input and every inventory string that reaches a
host; each is refused with one line, or handled inertly: the commands and files generated
from it, run or parsed for real here, never create the canary (`$CANARY`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_stack import inputs, inventory_cache, secrets
from mlflow_stack.actions import remote, serve
from mlflow_stack.engine import facts as F
from mlflow_stack.engine import hostkeys, templating
from mlflow_stack.engine.host import Host, Target
from mlflow_stack.errors import UserError
from mlflow_stack.inventory import Inventory
from mlflow_stack.layout import Layout
from tests.unit.test_roles import SANDBOX_SIZE

CANARY = "/tmp/mlflow-stack-canary-unit"
HOSTILE = {
    "quote": "it's",
    "double quote": 'say "hi"',
    "backtick": f"`touch {CANARY}`",
    "command substitution": f"$(touch {CANARY})",
    "semicolon": f"x; touch {CANARY}",
    "pipe": f"x | touch {CANARY}",
    "ampersand": f"x & touch {CANARY}",
    "backslash": "a\\b\\",
    "newline": f"x\nExecStartPre=+/bin/touch {CANARY}",
    "NUL": "x\x00y",
    "spaces": "a b  c",
    "non-ASCII": "wéin-ümlaut-😀",
    "very long": "x" * 5000,
}
CONTROL = {"newline", "NUL"}


@pytest.fixture(autouse=True)
def no_canary():
    Path(CANARY).unlink(missing_ok=True)
    yield
    assert not Path(CANARY).exists(), "an injection ran"


def refused_in_one_line(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "\x00" not in message
    return message


# --- operator inputs ---------------------------------------------------------------------

STRICT_FLAGS = {
    "--name": inputs.instance_name,
    "--run": inputs.run_id,
    "--study": inputs.study,
    "--host (name)": lambda v: inputs.name(v, "--host"),
    "--host (address)": lambda v: inputs.host_address(v, "--host"),
    "--host (user)": lambda v: inputs.login_user(v, "--host user"),
    "--port": inputs.port,
}


@pytest.mark.parametrize("flag", STRICT_FLAGS)
@pytest.mark.parametrize("case", HOSTILE)
def test_strict_operator_inputs_refuse_every_hostile_string(flag, case):
    message = refused_in_one_line(lambda: STRICT_FLAGS[flag](HOSTILE[case]))
    assert message.startswith(flag.split(" ")[0])


TEXT_FLAGS = {
    "--experiment": inputs.experiment,
    "--model": lambda v: inputs.model_uri("models:/" + v + "@champion"),
    "--data": lambda v: inputs.local_path(v, "--data"),
}


@pytest.mark.parametrize("flag", TEXT_FLAGS)
@pytest.mark.parametrize("case", HOSTILE)
def test_free_text_inputs_refuse_control_characters_and_length_only(flag, case):
    value = HOSTILE[case]
    if case in CONTROL or case == "very long":
        refused_in_one_line(lambda: TEXT_FLAGS[flag](value))
    else:
        TEXT_FLAGS[flag](value)  # accepted: every sink quotes it (below)


def fake_bin(tmp_path: Path, *names: str) -> dict[str, str]:
    """Commands that record their argv (one JSON list per call) instead of running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tool = bin_dir / name
        tool.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(tmp_path / 'calls')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        )
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Recorder:
    """A Host stand-in that records the command lines it is asked to run."""

    name = "web"
    target = Target("web", "192.0.2.7")

    def __init__(self, stdout: str = '{"uri": "models:/m-1"}') -> None:
        self.commands: list[str] = []
        self.stdout = stdout

    def run(self, script, **kwargs):
        from mlflow_stack.engine.host import RunResult

        self.commands.append(script)
        return RunResult(0, self.stdout, "", 0.0)


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - CONTROL - {"very long"}))
def test_a_registered_model_name_reaches_the_resolver_as_one_argument(case, tmp_path):
    ref = "models:/" + HOSTILE[case] + "@champion"
    host = Recorder()
    serve.resolve_model(host, Layout(), ref)
    env = fake_bin(tmp_path, "python3")
    subprocess.run(["sh", "-c", host.commands[0]], env=env, check=True, cwd=tmp_path)
    assert calls(tmp_path) == [["-", "http://127.0.0.1:5000", ref]]


def test_a_resolved_uri_with_a_newline_is_refused():
    host = Recorder(stdout=json.dumps({"uri": "models:/a\nMODEL_URI=evil/1"}))
    refused_in_one_line(lambda: serve.resolve_model(host, Layout(), "models:/a@b"))


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - CONTROL - {"very long"}))
def test_an_experiment_name_is_one_argument_of_the_demo_command(case):
    command = remote.demo_command(
        Layout(), ["-m", "demo_wine.train", "--experiment", HOSTILE[case]]
    )
    argv = shlex.split(command.split(" && ", 1)[1])
    assert argv[-2:] == ["--experiment", HOSTILE[case]]


def test_serve_stop_refuses_a_hostile_name_before_any_command():
    host = Recorder()
    for case in HOSTILE:
        refused_in_one_line(lambda case=case: serve.stop(host, HOSTILE[case]))
    assert host.commands == []


# --- inventory strings ---------------------------------------------------------------------

SHA = "a" * 64
# where each inventory string sits, as YAML (VALUE replaced by the hostile string, quoted)
INVENTORY_KEYS = {
    "host name": "hosts:\n  VALUE:\n    address: 10.0.0.5\n",
    "group name": "groups:\n  VALUE:\n    hosts: [web]\nhosts:\n  web:\n    address: 10.0.0.5\n",
    "address": "hosts:\n  web:\n    address: VALUE\n",
    "user": "hosts:\n  web:\n    address: 10.0.0.5\n    user: VALUE\n",
    "default user": "defaults:\n  user: VALUE\n",
    "sandbox": "hosts:\n  web:\n    sandbox: VALUE\n",
    "host_key": "hosts:\n  web:\n    address: 10.0.0.5\n    host_key: VALUE\n",
    "host_key_policy": "hosts:\n  web:\n    address: 10.0.0.5\n    host_key_policy: VALUE\n",
    "python.prefix": "defaults:\n  vars:\n    python: {prefix: VALUE}\n",
    "python.miniforge_url": "defaults:\n  vars:\n    python: {miniforge_url: VALUE}\n",
    "python.miniforge_sha256 value": (
        "defaults:\n  vars:\n    python: {miniforge_sha256: {x86_64: VALUE}}\n"
    ),
    "python.miniforge_sha256 key": (
        f"defaults:\n  vars:\n    python: {{miniforge_sha256: {{VALUE: {SHA}}}}}\n"
    ),
    "mysql.bind_address": "defaults:\n  vars:\n    mysql: {bind_address: VALUE}\n",
    "mysql.allow_from": "defaults:\n  vars:\n    mysql: {allow_from: [VALUE]}\n",
    "mlflow.allowed_hosts": "defaults:\n  vars:\n    mlflow: {allowed_hosts: [VALUE]}\n",
    "demo.data_url": "defaults:\n  vars:\n    demo: {data_url: VALUE}\n",
    "demo.data_sha256": "defaults:\n  vars:\n    demo: {data_sha256: VALUE}\n",
    # read on the controller only (never sent to a host as text): control characters refused
    "key": "hosts:\n  web:\n    address: 10.0.0.5\n    key: VALUE\n",
    "known_hosts": "hosts:\n  web:\n    address: 10.0.0.5\n    known_hosts: VALUE\n",
    "demo.data_file": "defaults:\n  vars:\n    demo: {data_file: VALUE}\n",
    "test (engine tests' free-form vars)": "defaults:\n  vars:\n    test: {x: VALUE}\n",
}
LOCAL_ONLY = {"key", "known_hosts", "demo.data_file", "test (engine tests' free-form vars)"}


@pytest.mark.parametrize("key", INVENTORY_KEYS)
@pytest.mark.parametrize("case", HOSTILE)
def test_every_inventory_string_refuses_hostile_text_or_stays_local(tmp_path, key, case):
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY_KEYS[key].replace("VALUE", json.dumps(HOSTILE[case])))
    try:
        Inventory.load(path)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("inventory.yaml: ")
        return
    assert key in LOCAL_ONLY and case not in CONTROL, f"{key} accepted {case!r}"


def test_the_host_key_policy_off_is_written_explicitly_and_excludes_pins(tmp_path):
    path = tmp_path / "inventory.yaml"
    pin = "SHA256:" + "A" * 43
    path.write_text(
        f"hosts:\n  web:\n    address: h\n    host_key: {pin}\n    host_key_policy: off\n"
    )
    assert "host_key_policy off would ignore it" in refused_in_one_line(
        lambda: Inventory.load(path)
    )


# --- sinks ---------------------------------------------------------------------------------


def parse_environment_file_value(raw: str) -> str:
    """How systemd reads a value of an EnvironmentFile line (the cases env_value produces)."""
    if raw.startswith('"'):
        assert raw.endswith('"')
        out, body, i = [], raw[1:-1], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '"\\`$':
                out.append(body[i + 1])
                i += 2
            else:
                out.append(body[i])
                i += 1
        return "".join(out)
    assert "\\" not in raw and not raw.startswith("'")
    return raw


@pytest.mark.parametrize("case", HOSTILE)
def test_each_sink_refuses_or_quotes_hostile_values(case, tmp_path):
    value = HOSTILE[case]
    unit_inert = not any(c in value for c in "%\\$\"'`;") and case not in CONTROL
    if unit_inert:
        assert templating.for_sink("systemd/x.service.j2", "v", value) == value
    else:
        refused_in_one_line(lambda: templating.for_sink("systemd/x.service.j2", "v", value))
    if case in CONTROL:
        for template in ("serving/model.env.j2", "demo/setenv.sh.j2", "mlflow/a.ini.j2", "x.j2"):
            refused_in_one_line(lambda t=template: templating.for_sink(t, "v", value))
        return
    env = templating.for_sink("serving/model.env.j2", "v", value)
    assert "\n" not in env and parse_environment_file_value(env) == value
    shell = templating.for_sink("demo/setenv.sh.j2", "v", value)
    echoed = subprocess.run(
        ["sh", "-c", f"printf %s {shell}"], capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert echoed == value
    assert templating.for_sink("mlflow/basic_auth.ini.j2", "v", value + "%") == (
        value.replace("%", "%%") + "%%"
    )


def test_a_model_uri_with_quotes_and_command_substitution_stays_one_env_line():
    uri = f"models:/a'b\"$(touch {CANARY});`id`/3"
    steps = serve.serve_steps(serve.ServeRequest("w", "models:/x@y", 54321, 1), uri, Layout())
    env = next(s for s in steps if s.label.endswith("/w.env")).content
    line = next(line for line in env.splitlines() if line.startswith("MODEL_URI="))
    assert parse_environment_file_value(line.removeprefix("MODEL_URI=")) == uri
    assert len(env.splitlines()) == len(
        next(
            s
            for s in serve.serve_steps(
                serve.ServeRequest("w", "models:/x@y", 54321, 1), "models:/m-1", Layout()
            )
            if s.label.endswith("/w.env")
        ).content.splitlines()
    )


def test_a_hostile_data_url_never_reaches_the_shell_unquoted(tmp_path):
    from roles import demo_files

    # what the inventory lets through at most: RFC 3986 punctuation (the rest is refused)
    url = f"http://x/a;b&c(d)!*+,=?q=$(touch%20{CANARY})"
    with pytest.raises(UserError):
        inputs.url(url, "demo.data_url")
    url = "http://x/a;b&c(d)!*+,=?q=(touch)"
    script = demo_files.download_script(url, SHA, str(tmp_path / "data.csv"), "nobody")
    script = "set -e; " + script.split("; set -e; ", 1)[1]  # not its root-only-tree guard
    env = fake_bin(tmp_path, "curl", "chown", "chmod")
    (tmp_path / "data.csv").write_text("old")
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert f"checksum mismatch for {url}:" in proc.stderr  # the fake curl downloads nothing
    assert calls(tmp_path)[0][-1] == url


# --- host keys ------------------------------------------------------------------------------

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOVg0g0QUvuO3b8Am2xYb9dptN8ZqF1IGDcP6hb2PUsf"
FP = hostkeys.fingerprint(base64.b64decode(KEY))
OTHER = base64.b64encode(
    len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + b"o" * 32
).decode()


def test_fingerprints_are_openssh_s():
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(KEY)).digest()).decode()
    assert digest.rstrip("=") == FP.removeprefix("SHA256:")


@pytest.mark.parametrize(
    ("text", "pin"),
    [
        (f"[10.0.0.5]:2222 ssh-ed25519 {KEY}", f"ssh-ed25519 {FP}"),
        (f"ssh-ed25519 {KEY} root@ip-10-0-0-5", f"ssh-ed25519 {FP}"),
        (FP, FP),
        (f"ssh-ed25519 {FP}", f"ssh-ed25519 {FP}"),
        (f"256 {FP} root@ip-172-31-7-9 (ED25519)", f"ssh-ed25519 {FP}"),
        (f"256 {FP} root@ip-172-31-7-9 (ECDSA)", f"ecdsa-sha2-nistp256 {FP}"),
        (f"3072 {FP} root@ip-172-31-7-9 (RSA)", f"ssh-rsa {FP}"),
        (FP + "=", FP),  # with base64's padding
    ],
)
def test_pins_from_known_hosts_pub_lines_fingerprints_and_the_ec2_console(text, pin):
    assert hostkeys.pin_text(text) == pin


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SHA256:short",
        f"ssh-ed25519 {KEY[:-5]}",
        f"@revoked * ssh-ed25519 {KEY}",
        f"{FP}\nssh-ed25519 {KEY}",
        "MD5:aa:bb",
    ],
)
def test_bad_pins_are_refused(text):
    with pytest.raises(ValueError):
        hostkeys.parse_pin(text)


def test_known_hosts_names_plain_hashed_patterns_and_negations():
    salt = os.urandom(20)
    import hmac

    hashed = (
        f"|1|{base64.b64encode(salt).decode()}|"
        + base64.b64encode(hmac.new(salt, b"[10.0.0.5]:2222", hashlib.sha1).digest()).decode()
    )
    assert hostkeys.host_matches(hashed, "[10.0.0.5]:2222")
    assert not hostkeys.host_matches(hashed, "10.0.0.5")
    assert hostkeys.host_matches("10.0.0.*,!10.0.0.9", "10.0.0.5")
    assert not hostkeys.host_matches("10.0.0.*,!10.0.0.9", "10.0.0.9")
    assert hostkeys.lookup_name("10.0.0.5", 22) == "10.0.0.5"
    assert hostkeys.lookup_name("10.0.0.5", 2222) == "[10.0.0.5]:2222"
    assert hostkeys.lookup_name("10.0.0.5", 2222, "alias") == "alias"


def check(tmp_path: Path, policy: str | None, known: str, offered: str = KEY, **extra):
    kh = tmp_path / "known_hosts"
    kh.write_text(known)
    target = Target(
        "web", "10.0.0.5", 22, "ubuntu", known_hosts=kh, host_key_policy=policy, **extra
    )
    settings = hostkeys.settings(target)
    return hostkeys.check_offered("web", target, settings, "ssh-ed25519", offered), settings


def test_the_paramiko_policy_matches_openssh_s(tmp_path):
    assert check(tmp_path, "strict", f"10.0.0.5 ssh-ed25519 {KEY}\n")[0] == (
        hostkeys.known_keys(
            hostkeys.settings(Target("w", "10.0.0.5", known_hosts=tmp_path / "known_hosts")),
            "10.0.0.5",
        ),
        False,
    )
    changed = refused_in_one_line(
        lambda: check(tmp_path, None, f"10.0.0.5 ssh-ed25519 {KEY}\n", offered=OTHER)
    )
    other_fp = hostkeys.fingerprint(base64.b64decode(OTHER))
    assert f"has changed: offered {other_fp} (ssh-ed25519), expected {FP}" in changed
    assert "ssh-keygen -R 10.0.0.5 -f" in changed
    unknown = refused_in_one_line(lambda: check(tmp_path, "strict", ""))
    assert f"is unknown and host keys are checked strictly: offered {FP}" in unknown
    (_, add), settings = check(tmp_path, None, "")  # accept-new, the default
    assert add and settings.user_files == (tmp_path / "known_hosts",)
    hostkeys.append_known_host(settings.user_files[0], "10.0.0.5", "ssh-ed25519", KEY)
    assert (tmp_path / "known_hosts").read_text() == f"10.0.0.5 ssh-ed25519 {KEY}\n"
    assert check(tmp_path, "off", f"10.0.0.5 ssh-ed25519 {OTHER}\n")[0] == ([], False)
    revoked = f"@revoked * ssh-ed25519 {KEY}\n"
    assert "is revoked" in refused_in_one_line(lambda: check(tmp_path, None, revoked))
    pinned = refused_in_one_line(lambda: check(tmp_path, None, "", offered=OTHER, host_keys=(FP,)))
    assert f"does not match the inventory's pin: offered {other_fp}" in pinned
    assert check(tmp_path, None, f"10.0.0.5 ssh-ed25519 {OTHER}\n", host_keys=(FP,))[0] == (
        [],
        False,
    )  # a pin wins over known_hosts


def test_the_users_ssh_config_sets_the_paramiko_policy_unless_the_inventory_does(tmp_path):
    target = Target("web", "10.0.0.5")
    config = {
        "stricthostkeychecking": "yes",
        "userknownhostsfile": f"{tmp_path}/u /dev/null",
        "hostkeyalias": "box",
    }
    s = hostkeys.settings(target, config)
    assert (s.policy, s.user_files, s.alias) == ("strict", (tmp_path / "u",), "box")
    s = hostkeys.settings(Target("web", "10.0.0.5", host_key_policy="accept-new"), config)
    assert s.policy == "accept-new"
    assert hostkeys.settings(target, {}).policy == "accept-new"


def test_off_is_warned_about_on_every_run(capsys):
    target = Target("web", "10.0.0.5", host_key_policy="off")
    hostkeys.warn_if_off("web", target)
    hostkeys.warn_if_off("web", target)  # once per process
    err = capsys.readouterr().err
    assert err.count("host key checking is off") == 1 and "10.0.0.5:22" in err


# --- secrets -------------------------------------------------------------------------------


def test_every_form_of_a_secret_is_masked():
    value = 'p@ss/w0rd "100%" \\ é+&='
    secret = secrets.Secret(value)
    from urllib.parse import quote, quote_plus

    for form in (
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    ):
        assert form != secrets.mask(f"x {form} y")
        assert secrets.mask(f"x {form} y") == f"x {secrets.MASK} y"
    assert secret.reveal() == value


@pytest.mark.parametrize("env", secrets.GIVEN)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("short-pw", "shorter than 12"),
        ("a" * 11, "shorter than 12"),
        ("good-length\npw", "control character"),
        (" padded-secret ", "whitespace"),
    ],
)
def test_a_given_secret_that_is_too_short_is_refused_without_showing_it(
    monkeypatch, env, value, why
):
    monkeypatch.setenv(env, value)
    message = refused_in_one_line(secrets.check_given)
    assert message.startswith(f"{env}: ") and why in message and value.strip() not in message


def test_a_short_stored_secret_is_replaced(monkeypatch):
    from mlflow_stack.engine.context import RoleContext
    from mlflow_stack.vars import defaults

    os_info = F.OsInfo("debian", "12", "bookworm")
    ctx = RoleContext("h", os_info, defaults(), SANDBOX_SIZE, {"db_password": "abc"})
    assert len(ctx.secret("db_password").reveal()) >= secrets.MIN_LENGTH


def test_streamed_output_and_errors_are_masked():
    secret = secrets.generate()
    seen: list[str] = []

    class Link:
        is_open = True

        def run(self, command, stdin, timeout, on_output):
            from mlflow_stack.engine.link import Output

            on_output(f"leaked {secret.reveal()}")
            return Output(0, "", "")

    Host(Target("w", "h"), _link=Link()).run("x", on_output=seen.append)
    assert seen == [f"leaked {secrets.MASK}"]
    from invoke.exceptions import Exit

    from mlflow_stack import cli

    with pytest.raises(Exit) as info, cli.reporting():
        raise UserError(f"failed: {secret.reveal()}")
    assert secret.reveal() not in str(info.value.message)


# --- caches --------------------------------------------------------------------------------


def test_a_tampered_inventory_cache_entry_is_not_used(tmp_path, monkeypatch):
    from mlflow_stack import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    inv = tmp_path / "inventory.yaml"
    inv.write_text("groups:\n  server:\n    hosts: [web]\nhosts:\n  web:\n    address: 10.0.0.5\n")
    cli.hosts_for(None, str(inv))
    (entry,) = (tmp_path / "cache/mlflow-stack/inventory").glob("*.json")
    data = json.loads(entry.read_text())
    data["hosts"][0]["address"] = f"10.0.0.5;touch {CANARY}"
    entry.write_text(json.dumps(data))
    assert inventory_cache.lookup(inv, "") is None  # checked again on use: a miss
    data["hosts"][0]["address"] = "10.0.0.6"
    data["code"] = "0" * 64  # validated by other code
    entry.write_text(json.dumps(data))
    assert inventory_cache.lookup(inv, "") is None


def test_the_inventory_cache_key_covers_all_validating_code():
    """Every module the inventory's validation imports is in SCHEMA_SOURCES."""
    script = (
        "import sys, mlflow_stack.inventory; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('mlflow_stack') and getattr(m, '__file__', None)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout
    here = Path(inventory_cache.__file__).parent
    used = {str(Path(p).relative_to(here)) for p in out.split()}
    used -= {"__init__.py", "engine/__init__.py"}
    assert used <= set(inventory_cache.SCHEMA_SOURCES), used - set(inventory_cache.SCHEMA_SOURCES)


@pytest.mark.parametrize(
    "vars_",
    [
        {},
        {"mlflow": {"backend": "sqlite"}},
        {"python": {"manager": "conda", "miniforge_sha256": {"x86_64": SHA}}},
        {"jupyter": {"auth": "password"}},
        {"mlflow": {"public": True}},
        {"demo": {"warm_runner": False}},
        {"mysql": {"allow_from": ["10.0.0.9"], "server": "mysql"}},  # TLS for its clients
        {"sizing": {"profile": "small"}},
    ],
)
@pytest.mark.parametrize("os_id", ["debian", "ubuntu"])
def test_every_fact_the_roles_read_is_rebuilt_from_its_key(vars_, os_id, monkeypatch):
    """So a no-op provision stays one SSH command: the prefetch can read all of them."""
    import roles
    from mlflow_stack.engine.context import RoleContext, base_facts
    from mlflow_stack.layout import ROLES
    from mlflow_stack.vars import validate

    monkeypatch.setenv("JUPYTER_PASSWORD", "a-long-enough-password")
    os_info = F.OsInfo(os_id, "12", "x")
    ctx = RoleContext("h", os_info, validate(vars_), SANDBOX_SIZE, {}, address="10.0.0.5")
    needed = [*base_facts()]
    for name in ROLES:
        needed += [f for s in roles.get(name).build(ctx) for f in s.facts()]
    for fact in needed:
        rebuilt = F.from_key(fact.key)
        assert rebuilt == fact and rebuilt.command() == fact.command(), fact.key
