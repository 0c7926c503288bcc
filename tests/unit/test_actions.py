"""Remote actions as pure logic: argument checks, payloads, parsing of host answers."""

from __future__ import annotations

import json

import pytest

from mlflow_stack import inputs
from mlflow_stack.actions import check_mysql, predict, serve, status, tune, tunnel
from mlflow_stack.actions.remote import ActionError, demo_command, last_json_line
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.host import RunResult
from mlflow_stack.errors import UserError
from mlflow_stack.layout import Layout
from mlflow_stack.secrets import Secret, mask
from mlflow_stack.vars import defaults, validate

LAYOUT = Layout()


@pytest.mark.parametrize(
    ("flag", "value", "low", "high", "message"),
    [
        ("--alpha", "abc", 0, None, "--alpha 'abc': not a number"),
        ("--alpha", "-1", 0, None, "--alpha -1: must be >= 0"),
        ("--alpha", "nan", 0, None, "must be >= 0"),
        ("--l1-ratio", "1.5", 0, 1, "--l1-ratio 1.5: must be between 0 and 1"),
    ],
)
def test_bad_training_parameters(flag, value, low, high, message):
    with pytest.raises(inputs.InputError, match=message.replace("(", r"\(")):
        inputs.number(value, flag, low, high)


def test_good_training_parameters():
    assert inputs.number("0.42", "--alpha", 0) == 0.42
    assert inputs.number("1", "--l1-ratio", 0, 1) == 1.0


def test_demo_command_runs_as_demo_user_and_keeps_secrets_off_argv():
    cmd = demo_command(
        LAYOUT, ["-m", "demo_wine.tune", "--n-trials", "5"], secret_env=("DEMO_WINE_STORAGE",)
    )
    assert cmd.startswith("IFS= read -r DEMO_WINE_STORAGE && export DEMO_WINE_STORAGE && ")
    assert "cd /var/lib/demo && runuser -u demo -- env HOME=/var/lib/demo " in cmd
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in cmd
    assert cmd.endswith("/opt/anaconda/envs/demo/bin/python -m demo_wine.tune --n-trials 5")


def test_last_json_line_skips_logs():
    out = 'INFO starting\n{"run_id": "abc"}\nnot json {\n'
    assert last_json_line(out) == {"run_id": "abc"}
    assert last_json_line("nothing here") is None


def test_trials_split_evenly():
    assert tune.split_trials(10, 3) == [4, 3, 3]
    assert sum(tune.split_trials(2000, 4)) == 2000
    assert tune.split_trials(1, 2) == [1, 0]


def test_storage_url_is_a_secret():
    url = tune.storage_url(Secret("p@ss/word"), "127.0.0.1", 3306)
    assert url.reveal() == "mysql+pymysql://optuna:p%40ss%2Fword@127.0.0.1:3306/optuna"
    assert "p%40ss" not in str(url) and "p%40ss%2Fword" not in mask(f"x {url.reveal()} y")


def test_sample_payload_is_dataframe_split():
    payload = predict.load_payload(None)
    split = payload["dataframe_split"]
    assert split["columns"][0] == "alcohol" and split["data"] == [
        list(predict.SAMPLE_WINE.values())
    ]


def test_payload_from_csv_and_json(tmp_path):
    csv_file = tmp_path / "w.csv"
    csv_file.write_text('"alcohol";"pH";"quality"\n12.8;3.3;6\n9.5;3.1;5\n')
    split = predict.load_payload(str(csv_file))["dataframe_split"]
    assert split == {"columns": ["alcohol", "pH"], "data": [[12.8, 3.3], [9.5, 3.1]]}
    json_file = tmp_path / "p.json"
    json_file.write_text('{"inputs": [[1, 2]]}')
    assert predict.load_payload(str(json_file)) == {"inputs": [[1, 2]]}
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ActionError, match="not valid JSON"):
        predict.load_payload(str(tmp_path / "bad.json"))
    with pytest.raises(ActionError, match="No such file"):
        predict.load_payload(str(tmp_path / "missing.csv"))


def test_predictions_parse():
    assert predict.parse_predictions('{"predictions": [5.85, 6.1]}') == [5.85, 6.1]
    assert predict.parse_predictions("[[5.5]]") == [5.5]


def test_server_errors_become_one_line():
    missing = {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "Failed to predict data '   alcohol\n0     12.8'. \nError: Failed to enforce "
        "schema of data '   alcohol\n0     12.8' with schema '['pH': double (required)]'. "
        "Error: Model is missing inputs ['pH'].",
    }
    assert predict.server_error(json.dumps(missing)) == "Model is missing inputs ['pH']."
    not_json = {
        "message": "Invalid input. Ensure that input is a valid JSON formatted string. Error: "
        "'JSONDecodeError('Expecting value: line 1 column 1 (char 0)')'\nInput: \nb'{bad'\n"
    }
    assert predict.server_error(json.dumps(not_json)) == (
        "'JSONDecodeError('Expecting value: line 1 column 1 (char 0)')'"
    )
    no_format = {
        "message": "The input must be a JSON dictionary with exactly one of the input fields "
        "{'inputs'}. Received dictionary with input fields: []. IMPORTANT: The MLflow Model "
        "scoring protocol has changed"
    }
    assert predict.server_error(json.dumps(no_format)).endswith("input fields: [].")
    assert predict.server_error("Request processing time exceeded limit") == (
        "Request processing time exceeded limit"
    )
    assert len(predict.server_error("x" * 5000)) == 400


RUN = "0123456789abcdef" * 2


def test_serve_request_validation():
    serve.ServeRequest("wine", RUN, 54321, 1).validate()
    serve.ServeRequest("wine", RUN, 54321, 0).validate()  # one worker per CPU
    serve.ServeRequest("wine", "models:/a'b\"$(x);`y`@champion", 54321, 0).validate()  # quoted
    for bad, message in [
        (("Wine!", RUN, 54321, 1), "--name"),
        (("$(touch /tmp/x)", RUN, 54321, 1), "--name"),
        (("w", RUN, 80, 1), "--port 80"),
        (("w", RUN, 54321, -1), "--workers -1"),
        (("w", RUN, 54321, 17), "--workers 17"),
        (("w", "r; touch /tmp/x", 54321, 1), "--run"),
        (("w", "models:/a\nb@c", 54321, 1), "--model"),
    ]:
        with pytest.raises(UserError, match=message):
            serve.ServeRequest(*bad).validate()


def test_serve_steps_render_unit_and_env():
    req = serve.ServeRequest("wine", "models:/wine-elasticnet@champion", 54321, 1)
    steps = serve.serve_steps(req, "models:/m-123", LAYOUT)
    env = next(s for s in steps if s.label == "file /etc/mlflow-models/wine.env")
    assert "MODEL_URI=models:/m-123\n" in env.content and "PORT=54321\n" in env.content
    assert env.notify == ("mlflow-model@wine.service",)
    assert "WORKERS=1\n" in env.content and "BIND=127.0.0.1\n" in env.content
    unit = next(s for s in steps if s.label.endswith("mlflow-model@.service")).content
    assert f"ExecStart=/opt/anaconda/envs/demo/bin/python {serve.SERVER_PATH}\n" in unit
    assert "EnvironmentFile=/etc/mlflow-models/%i.env" in unit and "User=demo" in unit
    assert "Restart=on-failure" in unit and "ProtectSystem=strict" in unit
    # the program the unit runs, and the fast path it imports from its own directory
    script = next(s for s in steps if s.label == f"file {serve.SERVER_PATH}")
    assert "def main(" in script.content and "from fast_scoring import" in script.content
    fast = next(s for s in steps if s.label.endswith("/fast_scoring.py"))
    assert fast.path == serve.SERVER_PATH.replace("model_server.py", "fast_scoring.py")
    assert "class FastScorer" in fast.content
    assert script.notify == fast.notify == ("mlflow-model@wine.service",)


def test_model_server_socket_gets_tcp_nodelay():
    """Accepted connections get TCP_NODELAY from asyncio only when the listening socket says
    IPPROTO_TCP; uvicorn's own socket for --workers > 1 (protocol 0) does not get it."""
    import asyncio
    import socket

    from mlflow_stack.hostside import model_server

    async def nodelay_of(listener: socket.socket) -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        return value

    ours = model_server.listen("127.0.0.1", 0)
    assert asyncio.run(nodelay_of(ours)) != 0
    protocol_zero = socket.socket(socket.AF_INET)  # what uvicorn's Config.bind_socket makes
    protocol_zero.bind(("127.0.0.1", 0))
    protocol_zero.listen()
    assert asyncio.run(nodelay_of(protocol_zero)) == 0


def test_model_server_refuses_a_busy_port():
    from mlflow_stack.hostside import model_server

    taken = model_server.listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: "):
        model_server.listen("127.0.0.1", port)
    taken.close()


def test_model_server_workers_can_each_listen_on_the_port():
    from mlflow_stack.hostside import model_server

    first = model_server.listen("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    second = model_server.listen("127.0.0.1", port, reuse_port=True)
    assert second.getsockname() == first.getsockname()
    for sock in (first, second):
        sock.close()


def test_model_server_supervisor_exits_nonzero_when_a_worker_dies():
    import os
    import time

    from mlflow_stack.hostside import model_server

    sleeper = os.fork()
    if sleeper == 0:
        time.sleep(60)
        os._exit(0)
    crasher = os.fork()
    if crasher == 0:
        os._exit(3)
    # the crash stops the sleeper too (SIGTERM) and the supervisor reports the failure
    assert model_server.supervise({sleeper, crasher}) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)


def test_curl_example_uses_modern_payload():
    example = serve.curl_example(54321)
    assert "format=pandas-split" not in example and '"dataframe_split"' in example


def ok(text: str) -> F.ShellResult:
    return F.ShellResult(0, text)


HEALTHY = {
    "socket": ok("root@localhost\n"),
    "charset": ok("utf8mb4\tutf8mb4_bin\n"),
    "tables": ok("alembic_version\nexperiments\nruns\n"),
    "revision": ok("dc11669786a5\n"),
    "expected": ok(json.dumps({"head": "dc11669786a5", "tables": ["experiments", "runs"]})),
    "count experiments": ok("2\n"),
    "count runs": ok("5\n"),
    "count registered models": ok("1\n"),
}
ACTIVE = F.UnitInfo("loaded", "active", "running", "enabled", False)


def test_check_mysql_all_good():
    checks, counts = check_mysql.evaluate(HEALTHY, ACTIVE, "mariadb.service")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert counts == {"experiments": 2, "runs": 5, "registered models": 1}


def test_check_mysql_reports_what_is_wrong():
    broken = {
        **HEALTHY,
        "charset": ok("latin1\tlatin1_swedish_ci\n"),
        "tables": ok("alembic_version\nexperiments\nold_table\n"),
        "revision": ok("abc123\n"),
    }
    checks, _ = check_mysql.evaluate(broken, ACTIVE, "mariadb.service")
    failed = {c.name: c.detail for c in checks if not c.ok}
    assert failed["database mlflow in utf8mb4"] == "latin1 / latin1_swedish_ci"
    assert "missing: runs" in failed["tables match the installed MLflow"]
    assert "unexpected: old_table" in failed["tables match the installed MLflow"]
    assert failed["schema revision is the installed MLflow's head"].startswith("abc123")
    stopped = F.UnitInfo("loaded", "inactive", "dead", "enabled", False)
    down = {k: F.ShellResult(1, "") for k in HEALTHY}
    checks, counts = check_mysql.evaluate(down, stopped, "mariadb.service")
    assert not checks[0].ok and "systemctl start mariadb.service" in checks[0].hint
    assert counts["runs"] is None
    table = check_mysql.render_table(checks, counts)
    assert table.startswith("FAIL service mariadb.service")


def test_status_health_and_versions():
    assert status._health(ok('{"status": "OK"}\n200')) == "ok (200)"
    assert status._health(ok("\n000")) == "no answer"
    assert status._version(ok('{"version": "2.21.1"}\n200')) == "2.21.1"
    assert status._version(ok("3.17.2\n200")) == "3.17.2"


def test_urls_without_and_with_public_services():
    lines = status.urls(defaults(), "203.0.113.10", None, reveal=False)
    assert lines[0] == "MLflow   http://127.0.0.1:5000/"
    assert "token=<token>" in lines[1] and any("invoke tunnel" in line for line in lines)
    public = validate({"mlflow": {"public": True}, "jupyter": {"public": True}})
    lines = status.urls(public, "203.0.113.10", "tok", reveal=True)
    assert lines[0] == "MLflow   http://203.0.113.10:5000/"
    assert any("token=tok" in line for line in lines)


class AnsweringHost:
    """A host whose every command prints `stdout` with exit code `rc` (and records it)."""

    name = "h"

    def __init__(self, rc: int, stdout: str) -> None:
        self.answer = RunResult(rc, stdout, "", 0.0)
        self.scripts: list[str] = []

    def run(self, script: str, **kwargs) -> RunResult:
        self.scripts.append(script)
        return self.answer


@pytest.mark.parametrize(
    ("rc", "stdout", "expected"),
    [
        (0, "203.0.113.10", "203.0.113.10"),  # EC2 with a public IPv4
        (0, "203.0.113.10\n", "203.0.113.10"),
        (0, '<?xml version="1.0"?><Error>Not Found</Error>', "10.0.0.5"),  # no public IP
        (22, "", "10.0.0.5"),  # curl failed: no metadata service (not on EC2)
        (0, "999.1.2.3", "10.0.0.5"),
        (0, "", "10.0.0.5"),
    ],
)
def test_public_address_from_the_metadata_service(rc, stdout, expected):
    host = AnsweringHost(rc, stdout)
    assert status.public_address(host, "10.0.0.5") == expected
    (script,) = host.scripts  # IMDSv2: a session token first, then the address with it
    assert script.index("X-aws-ec2-metadata-token-ttl-seconds") < script.index("public-ipv4")


def test_tunnel_port_pairs():
    assert tunnel.forwards([5000, 8888], 10000) == [(15000, 5000), (18888, 8888)]


def test_served_instances_parse():
    out = ok("wine 54321\nchamp 54322\nbroken \n*.env \n")
    assert serve.parse_served(out) == {"wine": 54321, "champ": 54322}
    assert serve.parse_served(F.ShellResult(1, "")) == {}
