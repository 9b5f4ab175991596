"""``python -m trio_mojo._bench [args]``: the same as ``python -m trio_mojo bench``."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
