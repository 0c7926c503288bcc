"""Pure rendering of the files in `templates/` (StrictUndefined: a missing variable fails).

Every value handed to a template is made safe for the file it lands in before rendering
(`for_sink`), by the template's kind:

- systemd units (`systemd/*`): a value may not hold a control character, `%` (a specifier),
  `\\`, `$`, quotes, backticks or `;` (it would change the directive or the command line):
  refused;
- systemd environment files (`*.env.j2`): no control character; a value with spaces,
  quotes, `\\`, `$` or backticks is double-quoted with systemd's (POSIX shell's) escapes;
- shell files (`*.sh.j2`): quoted with `shlex.quote` when needed;
- ini files read by configparser (`*.ini.j2`): no control character, `%` doubled;
- anything else (config files, READMEs): no control character.

Strict patterns at the boundary (`inputs`, the inventory) already refuse most of this; this
is the same rule at the sink, so a new variable cannot slip a newline into a root-run unit.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from mlflow_stack import inputs
from mlflow_stack.engine.steps import StepError
from mlflow_stack.errors import UserError

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
_UNIT_UNSAFE = re.compile(r"[%\\$\"'`;]")
_ENV_SAFE = re.compile(r"^[^\s\\'\"$`]*$")


class RenderError(StepError, UserError):
    """A value cannot go into the file a template renders; one line naming both."""


@cache
def environment(root: Path = TEMPLATES_DIR) -> jinja2.Environment:
    """Templates under `root`; compiled ones are kept in Jinja2's per-user bytecode cache (a
    0700 directory in the temp dir, keyed by each template's source), not compiled per run."""
    try:
        compiled: jinja2.BytecodeCache | None = jinja2.FileSystemBytecodeCache()
    except RuntimeError:  # the temp dir's cache directory is not safely ours: compile
        compiled = None
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        bytecode_cache=compiled,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def sink(template: str) -> str:
    """The kind of file `template` renders: unit, env, shell, ini or text."""
    if template.startswith("systemd/"):
        return "unit"
    for suffix, kind in ((".env.j2", "env"), (".sh.j2", "shell"), (".ini.j2", "ini")):
        if template.endswith(suffix):
            return kind
    return "text"


def env_value(text: str) -> str:
    """A value for a systemd EnvironmentFile line: as is when inert, else double-quoted."""
    if _ENV_SAFE.match(text):
        return text
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def _refused(template: str, name: str, value: str, why: str) -> RenderError:
    from mlflow_stack.secrets import mask

    shown = inputs.show(mask(value))
    return RenderError(f"{template}: {name} {shown} cannot go into this file: {why}")


def _value(template: str, kind: str, name: str, value: str) -> str:
    if inputs.has_control(value):
        raise _refused(template, name, value, "control characters (newline, NUL, …)")
    if kind == "unit":
        if _UNIT_UNSAFE.search(value):
            raise _refused(
                template, name, value, "%, \\, $, quotes, backticks and ; are not allowed"
            )
        return value
    if kind == "env":
        return env_value(value)
    if kind == "shell":
        return shlex.quote(value)
    if kind == "ini":
        return value.replace("%", "%%")
    return value


def for_sink(template: str, name: str, value: Any) -> Any:
    """`value` (strings inside lists, tuples and dicts too) made safe for `template`'s file."""
    kind = sink(template)
    if isinstance(value, str):
        return _value(template, kind, name, value)
    if isinstance(value, (list, tuple)):
        return type(value)(for_sink(template, name, item) for item in value)
    if isinstance(value, dict):
        return {
            _value(template, "text", name, k) if isinstance(k, str) else k: for_sink(
                template, f"{name}.{k}", v
            )
            for k, v in value.items()
        }
    return value


def render(template: str, /, **variables: Any) -> str:
    """Render `templates/<name>` with `variables`, each made safe for that file first."""
    safe = {name: for_sink(template, name, value) for name, value in variables.items()}
    return environment().get_template(template).render(**safe)
