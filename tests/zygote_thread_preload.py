"""A preload that starts a thread at import: a zygote must then refuse to fork."""

from __future__ import annotations

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="started by a preload", daemon=True).start()
