"""A preload whose import fails with an error of its own."""

from __future__ import annotations

raise RuntimeError("this preload is broken on purpose")
