"""Locking a worker down: every layer of a policy, in order, in one call.

Theory of operation
-------------------

:func:`lock_down` is the whole child side of the sandbox.  It runs in the
worker after its imports (which need the file system) and before any of
its target's code, and it assumes nothing about how the process started:
a freshly ``exec``'d bootstrap and a child forked from a pre-imported
zygote call it alike, with the policy and the fds the worker keeps.  In
order, each step needing the ones before it:

1. **fd hygiene** (always): close every fd but 0, 1, 2 and ``keep_fds``;
   note the fd table and the thread count while ``/proc`` is reachable.
2. **credentials**, first phase, root only: drop to the policy's
   unprivileged uid and gid (``_credentials``), then re-arm the parent-death
   signal the uid change cleared.
3. **namespaces**: user, network, IPC, UTS (own host name), mount and PID
   (``_namespaces``), then fork into the PID namespace (``_pidns``): from
   here on this code runs in the worker process proper, and the calling
   process is its supervisor, which never returns from this call.  A
   process that was forked into a PID namespace of its own already
   (``own_pid_namespace``: a zygote's, ``_pidns.NamespaceForker``) makes
   the other namespaces only, and does not fork.
4. **rootfs**: an empty read-only root (``_rootfs``); needs 3.
5. **rlimits**: ``NOFILE``, ``CORE`` 0, and ``FSIZE``, ``AS``, ``DATA`` as
   set; ``NPROC`` only inside a user namespace of the worker's own, where
   the kernel counts the worker's tasks alone.
6. **credentials**, second phase: no capability left in any set, and not
   dumpable when the uid was dropped.
7. **no_new_privs**, 8. **landlock**, 9. **seccomp** (last, so that the
   others could still make their system calls; the filter names the
   worker's own pid as the worker sees it, 2 in its PID namespace).  The
   program is built once per process and pid: a zygote builds it before
   forking (:func:`prepare`), so its workers only load it.

Each layer is applied if its level is not ``OFF``.  A failure is recorded
as ``"unavailable: <reason>"``; for a ``REQUIRED`` layer it also stops the
lockdown at once, and the report's ``failed`` tells the caller not to run
the target.  Landlock and the namespaces need a single-threaded process,
which step 1 checks; nothing here starts a thread.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
from collections.abc import Callable, Collection
from typing import Final

from . import _credentials, _landlock, _namespaces, _pidns, _rootfs, _seccomp
from ._libc import prctl
from ._policy import Requirement, SandboxPolicy
from ._report import SandboxReport

__all__ = [
    "close_other_fds",
    "lock_down",
    "prepare",
    "rlimits_of",
    "set_parent_death_signal",
]

_R = Requirement
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38
_ORPHANED_EXIT: Final = 70
"""Exit status when the parent died before the death signal was armed."""
_FD_CEILING: Final = 2**31 - 1
"""Above any fd number: ``closerange`` uses ``close_range(2)``, so this is cheap."""


def set_parent_death_signal(expected_parent: int) -> None:
    """Die with SIGKILL when the parent dies; exit now if it already has."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(_ORPHANED_EXIT)  # the parent died before the signal was armed


def close_other_fds(keep: Collection[int]) -> None:
    """Close every fd above 2 that is not in ``keep``."""
    low = 3
    for fd in sorted({*keep, _FD_CEILING}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


class _Lockdown:
    """The layers applied so far, and the first required one that failed."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy
        self.layers: dict[str, str] = {"fd_hygiene": "applied"}
        self.failed: str | None = None
        self.reason: str | None = None

    def apply(self, layer: str, action: Callable[[], None]) -> None:
        """Apply ``layer`` (or a further phase of it) unless it is off or failed."""
        level = self.policy.level(layer)
        if self.failed is not None or self.layers.get(layer, "applied") != "applied":
            return
        if level is _R.OFF:
            self.layers[layer] = "off"
            return
        try:
            action()
        except OSError as exc:
            self.layers[layer] = f"unavailable: {exc}"
            if level is _R.REQUIRED:
                self.failed, self.reason = layer, str(exc)
            return
        self.layers[layer] = "applied"

    def applied(self, layer: str) -> bool:
        return self.layers.get(layer) == "applied"


def lock_down(
    policy: SandboxPolicy, keep_fds: Collection[int], *, own_pid_namespace: bool = False
) -> SandboxReport:
    """Apply ``policy`` to this process, every layer in order, and report.

    With the namespaces layer this forks (see the module docstring): the
    call returns in the worker process only; with ``own_pid_namespace``
    (this process was forked into a new PID namespace, as its pid 2, by
    ``_pidns.NamespaceForker``) it does not.  Stops at the first required
    layer that fails; the report then names it and the caller must not run
    target code.
    """
    parent = os.getppid()
    close_other_fds(keep_fds)
    fds = tuple(sorted(_open_fds()))  # while /proc is still reachable
    threads = len(os.listdir("/proc/self/task"))
    as_root = os.geteuid() == 0
    run = _Lockdown(policy)

    def single_threaded(layer: str) -> None:
        if threads != 1:
            raise OSError(
                f"{layer} needs a single-threaded process ({threads} threads)"
            )

    def drop_identity() -> None:
        _credentials.drop_identity(policy.worker_uid, policy.worker_gid)
        set_parent_death_signal(parent)  # a uid change clears it

    def enter_namespaces() -> None:
        single_threaded("namespaces")
        _namespaces.unshare(pid=not own_pid_namespace)
        if not own_pid_namespace:
            _pidns.fork_into_namespace()  # returns in the worker only

    def empty_root() -> None:
        if not run.applied("namespaces"):
            raise OSError("the empty root needs the namespaces layer")
        _rootfs.enter_empty_root()

    def drop_capabilities() -> None:
        _credentials.drop_capabilities()
        if as_root:  # the uid was dropped: no process of that uid may ptrace it
            _credentials.set_dumpable(False)

    def landlock() -> None:
        single_threaded("landlock")
        _landlock.restrict_self()

    if as_root:
        run.apply("credentials", drop_identity)
    run.apply("namespaces", enter_namespaces)
    run.apply("rootfs", empty_root)
    run.apply("rlimits", lambda: _set_rlimits(policy, run.applied("namespaces")))
    run.apply("credentials", drop_capabilities)
    run.apply("no_new_privs", _set_no_new_privs)
    run.apply("landlock", landlock)
    run.apply("seccomp", _install_seccomp)
    return SandboxReport(
        policy=policy.name,
        pid=os.getpid(),
        uid=os.getuid(),
        layers=run.layers,
        fds=fds,
        failed=run.failed,
        reason=run.reason,
    )


def rlimits_of(policy: SandboxPolicy, own_user_namespace: bool) -> dict[str, int]:
    """The rlimits (by ``RLIMIT_`` suffix) ``policy`` sets on a worker."""
    wanted = {
        "CORE": 0,
        "NOFILE": policy.max_open_files,
        "FSIZE": policy.max_file_size,
        "AS": policy.max_address_space,
        "DATA": policy.max_data,
        "NPROC": policy.max_processes if own_user_namespace else None,
    }
    return {name: value for name, value in wanted.items() if value is not None}


def _set_rlimits(policy: SandboxPolicy, own_user_namespace: bool) -> None:
    for name, value in rlimits_of(policy, own_user_namespace).items():
        try:
            resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
        except (ValueError, OverflowError) as exc:
            # resource reports EPERM and EINVAL as ValueError; a failed layer
            # must be an OSError to be reported (not a crash of the bootstrap).
            raise OSError(f"setrlimit(RLIMIT_{name}, {value}): {exc}") from exc


def _set_no_new_privs() -> None:
    prctl(_PR_SET_NO_NEW_PRIVS, 1)


def prepare(worker_pid: int = _pidns.WORKER_PID) -> None:
    """Build, once, what :func:`lock_down` would build in every worker.

    For a process that forks workers (a zygote): the seccomp program for a
    worker whose pid is ``worker_pid``, so that each worker forked
    afterwards only loads it.  Nothing is applied to this process.
    """
    if _seccomp.SUPPORTED:
        _seccomp_filter(worker_pid)


@functools.cache
def _seccomp_filter(own_pid: int) -> _seccomp.CompiledFilter:
    return _seccomp.CompiledFilter(_seccomp.build_filter(own_pid))


def _install_seccomp() -> None:
    _set_no_new_privs()  # the kernel requires it (or CAP_SYS_ADMIN)
    _seccomp.install(_seccomp_filter(os.getpid()))


def _open_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # listdir's own directory fd, closed by now
        fds.append(fd)
    return fds
