"""Role `anaconda`: the `mlflow` and `demo` Python environments under `python.prefix`/envs.

`manager: uv` (default) installs a pinned, checksum-verified uv and syncs each env from a
hashed requirements file; `manager: conda` installs Miniforge and builds the envs from
environment files. Either way an env is rebuilt only when its requirements changed.
"""

from __future__ import annotations

import json
import re

from mlflow_stack import layout, role_facts
from mlflow_stack.engine import facts as F
from mlflow_stack.engine.context import RoleContext
from mlflow_stack.engine.role import Role
from mlflow_stack.engine.steps import Apt, Directory, File, Run, Step, q
from mlflow_stack.env_requirements import digest, requirements_of
from roles import mlflow_server

# env → the unit restarted when it is synced again
ENVS = {layout.MLFLOW_ENV: layout.MLFLOW_UNIT, layout.DEMO_ENV: layout.JUPYTER_UNIT}
STAMP = role_facts.STAMP
UV_VERSION = "0.13.9"
UV_WHEELS = {
    "x86_64": (
        "https://files.pythonhosted.org/packages/3d/aa/"
        "26d64642d808de4a652579ef950d7cd2d37f080a8babf9c67c6b75fc4c3f/"
        f"uv-{UV_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19",
    ),
    "aarch64": (
        "https://files.pythonhosted.org/packages/fe/2f/"
        "51a5de367c602592c018a42a23d57fba5f2689fe6c3bf025dcf043b39c61/"
        f"uv-{UV_VERSION}-py3-none-manylinux_2_28_aarch64.whl",
        "ecb6028d79dc96fbeafffe5c8af62a7099487ebc05a701e76714eebcffd06375",
    ),
}
UV_CACHE = "/var/cache/mlflow-stack/uv"
UV_ENV = (
    "export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_PYTHON_DOWNLOADS=never "
    f"UV_CACHE_DIR={UV_CACHE} UV_LINK_MODE=hardlink UV_NO_PROGRESS=1"
)
# The envs hardlink into the cache, so removing it frees only what no env uses; it holds
# ~100k small files, so it is moved aside at once and deleted in the background.
PRUNE_CACHE = (
    f"[ -d {UV_CACHE} ] || exit 0; trash={UV_CACHE}.trash-$$; mv {UV_CACHE} $trash && "
    "systemd-run --quiet --no-block --collect --unit=mlflow-stack-prune-$$ rm -rf $trash"
)


def requirements_for(ctx: RoleContext, env: str) -> str:
    """The requirements an env is synced from: the pinned file, or (uv) the file the
    `python.requirements` variable names for it, read on the controller."""
    return requirements_of(ctx.vars, env)


MLFLOW_PIN = re.compile(r"^mlflow(?:\[[^\]]*\])?==([\w.+-]+)", re.M)


def mlflow_version(text: str) -> str:
    """The MLflow version a requirements (or environment) file pins ("" if none)."""
    found = MLFLOW_PIN.search(text) or re.search(r"- mlflow(?:\[[^\]]*\])?=+([\w.+-]+)", text)
    return found[1] if found else ""


def env_step_id(env: str) -> str:
    """The id of the step that syncs env `env` (other roles act on its changes)."""
    return f"anaconda:env:{env}"


def stamp_fact(prefix: str, env: str) -> F.Fact:
    """The requirements hash recorded in an env after its last successful sync."""
    return role_facts.EnvStamp(layout.env_dir(prefix, env))


def env_is_current(result: F.ShellResult, text: str) -> bool:
    return result.ok and result.output.strip() == digest(text)


def install_uv_script(prefix: str) -> str:
    """Download the pinned uv wheel, verify its sha256, extract the binary."""
    cases = " ".join(f"{arch}) url={q(url)}; sha={sha};;" for arch, (url, sha) in UV_WHEELS.items())
    member = f"uv-{UV_VERSION}.data/scripts/uv"
    extract = (
        "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
        "open(sys.argv[3], 'wb').write(z.read(sys.argv[2]))"
    )
    return (
        f'set -e; case "$(uname -m)" in {cases} '
        '*) echo "no pinned uv wheel for $(uname -m)" >&2; exit 1;; esac; '
        "tmp=$(mktemp -d); trap 'rm -rf \"$tmp\"' EXIT; "
        'curl -fsSL --retry 3 -o "$tmp/uv.whl" "$url"; '
        'echo "$sha  $tmp/uv.whl" | sha256sum -c --quiet -; '
        f'python3 -c {q(extract)} "$tmp/uv.whl" {member} "$tmp/uv"; '
        f'install -m 0755 "$tmp/uv" {q(prefix)}/bin/uv'
    )


def sync_env_script(prefix: str, env: str, into: str = "") -> str:
    """Create the env if needed, sync it exactly to the hashed requirements, stamp it.
    `into`: another directory (the env beside the serving one), made relocatable so that it
    can be renamed into place."""
    path, req = into or layout.env_dir(prefix, env), f"{prefix}/requirements/{env}.txt"
    relocatable = " --relocatable" if into else ""
    return (
        f"set -e; {UV_ENV}; "
        f"[ -x {path}/bin/python ] || "
        f"{prefix}/bin/uv venv -q{relocatable} --python /usr/bin/python3 {path}; "
        f"{prefix}/bin/uv pip sync -q --require-hashes "
        f"--python {path}/bin/python {req}; "
        f"sha256sum < {req} | cut -d' ' -f1 > {path}/{STAMP}"
    )


def uv_steps(ctx: RoleContext, prefix: str) -> list[Step]:
    version = role_facts.UvVersion(prefix)
    steps: list[Step] = [
        Apt(("python3", "ca-certificates", "curl")),
        *(Directory(f"{prefix}{sub}") for sub in ("", "/bin", "/requirements", "/envs")),
        Run(
            f"uv {UV_VERSION}",
            install_uv_script(prefix),
            when=lambda c: c[version].output.split()[1:2] != [UV_VERSION],
            needs=(version,),
        ),
    ]
    for env, unit in ENVS.items():
        text = requirements_for(ctx, env)
        stamp = stamp_fact(prefix, env)
        steps.append(
            File(f"{prefix}/requirements/{env}.txt", text, label=f"requirements of env {env}")
        )
        if env == layout.MLFLOW_ENV:
            steps += mlflow_env_steps(prefix, text, stamp)
            continue
        steps.append(
            Run(
                f"env {env}",
                sync_env_script(prefix, env),
                when=lambda c, stamp=stamp, text=text: not env_is_current(c[stamp], text),
                needs=(stamp,),
                notify=(unit,),
                id=env_step_id(env),
            )
        )
    cache = F.PathState(UV_CACHE)
    synced = {env_step_id(env) for env in ENVS} | {NEXT_ENV_ID}
    steps.append(
        Run(
            "prune uv cache",
            PRUNE_CACHE,
            when=lambda c: c[cache] is not None or bool(synced & c.changed),
            needs=(cache,),
        )
    )
    return steps


# --- the mlflow env: a new one is built beside the serving one (issue #19) ----------------


def next_env(prefix: str) -> str:
    """Where a changed mlflow env is built while the current one serves on."""
    return layout.env_dir(prefix, layout.MLFLOW_ENV) + layout.NEXT_SUFFIX


NEXT_ENV_ID = env_step_id(layout.MLFLOW_ENV + layout.NEXT_SUFFIX)


def next_stamp_fact(prefix: str) -> F.Fact:
    """The requirements hash of the env built beside the serving one (after its sync)."""
    return role_facts.EnvStamp(next_env(prefix))


def mlflow_env_steps(prefix: str, text: str, stamp: F.Fact) -> list[Step]:
    """The tracking server's env. A first one is synced in place. A changed one is synced
    beside it (`mlflow.next`) while the server goes on serving; the mlflow_server role backs
    up, migrates and switches to it once that worked (`stackdata.py upgrade`), so a failed
    migration leaves the previous MLflow serving. A leftover `mlflow.next` whose wanted
    requirements are the serving env's again (a pin reverted) is removed."""
    env = layout.MLFLOW_ENV
    path, beside = layout.env_dir(prefix, env), next_env(prefix)
    exists = F.PathState(f"{path}/pyvenv.cfg")
    next_stamp = next_stamp_fact(prefix)
    leftover = F.PathState(beside)
    current = lambda c: env_is_current(c[stamp], text)  # noqa: E731
    return [
        Run(
            f"env {env}",
            sync_env_script(prefix, env),
            when=lambda c: not current(c) and c[exists] is None,
            needs=(stamp, exists),
            notify=(ENVS[env],),
            id=env_step_id(env),
        ),
        # its bytecode compiles while MariaDB installs
        mlflow_server.warm_bytecode_step(path, env_step_id(env)),
        Run(
            f"env {env} (new, beside the serving one)",
            sync_env_script(prefix, env, into=beside),
            when=lambda c: (
                not current(c) and c[exists] is not None and not env_is_current(c[next_stamp], text)
            ),
            needs=(stamp, exists, next_stamp),
            id=NEXT_ENV_ID,
        ),
        Run(
            f"env {env}.next removed (the serving env is the wanted one)",
            f"rm -rf {q(beside)}",
            when=lambda c: current(c) and c[leftover] is not None,
            needs=(stamp, leftover),
        ),
    ]


# --- conda (verified as a plan only: conda channels are unreachable from CI) -----------


def parse_conda_envs(output: str) -> tuple[str, ...]:
    """Env prefixes from `conda env list --json` (empty when conda is absent)."""
    try:
        return tuple(json.loads(output).get("envs", ()))
    except (json.JSONDecodeError, AttributeError):
        return ()


def install_miniforge_script(prefix: str, url: str, sha256: dict[str, str]) -> str:
    cases = " ".join(f"{arch}) sha={sha};;" for arch, sha in sha256.items())
    return (
        f'set -e; arch=$(uname -m); case "$arch" in {cases} '
        '*) echo "no Miniforge checksum for $arch in python.miniforge_sha256" >&2; exit 1;; '
        "esac; tmp=$(mktemp -d); trap 'rm -rf \"$tmp\"' EXIT; "
        f'url=$(echo {q(url)} | sed "s/{{arch}}/$arch/"); '
        'curl -fsSL --retry 3 -o "$tmp/miniforge.sh" "$url"; '
        'echo "$sha  $tmp/miniforge.sh" | sha256sum -c --quiet -; '
        f'bash "$tmp/miniforge.sh" -b -u -p {q(prefix)}; '
        f"{q(prefix)}/bin/conda config --system --remove-key channels 2>/dev/null || true; "
        f"{q(prefix)}/bin/conda config --system --add channels conda-forge"
    )


def sync_conda_env_script(prefix: str, env: str, exists: bool) -> str:
    path, spec = layout.env_dir(prefix, env), f"{prefix}/requirements/{env}.yml"
    verb = f"env update --prune -p {path}" if exists else f"env create -p {path}"
    return (
        f"set -e; {prefix}/bin/conda {verb} -f {spec} --quiet; "
        f"{prefix}/bin/conda clean --all --yes --quiet; "
        f"sha256sum < {spec} | cut -d' ' -f1 > {path}/{STAMP}"
    )


def conda_steps(ctx: RoleContext, prefix: str) -> list[Step]:
    pv = ctx.vars.python
    conda = F.PathState(f"{prefix}/bin/conda")
    envs = role_facts.CondaEnvs(prefix)
    steps: list[Step] = [
        Apt(("ca-certificates", "curl", "bzip2")),
        Run(
            "Miniforge",
            install_miniforge_script(prefix, pv.miniforge_url, pv.miniforge_sha256),
            when=lambda c: c[conda] is None,
            needs=(conda,),
        ),
        Directory(f"{prefix}/requirements"),
    ]
    for env, unit in ENVS.items():
        text = requirements_for(ctx, env)
        stamp = stamp_fact(prefix, env)
        path = layout.env_dir(prefix, env)
        steps += [
            File(f"{prefix}/requirements/{env}.yml", text, label=f"environment of env {env}"),
            Run(
                f"env {env}",
                lambda c, path=path, env=env: sync_conda_env_script(
                    prefix, env, exists=path in parse_conda_envs(c[envs].output)
                ),
                when=lambda c, stamp=stamp, text=text: not env_is_current(c[stamp], text),
                needs=(stamp, envs),
                notify=(unit,),
                id=env_step_id(env),
            ),
        ]
    return steps


def build(ctx: RoleContext) -> list[Step]:
    prefix = ctx.vars.python.prefix
    if ctx.vars.python.manager == "conda":
        return conda_steps(ctx, prefix)
    return uv_steps(ctx, prefix)


role = Role("anaconda", build)
