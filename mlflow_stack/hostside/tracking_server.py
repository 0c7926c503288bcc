"""Run the MLflow tracking server in this one Python process.

`mlflow server` imports MLflow, checks the stores, then starts uvicorn as a second Python
process that imports all of MLflow again (≈ half of the start-up time). This launcher sets the
same environment `mlflow server` hands to uvicorn, initialises the stores here (a store that
cannot be reached fails the start, as with `mlflow server`; the stores it builds are the ones
the requests use), then serves the same app with uvicorn in this process (with --workers > 1
uvicorn starts worker processes, as `mlflow server` does).

    python server.py --host H --port P --workers N --artifacts-destination DIR
                     [--allowed-hosts a,b] [--app-name basic-auth]

The backend store URI comes from MLFLOW_BACKEND_STORE_URI (the unit's 0600 EnvironmentFile),
never from the command line. `server_env()` is compared with `mlflow server`'s own in a test.
"""

from __future__ import annotations

import argparse
import os
import uuid

APPS = {
    None: ("mlflow.server.fastapi_app:app", False),
    "basic-auth": ("mlflow.server.auth:create_app", True),  # a factory
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="append", help="an address to listen on (repeatable)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--artifacts-destination", required=True)
    parser.add_argument("--allowed-hosts", default=None)
    parser.add_argument("--app-name", choices=[name for name in APPS if name], default=None)
    return parser.parse_args(argv)


def server_env(backend_uri: str, artifacts_destination: str, allowed_hosts: str | None) -> dict:
    """What `mlflow server --artifacts-destination D [--allowed-hosts H]` puts in uvicorn's env."""
    from mlflow.environment_variables import (
        _MLFLOW_IN_JOB_EXECUTOR,
        _MLFLOW_SERVER_BOOT_ID,
        _MLFLOW_SGI_NAME,
        MLFLOW_ENABLE_WORKSPACES,
    )
    from mlflow.server import constants as c
    from mlflow.utils.server_cli_utils import resolve_default_artifact_root

    env = {
        c.BACKEND_STORE_URI_ENV_VAR: backend_uri,
        c.REGISTRY_STORE_URI_ENV_VAR: backend_uri,
        c.ARTIFACT_ROOT_ENV_VAR: resolve_default_artifact_root(True, None, backend_uri),
        c.SERVE_ARTIFACTS_ENV_VAR: "true",
        c.ARTIFACTS_DESTINATION_ENV_VAR: artifacts_destination,
        _MLFLOW_SERVER_BOOT_ID.name: uuid.uuid4().hex,
        _MLFLOW_IN_JOB_EXECUTOR.name: "false",
        _MLFLOW_SGI_NAME.name: "uvicorn",
        MLFLOW_ENABLE_WORKSPACES.name: "false",
        # `mlflow server`'s defaults for options the unit does not set
        "MLFLOW_SERVER_X_FRAME_OPTIONS": "SAMEORIGIN",
        c.SECRETS_CACHE_TTL_ENV_VAR: "60",
        c.SECRETS_CACHE_MAX_SIZE_ENV_VAR: "1000",
    }
    if allowed_hosts:
        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = allowed_hosts
    return env


def main() -> None:
    args = parse_args()
    backend_uri = os.environ.get("MLFLOW_BACKEND_STORE_URI")
    if not backend_uri:
        raise SystemExit("MLFLOW_BACKEND_STORE_URI is not set (see the unit's EnvironmentFile)")
    os.environ.update(server_env(backend_uri, args.artifacts_destination, args.allowed_hosts))

    import uvicorn
    from mlflow.server import _UVICORN_LOG_CONFIG
    from mlflow.server.handlers import initialize_backend_stores
    from mlflow.tracing.trace_rollup_service import validate_sql_trace_rollup_startup

    artifact_root = os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"]
    initialize_backend_stores(backend_uri, backend_uri, artifact_root)
    validate_sql_trace_rollup_startup(backend_uri)
    app, factory = APPS[args.app_name]
    hosts = args.host or ["127.0.0.1"]
    settings = {"port": args.port, "workers": args.workers, "factory": factory}
    if len(hosts) == 1:
        uvicorn.run(app, host=hosts[0], log_config=str(_UVICORN_LOG_CONFIG), **settings)
        return
    serve_on(
        hosts, uvicorn.Config(app, host=hosts[0], log_config=str(_UVICORN_LOG_CONFIG), **settings)
    )


def serve_on(hosts: list[str], config) -> None:
    """What `uvicorn.run` does, on one socket per address (it binds one address only)."""
    import socket

    from uvicorn import Server
    from uvicorn.supervisors import Multiprocess

    sockets = []
    for host in hosts:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, config.port))
        sock.set_inheritable(True)
        sockets.append(sock)
    if config.workers > 1:
        Multiprocess(config, sockets=sockets).run()
    else:
        config.load_app()
        Server(config=config).run(sockets=sockets)


if __name__ == "__main__":
    main()
