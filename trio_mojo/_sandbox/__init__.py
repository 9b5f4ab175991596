"""Sandbox policy for workers: what to apply, in the child, and how to check it.

Theory of operation
-------------------

A :class:`SandboxPolicy` names a level for every layer: ``REQUIRED`` (the
worker must not run target code without it), ``IF_AVAILABLE`` (applied when
the machine can, recorded in the report when not) or ``OFF``.  Nothing is
ever dropped silently:

1. **In the parent, before spawning**, :meth:`SandboxPolicy.check` compares
   the policy with what this build and machine can apply and raises
   :class:`SandboxUnavailableError` for a required layer that cannot be.
2. **In the child**, after its imports (which need the file system) and
   before any target code runs, :func:`apply_policy` applies the layers in
   order and returns a :class:`SandboxReport`.  A required layer that fails
   here is fatal: the bootstrap reports the failure and exits without
   calling the target.
3. **Back in the parent**, the report is the worker's first message, and
   :func:`verify_report` checks its claims against ``/proc/<pid>/status``
   and ``/proc/<pid>/limits``: a child cannot claim a layer it did not get.

Layers in this release:

* ``fd_hygiene`` (always on): the child holds only 0, 1, 2 and its
  channels; stdin is ``/dev/null``; a new session; ``PR_SET_PDEATHSIG``.
* ``rlimits``: ``RLIMIT_NOFILE`` (also caps the fds a worker can be sent),
  ``RLIMIT_CORE = 0``, optionally ``RLIMIT_FSIZE`` and ``RLIMIT_AS``.
* ``no_new_privs``: ``PR_SET_NO_NEW_PRIVS`` (no setuid elevation, ever).
* ``landlock``: no file-system right at all, no TCP bind/connect, no
  abstract unix sockets or signals outside the worker (``_landlock``).
  The worker still uses every fd it holds or is sent.
* ``namespaces``: new user (identity map of the worker's uid/gid), network
  (no interface up), IPC, UTS and mount namespaces (``_namespaces``),
  checked by the parent in ``/proc/<pid>/ns``.
* ``seccomp``: a system-call allowlist (``_seccomp``, x86_64); anything else
  gets ``EPERM``.  Checked by the parent (``Seccomp: 2`` in
  ``/proc/<pid>/status``).  On another architecture a policy that requires
  it raises :class:`SandboxUnavailableError` before spawning.

Running a worker with no sandbox at all takes the explicit, named opt-out
``SandboxPolicy.none(i_understand_this_is_unsandboxed=True)``.
"""

from __future__ import annotations

from ._policy import Requirement as Requirement
from ._policy import SandboxPolicy as SandboxPolicy
from ._report import SandboxReport as SandboxReport

__all__ = ["Requirement", "SandboxPolicy", "SandboxReport"]
