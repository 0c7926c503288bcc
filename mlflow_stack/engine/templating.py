"""Pure rendering of the files in `templates/` (StrictUndefined: a missing variable fails)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"


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


def render(template: str, /, **variables: Any) -> str:
    """Render `templates/<name>` with `variables`."""
    return environment().get_template(template).render(**variables)
