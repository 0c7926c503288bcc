"""The wine data for tests: the copy shipped with demo_wine."""

from __future__ import annotations

from demo_wine.data import BUNDLED as WINE_CSV

__all__ = ["WINE_CSV"]
