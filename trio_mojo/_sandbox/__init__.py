"""Sandbox policy for workers: what to apply, in the child, and how to check it.

Theory of operation
-------------------

A :class:`SandboxPolicy` names a level for every layer: ``REQUIRED`` (the
worker must not run target code without it), ``IF_AVAILABLE`` (applied when
the machine can, recorded in the report when not) or ``OFF``.  Nothing is
ever dropped silently:

1. **In the parent, before spawning**, :meth:`SandboxPolicy.check` probes,
   with calls that change nothing (``_probe``), what this process could give
   a worker, and raises :class:`SandboxUnavailableError` for a required
   layer that cannot be applied (a kernel without it, or a seccomp filter
   the parent itself runs under).
2. **In the child**, after its imports (which need the file system) and
   before any target code runs, ``_apply.lock_down`` applies every layer in
   order and returns a :class:`SandboxReport`.  A required layer that fails
   there is fatal: the bootstrap reports the failure and exits without
   calling the target.
3. **Back in the parent**, the report is the worker's first message;
   ``_verify.verify_report`` checks its claims against ``/proc/<pid>``
   (``status``, ``limits``, ``ns``, ``root``), and only then does the
   worker get its go-ahead (``trio_mojo._workers._handshake``): a child
   cannot claim a layer it did not get, and no target code runs unchecked.

The layers, in the order the worker applies them (``docs/security.rst``
has the details, the threat model and the measured escape matrix):

* ``fd_hygiene`` (always on): the child holds only 0, 1, 2 and its
  channels; stdin is ``/dev/null``; a new session; ``PR_SET_PDEATHSIG``.
* ``credentials`` (``_credentials``): a root parent's worker drops to an
  unprivileged uid and gid (default ``nobody``/``nogroup``) and, after the
  namespaces, holds no capability in any set and is not dumpable.
* ``namespaces`` (``_namespaces``, ``_pidns``): new user (identity map of
  the worker's uid), network, IPC, UTS (own host name), mount and PID
  namespaces; in the PID namespace a supervisor outside, an init (pid 1)
  that reaps, and the worker (pid 2) that runs the target (a root
  zygote's worker has no supervisor: the zygote is its parent).
* ``rootfs`` (``_rootfs``): an empty read-only tmpfs as the root; no path
  resolves.
* ``rlimits``: ``RLIMIT_NOFILE`` (also caps the fds a worker can be sent),
  ``RLIMIT_CORE = 0``, ``RLIMIT_DATA``, ``RLIMIT_NPROC`` (in the worker's
  own user namespace), optionally ``RLIMIT_FSIZE`` and ``RLIMIT_AS``.
* ``no_new_privs``: ``PR_SET_NO_NEW_PRIVS`` (no setuid elevation, ever).
* ``landlock`` (``_landlock``): no file-system right at all, no TCP
  bind/connect, no abstract unix sockets or signals outside the worker.
  The worker still uses every fd it holds or is sent.
* ``seccomp`` (``_seccomp``): a system-call allowlist (x86_64, aarch64;
  the numbers in ``_syscalls``); anything else gets ``EPERM``.  On another architecture a policy that requires it
  raises :class:`SandboxUnavailableError` before spawning.

Running a worker with no sandbox at all takes the explicit, named opt-out
``SandboxPolicy.none(i_understand_this_is_unsandboxed=True)``.  The
catalogue of escape attempts (``_escapes``) runs as a worker's target; its
measured outcomes are ``docs/security.rst``'s escape matrix.
"""

from __future__ import annotations

from ._policy import Requirement as Requirement
from ._policy import SandboxPolicy as SandboxPolicy
from ._report import SandboxReport as SandboxReport

__all__ = ["Requirement", "SandboxPolicy", "SandboxReport"]
