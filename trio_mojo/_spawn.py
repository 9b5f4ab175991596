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

:func:`open_process_with_channel` wraps this around
:func:`trio.lowlevel.open_process` and owns the child for the duration of a
block: leaving it normally waits for the child to exit (up to a grace
period, then ``SIGTERM``, then ``SIGKILL``); leaving it by an exception or a
cancellation kills the child at once.  Either way the child is reaped inside
a shielded scope, so no zombie survives the block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from ._endpoint import Endpoint, channel_pair

__all__ = [
    "CHANNEL_SWITCH",
    "ChildProcess",
    "open_process_with_channel",
    "recover_endpoint",
]

CHANNEL_SWITCH: Final = "--mojo-platform-channel-handle"
"""The command-line switch naming the channel's fd (Chromium's ``kHandleSwitch``)."""

_MIN_TARGET_FD: Final = 3
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


async def start_with_endpoints(
    argv: Sequence[str],
    endpoints: Mapping[str, Endpoint],
    **options: Any,
) -> trio.Process:
    """Start ``argv`` with each endpoint passed under its switch.

    ``endpoints`` maps a switch (``"--mojo-platform-channel-handle"``) to the
    remote endpoint the child gets; each is closed in this process once the
    start was attempted, whether it worked or not.  ``options`` go to
    :func:`trio.lowlevel.open_process` (``pass_fds`` and ``close_fds`` are
    ours).
    """
    remotes: list[Endpoint] = []
    try:
        remotes.extend(_fd_at_least_3(endpoint) for endpoint in endpoints.values())
        fds = tuple(remote.fileno() for remote in remotes)
        args = [*argv]
        args += [f"{switch}={fd}" for switch, fd in zip(endpoints, fds, strict=True)]
        for key in ("pass_fds", "close_fds", "preexec_fn"):
            if key in options:
                raise ValueError(f"{key!r} is managed by trio_mojo")
        process: trio.Process = await trio.lowlevel.open_process(
            args, pass_fds=fds, close_fds=True, **options
        )
        return process
    finally:
        for endpoint in endpoints.values():
            endpoint.close()
        for remote in remotes:
            remote.close()


async def reap(process: trio.Process, *, grace_period: float) -> bool:
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
                break
    return False


async def kill(process: trio.Process) -> None:
    """``SIGKILL`` the process and reap it, shielded."""
    with trio.CancelScope(shield=True):
        _signal(process, signal.SIGKILL)
        with trio.move_on_after(_KILL_WAIT):
            await process.wait()


async def close_pipes(process: trio.Process) -> None:
    """Close whichever of the child's stdio pipes this process holds."""
    with trio.CancelScope(shield=True):
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


def _signal(process: trio.Process, sig: signal.Signals) -> None:
    if process.returncode is None:
        # ProcessLookupError: it exited in the meantime; wait() reaps it.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


class ChildProcess:
    """A child started by :func:`open_process_with_channel`.

    ``process`` is the :class:`trio.Process`; ``endpoint`` the parent's end
    of the channel, to hand to :func:`open_channel`.
    """

    __slots__ = ("endpoint", "process")

    def __init__(self, process: trio.Process, endpoint: Endpoint) -> None:
        self.process = process
        self.endpoint = endpoint

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child was reaped (negative: a signal)."""
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

    Yields a :class:`ChildProcess`; open a channel on its ``endpoint``.
    Leaving the block normally closes the endpoint if unused and waits for
    the child to exit (``grace_period`` seconds, then ``SIGTERM``, then
    ``SIGKILL``); leaving it by an exception or cancellation kills the child.
    The child is always reaped before the block is left.

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
