"""Handing an endpoint to a child process, Chromium's way, and getting it back.

Theory of operation
-------------------

Chromium's ``PlatformChannel`` passes the remote end of a socket pair to a
child by fd number and names it on the child's command line with
``--mojo-platform-channel-handle=N`` (N >= 3).  We do the same, so a
trio_mojo parent can start a Chromium-style child and a trio_mojo child can
be started by anything that follows the convention:

* the parent makes a :func:`channel_pair`, starts the child with
  ``pass_fds=(N,)`` and ``close_fds=True`` (the child inherits that fd and no
  other), appends the switch to its argv, and closes its own copy of the
  remote end right after the start, whether the start worked or not;
* the child calls :func:`recover_endpoint`, which parses the switch,
  validates the fd (a connected ``AF_UNIX`` stream socket, N >= 3) and makes
  it close-on-exec again so it is not handed on to grandchildren.

The fd stays non-blocking across the ``exec`` (``O_NONBLOCK`` lives on the
open file description): Chromium's child relies on that and so do we.

:func:`open_process_with_channel` owns the child for the duration of a
block: leaving it normally waits for the child to exit (up to a grace
period, then ``SIGTERM``, then ``SIGKILL``); leaving it by an exception or a
cancellation kills the child at once.  Either way the child is reaped inside
a shielded scope, so no zombie survives the block.

Why not :func:`trio.lowlevel.open_process`: it forks from one of Trio's
cached worker threads, and a worker arms ``PR_SET_PDEATHSIG``, which the
kernel fires when the *thread* that forked the child exits, not the
process.  Trio retires an idle cached thread after 10 s, so every worker
was killed by ``SIGKILL`` about 10 s after it started.  We fork from the
thread that runs the Trio loop instead (the one thread that outlives every
child a nursery owns), with :class:`subprocess.Popen`, which uses ``vfork``
and returns as soon as the child has called ``exec``: it blocks the loop
for a fraction of a millisecond (0.3 ms measured).  :class:`Process` is the
small :class:`trio.Process` work-alike (``pidfd`` wait, Trio streams for
pipes) this needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import trio

from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._handles import Handle

__all__ = [
    "CHANNEL_SWITCH",
    "ChildProcess",
    "Process",
    "ProcessLike",
    "SignalForwarding",
    "open_process_with_channel",
    "recover_endpoint",
]

CHANNEL_SWITCH: Final = "--mojo-platform-channel-handle"
"""The command-line switch naming the channel's fd (Chromium's ``kHandleSwitch``)."""

_MIN_TARGET_FD: Final = 3
_MAX_FD: Final = 2**31 - 1
"""An fd is a C int."""
_log = logging.getLogger("trio_mojo")
_KILL_WAIT: Final = 5.0
"""Seconds to wait for a SIGKILLed child to be reaped before giving up."""


def recover_endpoint(
    argv: Sequence[str] | None = None, *, switch: str = CHANNEL_SWITCH
) -> Endpoint:
    """Return the endpoint a parent passed to this process.

    Looks for ``--mojo-platform-channel-handle=N`` in ``argv`` (default
    :data:`sys.argv`), checks that N >= 3 names a connected ``AF_UNIX``
    ``SOCK_STREAM`` socket, and adopts it (non-blocking, close-on-exec).

    Raises:
        ValueError: the switch is missing, repeated or malformed, or the fd
            is not a connected AF_UNIX stream socket.
        OSError: the fd is not open in this process.
    """
    args = sys.argv if argv is None else argv
    prefix = switch + "="
    values = [arg[len(prefix) :] for arg in args if arg.startswith(prefix)]
    if not values:
        raise ValueError(
            f"no {switch}=N argument: this process was not given a channel"
        )
    if len(values) > 1:
        raise ValueError(f"{switch} given {len(values)} times: {values}")
    value = values[0]
    if not value.isdigit() or not value.isascii():
        raise ValueError(f"{switch}={value!r}: expected a decimal fd number")
    fd = int(value)
    if fd < _MIN_TARGET_FD:
        raise ValueError(f"{switch}={fd}: the fd must be >= {_MIN_TARGET_FD}")
    if fd > _MAX_FD:  # os.fstat would raise OverflowError
        raise ValueError(f"{switch}={value}: not a possible fd number")
    return Endpoint.from_fd(fd)


def _fd_at_least_3(endpoint: Endpoint) -> Endpoint:
    """An endpoint whose fd is >= 3 (a parent with stdio closed may get 0-2)."""
    fd = endpoint.fileno()
    if fd >= _MIN_TARGET_FD:
        return endpoint
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _MIN_TARGET_FD)
    endpoint.close()
    return Endpoint.from_fd(moved)


class SignalForwarding:
    """Signals for a child whose real work runs in a descendant.

    A sandboxed worker's child is only its supervisor (``_sandbox._pidns``);
    :meth:`forward_signals` then sends every signal to the worker process
    itself, through a ``pidfd`` (so a recycled pid is never hit).  Mixed
    into :class:`Process` and into a zygote's ``ForkedProcess``.
    """

    _forward_to: Handle | None = None
    forwarded_pid: int | None = None
    """The pid given to :meth:`forward_signals`, if any."""

    def forward_signals(self, pid: int) -> None:
        """From now on, signal ``pid`` (a descendant doing the real work).

        The child itself gets a signal only when that process is gone
        already, and then only ``SIGKILL``.

        Raises:
            ProcessLookupError: ``pid`` does not exist (any more).
        """
        if self._forward_to is not None:
            raise RuntimeError("signals are already forwarded")
        self._forward_to = Handle(os.pidfd_open(pid))
        self.forwarded_pid = pid

    def forwarded_process_exited(self) -> bool:
        """Whether the process of :meth:`forward_signals` has exited."""
        if self._forward_to is None or self._forward_to.closed:
            return False
        poller = select.poll()
        poller.register(self._forward_to.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _signal_forwarded(self, sig: int) -> bool:
        """Send ``sig`` to the forwarded process; True if that settles it.

        False: there is none, or it exited and ``sig`` is ``SIGKILL`` (the
        caller wants the child itself dead now).  Otherwise the child exits
        by itself, with the status of the process that exited.
        """
        if self._forward_to is None:
            return False
        try:
            signal.pidfd_send_signal(self._forward_to.fileno(), sig)
        except ProcessLookupError:
            return sig != signal.SIGKILL
        return True

    def _stop_forwarding(self) -> None:
        if self._forward_to is not None:
            self._forward_to.close()


class Process(SignalForwarding):
    """A child process: the part of :class:`trio.Process` trio_mojo uses.

    ``pid``, ``args``, ``returncode`` (``None`` while running; negative: the
    signal that ended it), ``poll()``, ``await wait()``,
    ``send_signal()``/``terminate()``/``kill()`` (no-ops once the child was
    reaped), and ``stdin``/``stdout``/``stderr`` as Trio streams when they
    were requested as ``subprocess.PIPE``.  Waiting uses a ``pidfd`` (or a
    thread on kernels without one); the child is reaped by ``wait()``.

    Signals to a sandboxed worker go to the worker process itself once
    :meth:`forward_signals` named it.
    """

    is_worker_supervisor: Final = True
    """Once it locked down, this process is the worker's supervisor, in a
    PID namespace or as its reaper (``_sandbox._pidns``): the target runs
    in its child."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: trio.lowlevel.FdStream | None,
        stdout: trio.lowlevel.FdStream | None,
        stderr: trio.lowlevel.FdStream | None,
    ) -> None:
        self._popen = popen
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._wait_lock = trio.Lock()
        self._pidfd: Handle | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = Handle(os.pidfd_open(popen.pid))

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._popen.pid

    @property
    def args(self) -> Any:
        """The argv the child was started with."""
        return self._popen.args

    @property
    def returncode(self) -> int | None:
        """The exit status, or ``None`` while the child runs (reaps it if it exited)."""
        return self.poll()

    def poll(self) -> int | None:
        """Reap the child if it exited; return :attr:`returncode`."""
        result = self._popen.poll()
        if result is not None:
            self._close_pidfd()
        return result

    async def wait(self) -> int:
        """Wait until the child exits, reap it, and return its status.

        Cancelled, it only stops waiting: the child goes on running.
        """
        async with self._wait_lock:
            if self.poll() is None:
                if self._pidfd is not None:
                    # ClosedResourceError: poll() reaped it meanwhile.
                    with contextlib.suppress(trio.ClosedResourceError):
                        await trio.lowlevel.wait_readable(self._pidfd.fileno())
                else:
                    await trio.to_thread.run_sync(
                        _wait_exited, self.pid, abandon_on_cancel=True
                    )
                self._popen.wait()  # it has exited: this reaps without blocking
                self._close_pidfd()
        returncode = self._popen.returncode
        assert returncode is not None
        return returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the child was already reaped (no pid reuse race)."""
        if self.poll() is None and self._signal_forwarded(sig):
            return
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """``SIGTERM``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """``SIGKILL``."""
        self.send_signal(signal.SIGKILL)

    def _close_pidfd(self) -> None:
        self._stop_forwarding()
        if self._pidfd is not None:
            # RuntimeError: outside Trio, where nothing can be waiting on it.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._pidfd.fileno())
            self._pidfd.close()
            self._pidfd = None

    def __repr__(self) -> str:
        return f"<trio_mojo.Process pid={self.pid} returncode={self._popen.returncode}>"


class ProcessLike(Protocol):
    """What :func:`reap`, :func:`kill` and ``open_worker`` use of a child: a
    :class:`Process`, or a worker forked by a zygote (``ForkedProcess``)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...

    stdin: trio.lowlevel.FdStream | None
    stdout: trio.lowlevel.FdStream | None
    stderr: trio.lowlevel.FdStream | None
    forwarded_pid: int | None

    @property
    def is_worker_supervisor(self) -> bool: ...

    def poll(self) -> int | None: ...
    async def wait(self) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def forward_signals(self, pid: int) -> None: ...
    def forwarded_process_exited(self) -> bool: ...


def _wait_exited(pid: int) -> None:
    """Block until ``pid`` has exited, without reaping it (no-pidfd fallback)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _spawn(
    argv: Sequence[str],
    *,
    stdin: int | None,
    stdout: int | None,
    stderr: int | None,
    **options: Any,
) -> Process:
    """Start ``argv`` from the calling thread (see the module docstring)."""
    streams: dict[str, trio.lowlevel.FdStream | None] = {}
    child_ends: dict[str, int | None] = {
        "stdin": stdin,
        "stdout": stdout,
        "stderr": stderr,
    }
    with contextlib.ExitStack() as always, contextlib.ExitStack() as on_failure:
        for name, spec in list(child_ends.items()):
            streams[name] = None
            if spec != subprocess.PIPE:
                continue
            read_end, write_end = os.pipe()  # both close-on-exec
            ours, theirs = (
                (write_end, read_end) if name == "stdin" else (read_end, write_end)
            )
            always.callback(os.close, theirs)
            try:
                stream = trio.lowlevel.FdStream(ours)
            except BaseException:
                os.close(ours)
                raise
            on_failure.callback(stream.close)
            streams[name] = stream
            child_ends[name] = theirs
        popen = subprocess.Popen(
            argv,
            stdin=child_ends["stdin"],
            stdout=child_ends["stdout"],
            stderr=child_ends["stderr"],
            **options,
        )
        on_failure.pop_all()
    return Process(popen, streams["stdin"], streams["stdout"], streams["stderr"])


async def start_with_endpoints(
    argv: Sequence[str],
    endpoints: Mapping[str, Endpoint],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    **options: Any,
) -> Process:
    """Start ``argv`` with each endpoint passed under its switch.

    ``endpoints`` maps a switch (``"--mojo-platform-channel-handle"``) to the
    remote endpoint the child gets; each is closed in this process once the
    start was attempted, whether it worked or not.  ``stdin``, ``stdout``,
    ``stderr`` and ``options`` mean what they mean to
    :class:`subprocess.Popen` (``pass_fds`` and ``close_fds`` are ours;
    ``subprocess.PIPE`` gives a Trio stream).  Once the child exists this
    returns it without a cancellation point, so the caller always owns it.
    """
    remotes: list[Endpoint] = []
    try:
        for key in ("pass_fds", "close_fds", "preexec_fn"):
            if key in options:
                raise ValueError(f"{key!r} is managed by trio_mojo")
        await trio.lowlevel.checkpoint_if_cancelled()
        remotes.extend(_fd_at_least_3(endpoint) for endpoint in endpoints.values())
        fds = tuple(remote.fileno() for remote in remotes)
        args = [*argv]
        args += [f"{switch}={fd}" for switch, fd in zip(endpoints, fds, strict=True)]
        return _spawn(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=fds,
            close_fds=True,
            **options,
        )
    finally:
        for endpoint in endpoints.values():
            endpoint.close()
        for remote in remotes:
            remote.close()


async def reap(process: ProcessLike, *, grace_period: float) -> bool:
    """Wait for ``process`` to exit; after ``grace_period`` s terminate it.

    Sends ``SIGTERM`` when the grace period runs out and ``SIGKILL`` a
    second grace period later.  Runs shielded: a cancelled caller still
    reaps the child.  Returns True if the child exited by itself.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(grace_period):
            await process.wait()
            return True
        for sig, wait in ((signal.SIGTERM, grace_period), (signal.SIGKILL, _KILL_WAIT)):
            _signal(process, sig)
            with trio.move_on_after(wait):
                await process.wait()
                return False
    _warn_unreaped(process)
    return False


async def kill(process: ProcessLike) -> None:
    """``SIGKILL`` the process and reap it, shielded."""
    with trio.CancelScope(shield=True):
        _signal(process, signal.SIGKILL)
        with trio.move_on_after(_KILL_WAIT):
            await process.wait()
            return
    _warn_unreaped(process)


def _warn_unreaped(process: ProcessLike) -> None:
    """Say so when a SIGKILLed child did not exit (stuck in the kernel)."""
    _log.warning(
        "child pid %d did not exit %.0f s after SIGKILL (uninterruptible sleep?); "
        "it is left unreaped",
        process.pid,
        _KILL_WAIT,
    )


async def close_pipes(process: ProcessLike) -> None:
    """Close whichever of the child's stdio pipes this process holds."""
    with trio.CancelScope(shield=True):
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


def _signal(process: ProcessLike, sig: signal.Signals) -> None:
    if process.returncode is None:
        # ProcessLookupError: it exited in the meantime; wait() reaps it.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


class ChildProcess:
    """A child started by :func:`open_process_with_channel`.

    ``process`` is the :class:`Process`; ``endpoint`` the parent's end
    of the channel, to hand to :func:`open_channel`.
    """

    __slots__ = ("endpoint", "process")

    def __init__(self, process: Process, endpoint: Endpoint) -> None:
        self.process = process
        self.endpoint = endpoint

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child was reaped, negative for a signal."""
        return self.process.returncode

    def __repr__(self) -> str:
        return f"<trio_mojo.ChildProcess pid={self.pid} returncode={self.returncode}>"


@asynccontextmanager
async def open_process_with_channel(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    start_new_session: bool = True,
    grace_period: float = 5.0,
) -> AsyncIterator[ChildProcess]:
    """Start ``argv`` with a channel endpoint, Chromium's way; own the child.

    The child gets the remote end of a fresh :func:`channel_pair` as an
    inherited fd named by ``--mojo-platform-channel-handle=N`` (appended to
    ``argv``) and no other fd beyond its stdio.  Any program can use it: a
    trio_mojo child calls :func:`recover_endpoint`; a plain one parses the
    switch and speaks the Mojo wire format on that socket.

    Leaving the block normally closes the endpoint if unused and waits for
    the child to exit (``grace_period`` seconds, then ``SIGTERM``, then
    ``SIGKILL``); leaving it by an exception or cancellation kills the child.
    The child is always reaped before the block is left.

    Args:
        argv: the program and its arguments; the switch is appended.
        env: the child's environment (default: the parent's).
        cwd: the child's working directory.
        stdin: as for :class:`subprocess.Popen` (default ``/dev/null``).
        stdout: as for :class:`subprocess.Popen` (default: the parent's).
        stderr: as for :class:`subprocess.Popen` (default: the parent's).
        start_new_session: start the child in a session of its own
            (default), so a terminal's signals do not reach it.
        grace_period: seconds a normal exit waits for the child before
            ``SIGTERM``, and as long again before ``SIGKILL``.

    Yields:
        A :class:`ChildProcess`: open a channel on its ``endpoint``.

    Raises:
        OSError: the program could not be started.
    """
    local, remote = channel_pair()
    try:
        process = await start_with_endpoints(
            argv,
            {CHANNEL_SWITCH: remote},
            env=env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
        )
    except BaseException:
        local.close()
        raise
    child = ChildProcess(process, local)
    try:
        yield child
    except BaseException:
        local.close()
        await kill(process)
        raise
    else:
        local.close()
        await reap(process, grace_period=grace_period)
    finally:
        await close_pipes(process)
