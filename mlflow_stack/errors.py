"""The one error type a user sees: a failure whose message is one line naming the problem
and the fix. Every layer's own errors derive from it, so a task reports any of them alike."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on; `str()` is one line naming the problem and the fix."""
