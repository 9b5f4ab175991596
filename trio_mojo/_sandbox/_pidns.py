"""The PID namespace: a supervisor, an init, and the worker.

Theory of operation
-------------------

``unshare(CLONE_NEWPID)`` (done by ``_namespaces``) moves only the
caller's future children into the new PID namespace; its first child is
that namespace's init (pid 1).  An init is special: it ignores every
signal it has no handler for, even ``SIGKILL`` from inside its namespace,
and when it dies the kernel kills everything else in the namespace.  A
target running as pid 1 could not be stopped with ``SIGTERM`` and could
not even kill itself.  So :func:`fork_into_namespace` forks twice, as
bubblewrap and Chromium (``CreateInitProcessReaper``) keep a separate
pid 1::

    supervisor (the caller; host pid P, outside the namespace)
     ├── init (pid 1 inside): holds the namespace, reaps orphans
     └── worker (pid 2 inside): the one process that returns here

* The **worker** is an ordinary process: signals, exit status and
  ``getpid()`` (2) behave as usual; it sees no process outside the
  namespace (``kill``, ``sched_getaffinity`` or ``ptrace`` of a host pid
  fail with ``ESRCH``).  Its own children, if it may have any, are
  reparented to the init when it dies.
* The **init** holds nothing but the read end of a pipe only the supervisor
  can write to.  It ignores ``SIGCHLD``, so the kernel reaps the orphans
  it inherits, and it waits for that pipe to close.
* The **supervisor** is the process the launcher started and waits for.  It
  closes every fd but stdio and its pipe (the channels belong to the
  worker), drops its capabilities, and waits for the worker, its own child.
  Then it kills the init (which empties the namespace: the kernel kills
  whatever is left and the init's exit waits for it), reaps it, and exits
  *the way the worker did*: the same exit code, or the same signal sent to
  itself.  So its launcher sees the worker's real status (negative for a
  signal), exactly as if it had started the worker itself.

Dying together: the init and the worker have ``PR_SET_PDEATHSIG(SIGKILL)``
towards the supervisor (the kernel delivers it to an init because it comes
from outside the namespace).  Each checks that the supervisor did not die
before the signal was armed: the worker sees its parent pid turn from 0
(outside the namespace) to 1 (reparented to the init), the init sees the
pipe close.  The supervisor has the death signal its own launcher armed.
So killing the worker ends all three in order, each reaped (no zombie),
and killing the supervisor or its launcher kills the other two.  The worker
is on the critical path of start-up only for two forks by the supervisor.

The launcher learns the worker's host pid from the kernel, not from the
worker: :func:`worker_pid` reads the supervisor's children in
``/proc/<pid>/task/<pid>/children`` and takes the one that is not pid 1 of
its namespace.

Forked from outside: no supervisor
----------------------------------

A process that forks many workers and outlives them all (a zygote) is
already what a supervisor is for: their parent, which reaps them and
passes their exit status on.  When it may create PID namespaces itself
(``CAP_SYS_ADMIN``: a root zygote), :class:`NamespaceForker` forks each
worker straight into a new one, and the supervisor, its two extra forks
and its copy-on-write faults go away::

    zygote (outside, for all its workers)
     ├── init (pid 1 inside): as above, but forked by the zygote
     └── worker (pid 2 inside): the zygote's own child

For each worker it enters a new PID namespace for its children
(``unshare(CLONE_NEWPID)``), forks the init, forks the worker, and goes
back to its own namespace for its next children (``setns``).  The worker
is the same pid 2 next to an init, so signals, exit statuses and
``getpid()`` behave as above, and the zygote sees the worker's own exit
status.  The init (forked without Python's at-fork handlers, which it does
not need) closes every fd, takes the lowest priority (the worker it was
forked with needs the CPU, an init that waits does not), drops to the
worker's unprivileged uid and gid, and ignores ``SIGCHLD``; it dies with the zygote
(``PR_SET_PDEATHSIG``; it checks a pidfd of the zygote afterwards, as its
parent lives outside its namespace and ``getppid()`` says 0 either way),
and with it the whole namespace: the worker, whose own death signal
points at the zygote too, cannot outlive it even if the zygote died before
that signal was armed (or re-armed, after the uid drop).  The zygote kills
the init once it has reaped the worker, and the kernel's rule that an
init's exit waits until every process of its namespace is reaped (those
forked from outside included) makes "the init was reaped" mean "the
namespace is empty".
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import sys
from typing import Final, NoReturn

from . import _credentials, _libc

__all__ = ["WORKER_PID", "NamespaceForker", "fork_into_namespace", "worker_pid"]

_PR_SET_PDEATHSIG: Final = 1
_ORPHANED_EXIT: Final = 70
"""Exit status of a process whose supervisor died before it could notice."""
_FD_CEILING: Final = 2**31 - 1
_CLONE_NEWPID: Final = 0x20000000

_LOWEST_PRIORITY: Final = 19
WORKER_PID: Final = 2
"""The worker's pid in its PID namespace, next to its init (pid 1)."""


def fork_into_namespace() -> None:
    """Fork the init and the worker; return only in the worker.

    Call right after ``unshare(CLONE_NEWPID)``, in a single-threaded
    process.  The calling process becomes the supervisor; it does not
    return from this call, nor does the init.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or three processes would flush the same buffer
    alive_r, alive_w = os.pipe()  # only the supervisor keeps alive_w
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        _hold_namespace(alive_r)
    worker = os.fork()
    if worker:
        os.close(alive_r)
        _supervise(worker, init, keep=(alive_w,))
    os.close(alive_r)
    os.close(alive_w)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != 0:  # reparented to the init: the supervisor is gone
        os._exit(_ORPHANED_EXIT)


def _close_all_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted({*keep, _FD_CEILING}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _hold_namespace(alive_r: int) -> NoReturn:
    """The init: reap orphans (by ignoring SIGCHLD) until the supervisor goes."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _close_all_but((alive_r,))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an init ignores it then
    os.read(alive_r, 1)  # end of file: the supervisor exited, or is exiting
    os._exit(_ORPHANED_EXIT)


def _supervise(worker: int, init: int, keep: tuple[int, ...]) -> NoReturn:
    """The supervisor: wait for the worker, end the namespace, exit alike."""
    _close_all_but(keep)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Best effort: it holds nothing worth protecting, and mirroring the
    # worker's status works either way.
    with contextlib.suppress(OSError, ValueError):
        _credentials.drop_capabilities()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core when mirroring
    _, status = os.waitpid(worker, 0)
    os.kill(init, signal.SIGKILL)  # and with it whatever is left inside
    os.waitpid(init, 0)
    _exit_like(os.waitstatus_to_exitcode(status))


def _exit_like(code: int) -> NoReturn:
    """Exit with ``code``, or die of signal ``-code`` when it is negative."""
    if code >= 0:
        os._exit(code)
    sig = -code
    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default action is not to terminate


def worker_pid(supervisor: int) -> int:
    """The host pid of the worker below ``supervisor`` (in the parent).

    Raises:
        OSError: the supervisor is gone, or has not exactly one child that
            is not pid 1 of its namespace (``ECHILD``).
    """
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as file:
        children = [int(pid) for pid in file.read().split()]
    workers = [pid for pid in children if _own_pid(pid) != 1]
    if len(workers) != 1:
        raise ChildProcessError(
            f"process {supervisor} has children {children}, expected an init "
            "and one worker"
        )
    return workers[0]


def _own_pid(pid: int) -> int | None:
    """The pid ``pid`` has in its own namespace, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except FileNotFoundError:
        return None
    return None


class NamespaceForker:
    """Forks workers into PID namespaces of their own, from outside (a zygote).

    See "Forked from outside" in the module docstring.  It holds two fds
    for its life: this process's PID namespace (to come back to) and a
    pidfd of this process (for the inits to check that it lives).

    Raises:
        OSError: this process may not create PID namespaces (it lacks
            ``CAP_SYS_ADMIN``, or a seccomp filter refuses).
    """

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._alive = -1
        try:
            self._alive = os.pidfd_open(os.getpid())
            self._enter()
            self._leave()  # so that fork() knows it can
        except BaseException:
            self.close()
            raise

    def fork(self, identity: tuple[int, int] | None) -> tuple[int, int]:
        """Fork an init (pid 1) and a worker (pid 2) into a new PID namespace.

        Returns the host pids ``(init, worker)`` in this process and
        ``(init, 0)`` in the worker; the init never returns.  ``identity``
        is the ``(uid, gid)`` the init drops to (``None``: it keeps this
        process's).  The caller must be single-threaded; it reaps both.

        Raises:
            OSError: a fork failed (nothing is left running).
            RuntimeError: this process could not go back to its own PID
                namespace (its later children would land in the new one):
                it must not fork again.
        """
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or both children would flush the same buffer
        self._enter()
        try:
            init = _bare_fork()
            if init == 0:
                _hold_namespace_for(self._alive, identity)
            try:
                worker = os.fork()
            except BaseException:
                os.kill(init, signal.SIGKILL)  # not reaped yet: still our child
                raise
        except BaseException:
            self._leave()
            raise
        if worker:
            try:
                self._leave()
            except RuntimeError:
                for pid in (worker, init):
                    os.kill(pid, signal.SIGKILL)
                raise
        return init, worker

    def close(self) -> None:
        """Close the two fds."""
        for fd in (self._own, self._alive):
            if fd >= 0:
                os.close(fd)
        self._own = self._alive = -1

    def _enter(self) -> None:
        _libc.call("unshare", _CLONE_NEWPID)

    def _leave(self) -> None:
        try:
            _libc.call("setns", self._own, _CLONE_NEWPID)
        except OSError as exc:
            raise RuntimeError(
                f"cannot go back to its own PID namespace: {exc}"
            ) from exc


def _bare_fork() -> int:
    """``fork()`` through the C library alone, without Python's at-fork work.

    ``os.fork()`` also runs the interpreter's after-fork handlers in the
    child (``threading``, ``random``, ``logging``...): about half a
    millisecond and a hundred copy-on-write faults, for a child that needs
    none of them.  Only for a child of a single-threaded process that
    calls a few functions of modules already imported and never returns
    (the init below): no thread held the GIL or a lock across the fork,
    and no Python state the handlers would fix is used.
    """
    return _libc.call("fork")


def _hold_namespace_for(alive: int, identity: tuple[int, int] | None) -> NoReturn:
    """The init of a worker forked from outside: hold the namespace, reap orphans.

    First it closes the forking process's fds (its control socket, the
    worker's channel: their peers must see them close with their owners),
    then it gives way to the worker, which starts at the same moment and is
    the one that matters (the lowest priority, ``nice`` 19: an init needs
    no CPU once it waits), and only then does the rest.
    """
    try:
        _close_all_but((alive,))
        signal.set_wakeup_fd(-1)  # the forking process's, if any: not ours
        os.nice(_LOWEST_PRIORITY)
        if identity is not None:
            uid, gid = identity
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change
        if select.select([alive], [], [], 0)[0]:  # the pidfd: its parent exited
            os._exit(_ORPHANED_EXIT)
        os.close(alive)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps orphans
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # an init ignores it then
        while True:
            signal.pause()
    finally:
        os._exit(_ORPHANED_EXIT)  # never back into the forking process's code
