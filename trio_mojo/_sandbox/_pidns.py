"""The PID namespace: a supervisor, an init that reaps, and the worker.

Theory of operation
-------------------

``unshare(CLONE_NEWPID)`` (done by ``_namespaces``) moves only the
caller's future children into the new PID namespace; its first child is
that namespace's init (pid 1).  An init is special: it ignores every
signal it has no handler for, even ``SIGKILL`` from inside its namespace,
and when it dies the kernel kills everything else in the namespace.  A
target running as pid 1 could not be stopped with ``SIGTERM`` and could
not even kill itself.  So :func:`fork_into_namespace` makes three
processes, as bubblewrap and Chromium's ``CreateInitProcessReaper`` do::

    supervisor (the caller; host pid P, outside the namespace)
     └── init (pid 1 inside): reaps, and reports the worker's status
          └── worker (pid 2 inside): the one process that returns here

* The **worker** is an ordinary process: signals, exit status and
  ``getpid()`` (2) behave as usual; it sees no process outside the
  namespace (``kill``, ``sched_getaffinity`` or ``ptrace`` of a host pid
  fail with ``ESRCH``).
* The **init** holds nothing but a pipe to the supervisor.  It reaps every
  process of the namespace and, when the worker exits, writes the
  worker's wait status to that pipe and exits, which kills whatever else
  is left in the namespace.
* The **supervisor** is the process the launcher started and waits for.  It
  closes every fd but stdio and its pipes (the channels belong to the
  worker), drops its capabilities, waits for the init, and then exits
  *the way the worker did*: the same exit code, or the same signal sent to
  itself.  So its launcher sees the worker's real status (negative for a
  signal), exactly as if it had started the worker itself.

Dying together: the init has ``PR_SET_PDEATHSIG(SIGKILL)`` towards the
supervisor (the kernel delivers it to an init because it comes from outside
the namespace) and checks, through a pipe only the supervisor holds, that
the supervisor did not die before the signal was armed; the worker dies
with the init.  The supervisor has the death signal its own launcher
armed.  So killing the worker ends all three in order (init, then
supervisor, each after reaping its child: no zombie), and killing the
supervisor or its launcher kills the other two.

The launcher learns the worker's host pid from the kernel, not from the
worker: :func:`worker_pid` follows ``/proc/<pid>/task/<pid>/children``
from the supervisor to its only child (the init) and from there to the
worker.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import struct
import sys
from typing import Final, NoReturn

from . import _credentials, _libc

__all__ = ["fork_into_namespace", "worker_pid"]

_PR_SET_PDEATHSIG: Final = 1
_STATUS: Final = struct.Struct("=i")
_ORPHANED_EXIT: Final = 70
"""Exit status of an init whose supervisor died before it could notice."""
_FD_CEILING: Final = 2**31 - 1


def fork_into_namespace() -> None:
    """Fork the init and the worker; return only in the worker.

    Call right after ``unshare(CLONE_NEWPID)``, in a single-threaded
    process.  The calling process becomes the supervisor and the first
    child the init; neither returns from this call.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or three processes would flush the same buffer
    alive_r, alive_w = os.pipe()  # only the supervisor keeps alive_w
    status_r, status_w = os.pipe()
    init = os.fork()
    if init:
        os.close(alive_r)
        os.close(status_w)
        _supervise(init, status_r, keep=(alive_w, status_r))
    os.close(alive_w)
    os.close(status_r)
    _die_with_parent(alive_r)
    os.close(alive_r)
    worker = os.fork()
    if worker:
        _reap(worker, status_w)
    os.close(status_w)


def _close_all_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted({*keep, _FD_CEILING}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _die_with_parent(alive_r: int) -> None:
    """SIGKILL when the supervisor dies; exit now if it already has."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    poller = select.poll()
    poller.register(alive_r, select.POLLIN)
    if poller.poll(0):  # the write end was closed: the supervisor is gone
        os._exit(_ORPHANED_EXIT)


def _reap(worker: int, status_w: int) -> NoReturn:
    """The init: reap every process; report the worker's status, then exit."""
    _close_all_but((status_w,))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an init ignores it then
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # cannot happen while the worker lives
            os._exit(_ORPHANED_EXIT)
        if pid == worker:
            os.write(status_w, _STATUS.pack(status))
            os._exit(0)


def _supervise(init: int, status_r: int, keep: tuple[int, ...]) -> NoReturn:
    """The supervisor: wait for the init, then exit as the worker did."""
    _close_all_but(keep)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Best effort: it holds nothing worth protecting, and mirroring the
    # worker's status works either way.
    with contextlib.suppress(OSError, ValueError):
        _credentials.drop_capabilities()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core when mirroring
    _, status = os.waitpid(init, 0)
    report = os.read(status_r, _STATUS.size) if os.WIFEXITED(status) else b""
    if len(report) == _STATUS.size:
        (status,) = _STATUS.unpack(report)
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
        OSError: a process in the chain is gone, or has not exactly one
            child (``ECHILD``).
    """
    init = _only_child(supervisor)
    return _only_child(init)


def _only_child(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        children = file.read().split()
    if len(children) != 1:
        raise ChildProcessError(
            f"process {pid} has {len(children)} children, expected exactly one"
        )
    return int(children[0])
