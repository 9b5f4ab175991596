"""Worker processes: spawning with a channel, the child bootstrap, ``open_worker``
and the file broker.

* ``_spawn``: start a child with ``--mojo-platform-channel-handle=N``, own and
  reap it (Chromium's launch convention; any program can be the child);
* ``_bootstrap``: the child's entry point (``python -I -m
  trio_mojo._workers._bootstrap``): fd hygiene, imports, sandbox, report;
* ``_worker``: ``open_worker``, the parent's side of one sandboxed worker;
* ``_broker``: the file broker (the parent opens files for the worker).
"""
