"""``python -m trio_mojo._bench._runner ROLE ...``: a benchmark child process."""

from __future__ import annotations

import sys

from ._harness import process_main

if __name__ == "__main__":
    sys.exit(process_main(sys.argv[1:]))
